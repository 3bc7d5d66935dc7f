"""Per-primitive rules for a weight carried lazily as ``w + scale * A @ B``.

`LoraValue` is what `lorax_lite.transform` keeps in its environment in place of a
`LoraWeight`. Each rule returns the equation's output without forming the dense
``w + scale * A @ B``:

* ``dot_general``: ``x.w + scale * ((drop(x).A).B)``, for any dimension numbers.
* ``conv_general_dilated``: ``conv(x, w) + scale * (conv(drop(x), A)).B``.
* ``gather`` (embedding lookup): ``w[i] + scale * A[i] @ B``.
* structural ops (casts, transposes, reshapes, slices of stacked axes) return a new
  `LoraValue`.

A rule returns ``None`` when it does not apply; the evaluator then materializes.
"""

from __future__ import annotations

import math
import string
from typing import Any, NamedTuple

import jax
import jax.extend.core.primitives as prim
import jax.numpy as jnp
from jax import lax

from .weight import Layout, LoraWeight


class LoraValue(NamedTuple):
    """A weight held lazily inside the evaluator, with the leaf path it came from."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float
    layout: Layout
    dropout: float
    path: str

    def materialize(self) -> jax.Array:
        """``w + scale * A @ B``, accumulated in float32, in ``w``'s dtype."""
        return LoraWeight(self.w, self.a, self.b, self.scale, self.layout).materialize()


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter input; identity without a key or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dot_general(params: dict[str, Any], lhs: Any, rhs: Any, key: jax.Array | None) -> jax.Array:
    """``dot_general`` with a `LoraValue` on one side, any contracting/batch dims.

    The low-rank term is two small contractions: the input meets ``A`` first when
    the product contracts fan-in axes (``x @ W``), ``B`` first when it contracts
    fan-out axes (``x @ W.T``, a tied embedding head).
    """
    on_right = isinstance(rhs, LoraValue)
    lora, x = (rhs, lhs) if on_right else (lhs, rhs)
    base = prim.dot_general_p.bind(*((x, lora.w) if on_right else (lora.w, x)), **params)
    (contract_l, contract_r), (batch_l, batch_r) = params["dimension_numbers"]
    x_contract, w_contract = (contract_l, contract_r) if on_right else (contract_r, contract_l)
    x_batch, w_batch = (batch_l, batch_r) if on_right else (batch_r, batch_l)

    letters = iter(string.ascii_letters)
    x_spec = [next(letters) for _ in range(x.ndim)]
    w_spec = [None] * lora.w.ndim
    for xi, wi in zip((*x_contract, *x_batch), (*w_contract, *w_batch)):
        w_spec[wi] = x_spec[xi]
    w_spec = [s or next(letters) for s in w_spec]
    rank = next(letters)
    x_free = [s for i, s in enumerate(x_spec) if i not in (*x_contract, *x_batch)]
    w_free = [s for i, s in enumerate(w_spec) if i not in (*w_contract, *w_batch)]
    out = [x_spec[i] for i in x_batch] + (x_free + w_free if on_right else w_free + x_free)

    stack, fan_in, fan_out = lora.layout
    a_spec = [w_spec[i] for i in stack + fan_in] + [rank]
    b_spec = [w_spec[i] for i in stack] + [rank] + [w_spec[i] for i in fan_out]
    first, second = (lora.a, a_spec), (lora.b, b_spec)
    if not set(w_contract) & set(fan_in) and set(w_contract) & set(fan_out):
        first, second = second, first
    keep = set(second[1]) | set(out)
    t_spec = [s for s in dict.fromkeys(x_spec + first[1]) if s in keep]

    dtype, precision = lora.w.dtype, params.get("precision")
    x = dropout(x, lora.dropout, key)
    t = _einsum(x_spec, first[1], t_spec, x, first[0].astype(dtype), precision)
    t = t * jnp.asarray(lora.scale, t.dtype)
    delta = _einsum(t_spec, second[1], out, t, second[0].astype(dtype), precision)
    return base + delta.astype(base.dtype)


def _einsum(s1, s2, s_out, x, y, precision) -> jax.Array:
    return jnp.einsum(f"{''.join(s1)},{''.join(s2)}->{''.join(s_out)}", x, y, precision=precision)


