"""Per-primitive rules of `lorax_lite.rules`, checked against the float64 merged weight.

Each rule runs on a `LoraValue` with the parameters JAX itself traces for the
operation; its result (a new lazy value, materialized here, or an array) must
equal the same operation applied to ``w + s A B`` computed in float64 numpy.
"""

from __future__ import annotations

import jax
import jax.extend.core.primitives as prim
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import lorax_lite as ll
from lorax_lite import lazy, products, structural
from lorax_lite.lazy import LoraValue


def make_value(shape, layout, *, rank=2, scale=0.7, seed=0, dtype=jnp.float32) -> LoraValue:
    """A LoRA value with random w, A and B (B non-zero, so the adapter shows).

    Drawn with numpy: no JAX computation to compile per shape.
    """
    rng = np.random.default_rng(seed)
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    w, a, b = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape, a_shape, b_shape))
    return LoraValue(w, a.astype(jnp.float32), b.astype(jnp.float32), scale, layout, 0.0, "k")


def reference(value: LoraValue) -> np.ndarray:
    """The float64 numpy ``w + s A B`` of a lazy value."""
    node = ll.LoraWeight(value.w, value.a, value.b, value.scale, value.layout)
    return dense_reference(node)


def traced_eqn(op, primitive, *args):
    """The first equation of ``primitive`` in the jaxpr of ``op(*args)``, entering calls."""

    def find(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is primitive:
                return eqn
            inner = eqn.params.get("jaxpr")
            found = inner is not None and find(getattr(inner, "jaxpr", inner))
            if found:
                return found
        return None

    eqn = find(jax.make_jaxpr(op)(*args).jaxpr)
    assert eqn is not None, f"{primitive} not in the trace"
    return eqn


def apply_rule(rule, op, primitive, value):
    """Runs ``rule`` with the parameters JAX traces for ``op`` on the dense weight."""
    return rule(traced_eqn(op, primitive, value.w), value)


def jitted(rule, value, *args):
    """``rule(value, *args)`` compiled once (the lazy value's arrays are the inputs)."""
    run = lambda w, a, b, *xs: rule(value._replace(w=w, a=a, b=b), *xs)
    return jax.jit(run)(value.w, value.a, value.b, *args)


STACKED = ll.Layout((0,), (1,), (2,))


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    atol = rtol * np.nanmax(np.abs(expected), initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


DENSE = ll.Layout.dense()
OUT_2, IN_2 = ll.Layout((), (0,), (1, 2)), ll.Layout((), (0, 1), (2,))
OUT_2_SWAPPED = ll.Layout((), (0,), (2, 1))  # B holds the fan-out axes in reverse order
stack_copies = lambda w: jnp.broadcast_to(w, (3, 5, 4))
expand_and_stack = lambda w: lax.broadcast_in_dim(w, (2, 3, 5, 4), (1, 2, 3))
RULES = {
    prim.transpose_p: structural.transpose,
    prim.convert_element_type_p: structural.convert,
    prim.reshape_p: structural.reshape,
    prim.squeeze_p: structural.squeeze,
    prim.rev_p: structural.rev,
    prim.broadcast_in_dim_p: structural.broadcast,
}
STRUCTURAL = {
    "transpose": (prim.transpose_p, lambda w: w.T, (5, 4), DENSE),
    "transpose-3d": (prim.transpose_p, lambda w: w.transpose(2, 0, 1), (3, 5, 4), STACKED),
    "convert": (prim.convert_element_type_p, lambda w: w.astype(jnp.float16), (5, 4), DENSE),
    "reshape-split-out": (prim.reshape_p, lambda w: w.reshape(5, 2, 2), (5, 4), DENSE),
    "reshape-merge-out": (prim.reshape_p, lambda w: w.reshape(5, 6), (5, 2, 3), OUT_2),
    "reshape-merge-in": (prim.reshape_p, lambda w: w.reshape(6, 5), (2, 3, 5), IN_2),
    "reshape-split-stack": (prim.reshape_p, lambda w: w.reshape(2, 3, 5, 4), (6, 5, 4), STACKED),
    "reshape-factor-order": (prim.reshape_p, lambda w: w.reshape(5, 6), (5, 3, 2), OUT_2_SWAPPED),
    "reshape-add-axis": (prim.reshape_p, lambda w: w.reshape(1, 5, 4), (5, 4), DENSE),
    "squeeze-stack": (prim.squeeze_p, lambda w: w.squeeze(0), (1, 5, 4), STACKED),
    "squeeze-row": (prim.squeeze_p, lambda w: w.squeeze(0), (1, 4), DENSE),
    "rev": (prim.rev_p, lambda w: lax.rev(w, (0, 2)), (3, 5, 4), STACKED),
    "broadcast-new": (prim.broadcast_in_dim_p, stack_copies, (5, 4), DENSE),
    "broadcast-size-1": (prim.broadcast_in_dim_p, expand_and_stack, (1, 5, 4), STACKED),
}  # fmt: skip


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structural_rule_stays_lazy_and_exact(name):
    primitive, op, shape, layout = STRUCTURAL[name]
    value = make_value(shape, layout)
    out = apply_rule(RULES[primitive], op, primitive, value)
    assert isinstance(out, LoraValue), "the rule should keep the weight lazy"
    expected = op(jnp.asarray(reference(value), jnp.float32))
    assert out.w.dtype == expected.dtype
    assert_close(out.materialize(), expected, rtol=1e-3 if expected.dtype == jnp.float16 else 1e-5)
    a_shape, b_shape = out.layout.factor_shapes(out.w.shape, 2)
    assert (out.a.shape, out.b.shape) == (a_shape, b_shape)


def test_convert_casts_factors_to_the_compute_dtype():
    value = make_value((5, 4), ll.Layout.dense())
    out = apply_rule(
        structural.convert, lambda w: w.astype(jnp.bfloat16), prim.convert_element_type_p, value
    )
    assert out.a.dtype == out.b.dtype == out.w.dtype == jnp.bfloat16


def test_reshape_mixing_fan_in_and_fan_out_is_refused():
    value = make_value((4, 6), ll.Layout.dense())
    eqn = traced_eqn(lambda w: w.reshape(8, 3), prim.reshape_p, value.w)
    assert structural.reshape(eqn, value) is None
    eqn = traced_eqn(lambda w: w.reshape(24), prim.reshape_p, value.w)
    assert structural.reshape(eqn, value) is None


SLICE_CASES = [
    ("stack", lambda w: w[1:3], (3, 5, 4), STACKED),
    ("rows", lambda w: w[:, 1:4], (3, 5, 4), STACKED),
    ("strided-columns", lambda w: w[..., 0:4:2], (3, 5, 4), STACKED),
    ("everything", lambda w: w[1:, ::2, 1:3], (3, 5, 4), STACKED),
    ("2d-columns", lambda w: w[:, 1:3], (5, 4), ll.Layout.dense()),
]


@pytest.mark.parametrize(
    "op, shape, layout", [c[1:] for c in SLICE_CASES], ids=[c[0] for c in SLICE_CASES]
)
def test_static_slices_cut_the_factors(op, shape, layout):
    value = make_value(shape, layout)
    eqn = traced_eqn(op, prim.slice_p, value.w)
    out = structural.slice_any(eqn, value)
    assert_close(out.materialize(), op(jnp.asarray(reference(value), jnp.float32)))


@pytest.mark.parametrize("start", [(1, 0, 0), (2, 1, 2), (0, 3, 1)])
def test_dynamic_slices_cut_the_factors(start):
    value = make_value((3, 5, 4), STACKED)
    sizes = (1, 2, 2)
    starts = [jnp.asarray(i, jnp.int32) for i in start]
    eqn = traced_eqn(
        lambda w, *s: lax.dynamic_slice(w, s, sizes), prim.dynamic_slice_p, value.w, *starts
    )
    out = structural.slice_any(eqn, value, *starts)
    expected = lax.dynamic_slice(jnp.asarray(reference(value), jnp.float32), starts, sizes)
    assert_close(out.materialize(), expected)


TABLE = ll.Layout((), (0,), (1,))


def lookup(axis: int, mode: str, fill_value=None):
    """``w[i]`` along ``axis`` as one ``lax.gather``, with the given out-of-bounds mode."""

    def op(w, indices):
        batch = indices.ndim - 1
        dims = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(batch, batch + w.ndim - 1)),
            collapsed_slice_dims=(axis,),
            start_index_map=(axis,),
        )
        sizes = tuple(1 if i == axis else n for i, n in enumerate(w.shape))
        return lax.gather(w, indices, dims, sizes, mode=mode, fill_value=fill_value)

    return op


