"""Views of JAX equations: each supported JAX's spelling read right, others refused loudly."""

import re

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import pytest
from jax import lax

from lorax_lite import views


def equations(fn, *args):
    """Every equation of ``fn``'s jaxpr, entering sub-jaxprs, outermost first."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for region in views.regions(eqn) or ():
                yield from walk(region.jaxpr)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def first(fn, name, *args):
    return next(e for e in equations(fn, *args) if e.primitive.name == name)


def scan_everything(w, x, gains):
    bias = jnp.tanh(x[0])  # closed over: a scan constant

    def body(carry, inputs):
        h, total = carry
        wi, gain = inputs
        h = jnp.tanh(h @ wi + bias) * gain
        return (h, total + h.sum()), (h[0], h.sum())

    return lax.scan(body, (x, 0.0), (w, gains), reverse=True, unroll=2)


W, X, GAINS = jnp.ones((3, 5, 5)), jnp.ones((2, 5)), jnp.arange(3.0)


def test_scan_groups_its_operands_as_the_body_takes_them():
    eqn = first(scan_everything, "scan", W, X, GAINS)
    view = views.scan(eqn)
    assert (view.length, view.reverse, view.unroll) == (3, True, 2)
    consts, carry, xs = view.split(eqn.invars)
    assert view.n_consts == len(consts) >= 1 and view.n_carry == len(carry) == 2
    assert [v.aval.shape for v in carry] == [(2, 5), ()]
    assert [v.aval.shape for v in xs] == [(3, 5, 5), (3,)]
    body_in = view.body.jaxpr.invars
    assert [v.aval.shape for v in body_in[len(consts) + 2 :]] == [(5, 5), ()]
    assert len(view.body.jaxpr.outvars) == len(eqn.outvars) == 2 + 2


def test_fori_loop_with_static_bounds_is_a_scan_with_a_counter():
    eqn = first(lambda x: lax.fori_loop(0, 4, lambda i, h: jnp.tanh(h @ W[0]), x), "scan", X)
    view = views.scan(eqn)
    _, carry, xs = view.split(eqn.invars)
    assert view.length == 4 and len(carry) == 2 and xs == []  # the counter and h


def test_while_splits_condition_and_body_constants():
    fn = lambda x, n: lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ W[0]), (0, x))
    eqn = first(fn, "while", X, 3)
    view = views.while_loop(eqn)
    cond_consts, body_consts, carry = view.split(eqn.invars)
    assert (len(cond_consts), len(body_consts), len(carry)) == (1, 1, 2)
    cond_region, body_region = views.regions(eqn)
    assert [eqn.invars[i] for i in cond_region.operands] == [*cond_consts, *carry]
    assert [eqn.invars[i] for i in body_region.operands] == [*body_consts, *carry]


def test_cond_branches_take_every_operand_but_the_index():
    fn = lambda p, x: lax.cond(p, lambda: x @ W[0], lambda: -x)
    eqn = first(fn, "cond", True, X)
    assert len(views.cond(eqn).branches) == 2
    operands = tuple(range(1, len(eqn.invars)))  # x and the closed-over W[0]
    assert len(operands) == 2 and all(r.operands == operands for r in views.regions(eqn))


def test_scanned_inputs_are_the_sliced_regions_operands():
    eqn = first(scan_everything, "scan", W, X, GAINS)
    (region,) = views.regions(eqn)
    view = views.scan(eqn)
    assert region.sliced == (False,) * (view.n_consts + 2) + (True, True)


def test_nested_calls_remat_and_custom_functions_are_regions():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (f(p[0]), t[0]))
    fn = lambda x: jax.jit(jax.checkpoint(lambda y: f(y) * 2))(x)
    names = [e.primitive.name for e in equations(fn, 1.0)]
    assert names.index("custom_jvp_call") > names.index("jit") >= 0
    assert any(n.startswith(("remat", "checkpoint")) for n in names)


def test_dot_view_reads_contracting_and_batch_axes():
    eqn = first(lambda x, w: jnp.einsum("ebd,edf->ebf", x, w), "dot_general", W, W)
    view = views.dot(eqn)
    assert view.contract == ((2,), (1,)) and view.batch == ((0,), (0,))


def _fabricated(eqn, **params):
    return eqn.replace(params=params)


def test_an_equation_in_an_unknown_spelling_names_primitive_parameters_and_jax():
    eqn = first(scan_everything, "scan", W, X, GAINS)
    p = eqn.params
    strange = _fabricated(eqn, jaxpr=p["jaxpr"], length=3, reverse=True, unroll=1, layout="new")
    message = f"'scan'.*jax {re.escape(jax.__version__)}.*layout"
    with pytest.raises(views.UnsupportedEquationError, match=message):
        views.scan(strange)
    with pytest.raises(views.UnsupportedEquationError, match=message):
        views.regions(strange)
    dot = first(lambda x: x @ W[0], "dot_general", X)
    with pytest.raises(views.UnsupportedEquationError, match="'dot_general'.*dims"):
        views.dot(_fabricated(dot, dims=None))


def test_an_unknown_higher_order_primitive_is_refused_not_skipped():
    eqn = first(lambda x: jax.jit(lambda y: y @ W[0])(x), "jit", X)
    mystery = jex.Primitive("mystery_loop")
    with pytest.raises(views.UnsupportedEquationError, match="'mystery_loop'.*does not enter"):
        views.regions(eqn.replace(primitive=mystery))
    dot = first(lambda x: x @ W[0], "dot_general", X)
    assert views.regions(dot) is None


def test_region_inputs_are_the_operands_bound_with_scanned_ones_sliced():
    eqn = first(scan_everything, "scan", W, X, GAINS)
    (region,) = views.regions(eqn)
    assert list(region.consts) == list(views.scan(eqn).body.consts)
    inputs = region.inputs(eqn.invars, slice_one=lambda v: v.aval.shape[1:])
    assert inputs[-2:] == [(5, 5), ()] and inputs[:-2] == eqn.invars[:-2]
    fn = lambda x, n: lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ W[0]), (0, x))
    eqn = first(fn, "while", X, 3)
    cond_consts, body_consts, carry = views.while_loop(eqn).split(eqn.invars)
    cond_region, body_region = views.regions(eqn)
    assert cond_region.inputs(eqn.invars) == [*cond_consts, *carry]
    assert body_region.inputs(eqn.invars) == [*body_consts, *carry]