def conv(params: dict[str, Any], x: jax.Array, lora: LoraValue, key: jax.Array | None) -> Any:
    """``conv_general_dilated`` with a LoRA kernel: ``A`` is a conv to ``r`` channels,
    ``B`` a 1x1 map from ``r`` to the output channels (as PEFT's Conv LoRA)."""
    dims = params["dimension_numbers"]
    out_axis, in_axis, *spatial = dims.rhs_spec
    stack, fan_in, fan_out = lora.layout
    grouped = params["feature_group_count"] != 1 or params["batch_group_count"] != 1
    if grouped or stack or fan_out != (out_axis,) or set(fan_in) != {in_axis, *spatial}:
        return None
    base = prim.conv_general_dilated_p.bind(x, lora.w, **params)
    # A is (fan_in..., r); lay it out as a kernel with r output channels.
    to_a = [len(fan_in) if i == out_axis else fan_in.index(i) for i in range(lora.w.ndim)]
    kernel_a = jnp.transpose(lora.a.astype(lora.w.dtype), to_a)
    y = prim.conv_general_dilated_p.bind(dropout(x, lora.dropout, key), kernel_a, **params)
    y = y * jnp.asarray(lora.scale, y.dtype)
    feature = dims.out_spec[1]
    delta = jnp.moveaxis(jnp.tensordot(y, lora.b.astype(y.dtype), ((feature,), (0,))), -1, feature)
    return base + delta.astype(base.dtype)


def gather(params: dict[str, Any], lora: LoraValue, indices: jax.Array) -> Any:
    """Row lookup into a LoRA embedding table: ``w[i] + scale * A[i] @ B``."""
    dims = params["dimension_numbers"]
    stack, fan_in, fan_out = lora.layout
    indexed = tuple(dims.start_index_map)
    simple = (
        not stack
        and len(fan_out) == 1
        and set(indexed) == set(fan_in)
        and tuple(sorted(dims.collapsed_slice_dims)) == tuple(sorted(indexed))
        and params["slice_sizes"][fan_out[0]] == lora.w.shape[fan_out[0]]
        and len(dims.offset_dims) == 1
        and not getattr(dims, "operand_batching_dims", ())
    )
    if not simple:
        return None
    base = prim.gather_p.bind(lora.w, indices, **params)
    a_dims = dims._replace(
        collapsed_slice_dims=tuple(fan_in.index(i) for i in dims.collapsed_slice_dims),
        start_index_map=tuple(fan_in.index(i) for i in indexed),
    )
    a_rows = prim.gather_p.bind(
        lora.a.astype(lora.w.dtype),
        indices,
        **{
            **params,
            "dimension_numbers": a_dims,
            "slice_sizes": (1,) * len(fan_in) + (lora.a.shape[-1],),
        },
    )
    offset = dims.offset_dims[0]
    delta = jnp.moveaxis(
        jnp.tensordot(a_rows, lora.b.astype(a_rows.dtype), ((offset,), (0,))), -1, offset
    )
    return base + (lora.scale * delta).astype(base.dtype)


# ----- structural ops: the result is still a LoraValue ------------------------------


def convert(params: dict[str, Any], lora: LoraValue) -> LoraValue:
    """A cast of the weight casts the factors too, so the adapter computes in the model's dtype."""
    dtype = params["new_dtype"]
    w = prim.convert_element_type_p.bind(lora.w, **params)
    return lora._replace(w=w, a=lora.a.astype(dtype), b=lora.b.astype(dtype))


def transpose(params: dict[str, Any], lora: LoraValue) -> LoraValue:
    """Permutes the weight's axes; the factors keep theirs, the layout is renumbered."""
    perm = params["permutation"]
    renumber = lambda axes: tuple(perm.index(i) for i in axes)
    layout = Layout(*(renumber(g) for g in lora.layout))
    return lora._replace(w=prim.transpose_p.bind(lora.w, **params), layout=layout)