@pytest.mark.parametrize(
    "axis, mode, fill_value",
    [
        (0, "promise_in_bounds", None),
        (0, "clip", None),
        (0, "fill", -3.0),
        (0, "fill", None),
        (1, "clip", None),
        (1, "fill", 2.0),
    ],
)
def test_gather_from_a_table_equals_lookup_in_the_merged_table(axis, mode, fill_value):
    value = make_value((10, 6), TABLE)
    high = 10 if mode == "promise_in_bounds" else 14
    rng = np.random.default_rng(1)
    indices = jnp.asarray(rng.integers(-2 if high > 10 else 0, high, (2, 3, 1)), jnp.int32)
    op = lookup(axis, mode, fill_value)
    eqn = traced_eqn(op, prim.gather_p, value.w, indices)
    out = jitted(lambda v, i: products.gather(eqn, v, i, None), value, indices)
    expected = op(jnp.asarray(reference(value), jnp.float32), indices)
    assert not isinstance(out, LoraValue)
    assert_close(out, expected)  # NaN (the default fill) where the lookup fills


def test_gather_of_stacked_axes_stays_lazy():
    """An expert table indexed by a router: the index axes become stacked axes."""
    value = make_value((3, 5, 4), STACKED)
    experts = jnp.array([[0, 2], [1, 1], [2, 0]])[..., None]
    op = lookup(0, "promise_in_bounds")
    eqn = traced_eqn(op, prim.gather_p, value.w, experts)
    out = products.gather(eqn, value, experts, None)
    assert isinstance(out, LoraValue)
    assert out.layout == ll.Layout((0, 1), (2,), (3,))
    assert_close(out.materialize(), reference(value)[np.asarray(experts[..., 0])])


def test_gather_of_a_slice_window_is_refused():
    value = make_value((10, 6), TABLE)
    op = lambda w, i: lax.dynamic_slice_in_dim(w, i, 2, axis=0)
    eqn = jax.make_jaxpr(jax.vmap(op, in_axes=(None, 0)))(value.w, jnp.array([1, 3])).jaxpr
    gather = next(e for e in eqn.eqns if e.primitive is prim.gather_p)
    assert products.gather(gather, value, jnp.zeros((2, 1), jnp.int32), None) is None


# ----- dot_general: property test over shapes, layouts and dimension numbers ----------


@st.composite
def dot_problems(draw):
    """A weight with random axis roles and a dot_general with random dimension numbers."""
    n_stack, n_in, n_out = draw(st.integers(0, 1)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    roles = ["stack"] * n_stack + ["in"] * n_in + ["out"] * n_out
    roles = draw(st.permutations(roles))
    shape = tuple(draw(st.integers(1, 4)) for _ in roles)
    # Each weight axis is contracted, a batch axis, or free in the product.
    kinds = [draw(st.sampled_from(["contract", "batch", "free"])) for _ in roles]
    n_x_free = draw(st.integers(0, 2))
    x_axes = [i for i, k in enumerate(kinds) if k != "free"] + [None] * n_x_free
    x_axes = draw(st.permutations(x_axes))
    x_shape = tuple(shape[i] if i is not None else draw(st.integers(1, 3)) for i in x_axes)
    contract_w = [i for i, k in enumerate(kinds) if k == "contract"]
    batch_w = [i for i, k in enumerate(kinds) if k == "batch"]
    contract_x = [x_axes.index(i) for i in contract_w]
    batch_x = [x_axes.index(i) for i in batch_w]
    on_right = draw(st.booleans())
    rank = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return roles, shape, x_shape, (contract_x, contract_w), (batch_x, batch_w), on_right, rank, seed


@settings(max_examples=25, deadline=None)
@given(dot_problems())
def test_dot_general_matches_float64_reference(problem):
    roles, shape, x_shape, contract, batch, on_right, rank, seed = problem
    layout = ll.Layout.from_roles(tuple(roles))
    value = make_value(shape, layout, rank=rank, seed=seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=x_shape), jnp.float32)
    if on_right:
        dims = ((contract[0], contract[1]), (batch[0], batch[1]))
        operands = (x, value.w)
    else:
        dims = ((contract[1], contract[0]), (batch[1], batch[0]))
        operands = (value.w, x)
    eqn = traced_eqn(
        lambda lhs, rhs: lax.dot_general(lhs, rhs, dims), prim.dot_general_p, *operands
    )
    if on_right:
        out = jitted(lambda v, x: products.dot_general(eqn, x, v, None), value, x)
    else:
        out = jitted(lambda v, x: products.dot_general(eqn, v, x, None), value, x)

    dense, x64 = reference(value), np.asarray(x, np.float64)
    expected = (
        _numpy_dot_general(x64, dense, dims) if on_right else _numpy_dot_general(dense, x64, dims)
    )
    assert_close(out, expected)