def slice_stack(primitive: Any, params: dict[str, Any], lora: LoraValue, *starts: Any) -> Any:
    """``slice``/``dynamic_slice`` that cut stacked axes only: slice ``A``, ``B`` alike."""
    stack, fan_in, fan_out = lora.layout
    shape = lora.w.shape
    if "slice_sizes" in params:
        sizes = params["slice_sizes"]
    else:
        strides = params["strides"] or (1,) * len(shape)
        bounds = zip(params["start_indices"], params["limit_indices"], strides)
        sizes = tuple((hi - lo + st - 1) // st for lo, hi, st in bounds)
    if any(sizes[i] != shape[i] for i in fan_in + fan_out):
        return None
    w = primitive.bind(lora.w, *starts, **params)
    a = _slice_factor(primitive, params, lora.a, stack, starts)
    b = _slice_factor(primitive, params, lora.b, stack, starts)
    return None if a is None else lora._replace(w=w, a=a, b=b)


def _slice_factor(primitive, params, factor, stack, starts):
    """Applies the stack-axis part of a slice to a factor (stack axes lead it)."""
    n = len(stack)
    if primitive is prim.dynamic_slice_p:
        idx = [starts[i] for i in stack] + [0] * (factor.ndim - n)
        sizes = [params["slice_sizes"][i] for i in stack] + list(factor.shape[n:])
        return lax.dynamic_slice(factor, idx, sizes)
    strides = params["strides"] or (1,) * len(params["start_indices"])
    return lax.slice(
        factor,
        [params["start_indices"][i] for i in stack] + [0] * (factor.ndim - n),
        [params["limit_indices"][i] for i in stack] + list(factor.shape[n:]),
        [strides[i] for i in stack] + [1] * (factor.ndim - n),
    )


def squeeze(params: dict[str, Any], lora: LoraValue) -> Any:
    """Drops size-1 stacked axes (indexing one layer of a stacked weight)."""
    gone = tuple(d % lora.w.ndim for d in params["dimensions"])
    stack, fan_in, fan_out = lora.layout
    if not set(gone) <= set(stack):
        return None
    positions = [stack.index(d) for d in gone]  # the same positions lead A and B
    a, b = jnp.squeeze(lora.a, positions), jnp.squeeze(lora.b, positions)
    renumber = lambda axes: tuple(i - sum(d < i for d in gone) for i in axes if i not in gone)
    layout = Layout(renumber(stack), renumber(fan_in), renumber(fan_out))
    w = prim.squeeze_p.bind(lora.w, **params)
    return lora._replace(w=w, a=a, b=b, layout=layout)


def reshape(params: dict[str, Any], lora: LoraValue) -> Any:
    """A reshape that splits or merges axes within the stack, fan-in and fan-out groups.

    The weight's axes must come in contiguous runs by role, each run in the order
    the factors hold it; the new shape must cut into the same runs.
    """
    if params.get("dimensions") is not None:
        return None
    runs = _role_runs(lora.layout)
    if runs is None:
        return None
    new_shape = tuple(params["new_sizes"])
    groups = _cut(new_shape, [math.prod(lora.w.shape[i] for i in axes) for _, axes in runs])
    if groups is None:
        return None
    new_axes, start = {}, 0
    for (role, _), dims in zip(runs, groups):
        new_axes[role] = tuple(range(start, start + len(dims)))
        start += len(dims)
    layout = Layout(new_axes.get("stack", ()), new_axes.get("in", ()), new_axes.get("out", ()))
    dims_of = lambda role: [new_shape[i] for i in new_axes.get(role, ())]
    a = lora.a.reshape(dims_of("stack") + dims_of("in") + [lora.a.shape[-1]])
    b = lora.b.reshape(dims_of("stack") + [lora.a.shape[-1]] + dims_of("out"))
    return lora._replace(w=prim.reshape_p.bind(lora.w, **params), a=a, b=b, layout=layout)


def _role_runs(layout: Layout) -> list[tuple[str, tuple[int, ...]]] | None:
    roles = layout.roles()
    runs: list[tuple[str, list[int]]] = []
    for axis, role in enumerate(roles):
        if runs and runs[-1][0] == role:
            runs[-1][1].append(axis)
        else:
            runs.append((role, [axis]))
    by_role = dict(zip(("stack", "in", "out"), layout))
    if len({r for r, _ in runs}) != len(runs):
        return None  # a role split in two runs
    if any(tuple(axes) != by_role[role] for role, axes in runs):
        return None  # the factors hold this run in another order
    return [(role, tuple(axes)) for role, axes in runs]


def _cut(shape: tuple[int, ...], products: list[int]) -> list[tuple[int, ...]] | None:
    """Cuts ``shape`` into consecutive groups of the given products; trailing 1s join the last."""
    groups, i = [], 0
    for target in products:
        group, prod = [], 1
        while prod < target and i < len(shape):
            group.append(shape[i])
            prod *= shape[i]
            i += 1
        if prod != target:
            return None
        groups.append(group)
    if any(d != 1 for d in shape[i:]) or not groups:
        return None
    groups[-1] += list(shape[i:])
    return [tuple(g) for g in groups]