def _numpy_dot_general(lhs, rhs, dims):
    """``lax.dot_general`` semantics with ``np.einsum``: batch, lhs free, rhs free."""
    (cl, cr), (bl, br) = dims
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(lhs.ndim)]
    rs = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip((*cl, *bl), (*cr, *br)):
        rs[j] = ls[i]
    out = [ls[i] for i in bl]
    out += [s for i, s in enumerate(ls) if i not in (*cl, *bl)]
    out += [s for j, s in enumerate(rs) if j not in (*cr, *br)]
    return np.einsum(f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", lhs, rhs)


def test_dot_general_contracting_fan_out_meets_b_first():
    """``x @ W.T`` (a tied head) contracts the fan-out axis: the input meets B, then A."""
    value = make_value((7, 5), ll.Layout.dense())
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5)), jnp.float32)
    dims = (((1,), (1,)), ((), ()))
    eqn = traced_eqn(
        lambda lhs, rhs: lax.dot_general(lhs, rhs, dims), prim.dot_general_p, x, value.w
    )
    run = lambda w, a, b: products.dot_general(eqn, x, value._replace(w=w, a=a, b=b), None)
    jaxpr = jax.make_jaxpr(run)(value.w, value.a, value.b)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive is prim.dot_general_p]
    shapes = [tuple(v.aval.shape) for e in dots for v in e.outvars]
    assert (2, 2) in shapes, "x (2, 5) @ B.T (5, r=2) should come first"
    assert (7, 5) not in shapes and (5, 7) not in shapes
    assert_close(
        products.dot_general(eqn, x, value, None),
        np.asarray(x, np.float64) @ reference(value).T,
    )


def test_dot_general_honours_preferred_element_type():
    value = make_value((5, 4), ll.Layout.dense(), dtype=jnp.bfloat16)
    value = value._replace(a=value.a.astype(jnp.bfloat16), b=value.b.astype(jnp.bfloat16))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5)), jnp.bfloat16)
    op = lambda lhs, rhs: lax.dot_general(
        lhs, rhs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    eqn = traced_eqn(op, prim.dot_general_p, x, value.w)
    out = products.dot_general(eqn, x, value, None)
    assert out.dtype == jnp.float32
    assert_close(out, np.asarray(x, np.float64) @ reference(value), rtol=2e-2)


def test_dropout_is_inverted_and_identity_without_key():
    x = jnp.ones((200, 50))
    assert lazy.dropout(x, 0.3, None) is x
    assert lazy.dropout(x, 0.0, jax.random.key(0)) is x
    dropped = np.asarray(lazy.dropout(x, 0.3, jax.random.key(0)))
    kept = dropped[dropped != 0]
    np.testing.assert_allclose(kept, 1 / 0.7, rtol=1e-6)
    assert abs((dropped == 0).mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / x.size)
