"""Per-primitive rules for a weight carried lazily as ``w + scale * A @ B``.

`LoraValue` is what `lorax_lite.transform` keeps in its environment in place of a
`LoraWeight`. `RULES` maps a first-order primitive's name to its rule, each called
the one way the evaluator calls every rule, ``rule(eqn, operands, ctx)``, and
returning the equation's outputs as a list without forming the dense
``w + scale * A @ B``:

* ``dot_general``: ``x.w + scale * ((drop(x).A).B)``, for any dimension numbers.
* ``conv_general_dilated``: ``conv(x, w) + scale * (conv(drop(x), A)).B``.
* ``gather`` (embedding lookup): ``w[i] + scale * A[i] @ B``.
* ``ragged_dot`` (grouped mixture-of-experts matmul): two ragged dots through the
  per-expert ``A`` and ``B``, with the same group sizes.
* structural ops (casts, transposes, reshapes, slices, splits, broadcasts) and
  copies, placements and sharding constraints return a new `LoraValue`.

A DoRA value (with a magnitude ``m``) scales the products' output units by
``m / ||w + scale * A @ B||``, the norm taken from the factors (`weight.factored_squares`).
``m`` follows the structural ops like a factor with the axes ``(stack..., fan_out...)``;
an op that changes the fan-in extent (a slice of rows) would change the norm, and
falls back to the dense weight.

A rule returns ``None`` when it does not apply; the evaluator then materializes.
A quantized operand reaches a first-order rule dequantized (inside the compiled
function); a product with a quantized operand runs under `jax.checkpoint` on the codes
(`_product`), and a float cast of a quantized weight retypes it (`_cast`), so the backward
pass dequantizes again instead of keeping each layer's weight in float; a float cast of a
LoRA weight's plain base waits for its product the same way (`Cast`). The functions
named after the primitives (`dot_general`, `reshape`...) compute one equation each; `RULES`
calls them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core.primitives as prim
import jax.numpy as jnp
from jax import lax

from . import views
from .quant import QuantizedWeight
from .weight import (
    Cast,
    Layout,
    LoraWeight,
    factored_squares,
    magnitude_ratio,
    spread,
    stored_value,
)


class LoraValue(NamedTuple):
    """A weight held lazily inside the evaluator, with the leaf path it came from."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float
    layout: Layout
    dropout: float
    path: str
    m: jax.Array | None = None
    detach_norm: bool = True

    def materialize(self) -> jax.Array:
        """``w + scale * A @ B`` (with DoRA, times ``m / norm``), accumulated in float32,
        in ``w``'s dtype."""
        node = LoraWeight(stored_value(self.w), self.a, self.b, self.scale, self.layout,
                          m=self.m, detach_norm=self.detach_norm)  # fmt: skip
        return node.materialize()

    def magnitude_ratio(self) -> jax.Array:
        """DoRA's ``m / ||w + scale * A @ B||``, float32, ``(stack..., fan_out...)``; the
        norm from the factors, a constant for differentiation if ``detach_norm``."""
        squares = factored_squares(self.w, self.a, self.b, self.scale, self.layout)
        return magnitude_ratio(self.m, squares, self.detach_norm)

    def map_m(self, fn: Any) -> LoraValue:
        """The value with ``fn`` applied to ``m`` (nothing to do without DoRA)."""
        return self if self.m is None else self._replace(m=fn(self.m))

    def fan_in_size(self) -> int:
        """The number of fan-in entries per output unit (what DoRA's norm sums over)."""
        return math.prod(self.w.shape[i] for i in self.layout.fan_in)


def dequantized(x: Any) -> Any:
    """``x`` with a quantized weight (itself, or a LoRA weight's base) dequantized and a
    LoRA weight's deferred `Cast` applied."""
    if isinstance(x, LoraValue):
        return x._replace(w=stored_value(x.w))
    return stored_value(x)


class Context:
    """What every rule is called with besides the equation and its operands: the
    dropout key, strictness, and the ``(primitive, path)`` pairs already warned
    about by this wrapped function."""

    def __init__(self, key: jax.Array | None, strict: bool, warned: set[tuple[str, str]]):
        self.key, self.strict, self.warned, self.sites = key, strict, warned, 0
        self._shared: dict[tuple, tuple[Any, Any]] = {}

    def shared(self, fn: Callable, x: Any, *static: Any) -> Any:
        """``fn(x, *static)``, computed once per traced value ``x`` in this block.

        Products of one input (q, k and v of one hidden state) then read one prepared
        copy of it, which the backward pass of a scan keeps once per layer, not once per
        product.
        """
        key = (id(x), fn, static)
        hit = self._shared.get(key)
        if hit is None or hit[0] is not x:  # an id is only unique while its object lives
            hit = self._shared[key] = (x, fn(x, *static))
        return hit[1]

    def next_key(self) -> jax.Array | None:
        """A fresh key for the next adapter site or nested block (None without dropout)."""
        if self.key is None:
            return None
        self.sites += 1
        return jax.random.fold_in(self.key, self.sites)

    def child(self, key: jax.Array | None) -> Context:
        """The context of a nested block (a loop body, a branch) drawing from ``key``."""
        return Context(key, self.strict, self.warned)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter input; identity without a key or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dot_general(
    eqn: Any, lhs: Any, rhs: Any, key: jax.Array | None, ctx: Context | None = None
) -> jax.Array:
    """``dot_general`` with a `LoraValue` on one side, any contracting/batch dims.

    The low-rank term is two small contractions: the input meets ``A`` first when
    the product contracts fan-in axes (``x @ W``), ``B`` first when it contracts
    fan-out axes (``x @ W.T``, a tied embedding head). Products of the same input
    share its prepared copy (`Context.shared`).
    """
    on_right = isinstance(rhs, LoraValue)
    lora, x = (rhs, lhs) if on_right else (lhs, rhs)
    dot = views.dot(eqn)
    (contract_l, contract_r), (batch_l, batch_r) = dot.contract, dot.batch
    x_contract, w_contract = (contract_l, contract_r) if on_right else (contract_r, contract_l)
    x_batch, w_batch = (batch_l, batch_r) if on_right else (batch_r, batch_l)

    letters = iter(string.ascii_letters)
    x_spec = [next(letters) for _ in range(x.ndim)]
    w_spec = [None] * lora.w.ndim
    for xi, wi in zip((*x_contract, *x_batch), (*w_contract, *w_batch)):
        w_spec[wi] = x_spec[xi]
    w_spec = [s or next(letters) for s in w_spec]
    rank = next(letters)
    batch = [x_spec[i] for i in x_batch]
    x_free = [s for s in x_spec if s not in w_spec]
    w_free = [s for i, s in enumerate(w_spec) if i not in (*w_contract, *w_batch)]
    out = batch + (x_free + w_free if on_right else w_free + x_free)
    ratio = None
    if lora.m is not None:
        # DoRA scales the weight's output units: the product's output where they are
        # free, its input where they are contracted (``x @ W.T``).
        m_spec = [w_spec[i] for i in lora.layout.magnitude_axes()]
        if set(m_spec) <= set(out):
            ratio = (lora.magnitude_ratio(), m_spec, out)
        elif set(m_spec) <= set(x_spec):
            x = _scaled(x, spread(lora.magnitude_ratio(), m_spec, x_spec))
        else:
            return None
    # One buffer for both products. Without the barrier XLA may fuse x's producer (a
    # norm, an activation) into each product's input separately and compute it twice:
    # under `route` the adapter path's input is batched per example, so it has another
    # shape than the base product's, and the producer was duplicated (experiments/bench/
    # NOTES.md, routing).
    shared = ctx.shared if ctx is not None else lambda fn, x, *static: fn(x, *static)
    x = shared(jax.lax.optimization_barrier, x)
    base = views.bind(eqn, (x, lora.w) if on_right else (lora.w, x))
    x = dropout(x, lora.dropout, key)
    x, x_spec = _merge_free_axes(x, x_spec, x_batch, x_contract, next(letters), shared)
    x_free = [s for s in x_spec if s not in w_spec]
    out = batch + (x_free + w_free if on_right else w_free + x_free)

    a_spec, b_spec = (
        [rank if i is None else w_spec[i] for i in axes] for axes in lora.layout.factor_axes()
    )
    first, second = (lora.a, a_spec), (lora.b, b_spec)
    _, fan_in, fan_out = lora.layout
    if not set(w_contract) & set(fan_in) and set(w_contract) & set(fan_out):
        first, second = second, first
    keep = set(second[1]) | set(out)
    t_spec = [s for s in dict.fromkeys(x_spec + first[1]) if s in keep]

    dtype = lora.w.dtype
    options = dict(precision=dot.precision, preferred_element_type=dot.preferred_element_type)
    t = _einsum(x_spec, first[1], t_spec, x, first[0].astype(dtype), **options)
    t = t * jnp.asarray(lora.scale, t.dtype)
    delta = _einsum(t_spec, second[1], out, t, second[0].astype(dtype), **options)
    y = base + delta.reshape(base.shape).astype(base.dtype)
    return y if ratio is None else _scaled(y, spread(*ratio))


def _scaled(y: jax.Array, ratio: jax.Array) -> jax.Array:
    """``y * ratio`` computed in float32 (DoRA's ``m / norm``), in ``y``'s dtype."""
    return (y.astype(jnp.float32) * ratio).astype(y.dtype)


def ragged_dot(
    eqn: Any,
    x: jax.Array,
    lora: LoraValue,
    group_sizes: jax.Array,
    key: jax.Array | None,
    ctx: Context | None = None,
) -> jax.Array | None:
    """``ragged_dot``/``ragged_dot_general`` of grouped rows with a LoRA expert stack.

    The weight's group axis is its stacked axis (one adapter per expert), its
    contracted axes fan-in, the rest fan-out: ``(E, d_in, d_out)`` with ``A`` of
    ``(E, d_in, r)`` and ``B`` of ``(E, r, d_out)``. The adapter path is two ragged
    dots with the same group sizes, ``ragged(ragged(drop(x), A), B)``, so no
    per-expert ``(E, d_in, d_out)`` delta is formed. Returns None (the evaluator then
    materializes) for other forms: rows ragged along a contracted axis, batch axes,
    a ``group_offset``.
    """
    view = views.ragged_dot(eqn)
    (x_contract, w_contract), batch = view.dot.contract, view.dot.batch
    lora = sorted_groups(lora)
    stack, fan_in, _ = lora.layout
    ragged_rows = len(view.lhs_ragged) == 1 and view.lhs_ragged[0] not in x_contract
    if (
        view.group_offset is not None
        or batch != ((), ())
        or not ragged_rows
        or stack != view.rhs_group
        or set(w_contract) != set(fan_in)
    ):
        return None
    base = views.bind(eqn, [x, lora.w, group_sizes])
    (group,) = stack
    a_axes, b_axes = lora.layout.factor_axes()
    options = dict(
        precision=view.dot.precision, preferred_element_type=view.dot.preferred_element_type
    )
    dtype = lora.w.dtype
    numbers = lax.RaggedDotDimensionNumbers(
        ((x_contract, tuple(a_axes.index(i) for i in w_contract)), ((), ())),
        view.lhs_ragged,
        (a_axes.index(group),),
    )
    x = dropout(x, lora.dropout, key)
    t = lax.ragged_dot_general(x, lora.a.astype(dtype), group_sizes, numbers, **options)
    t = t * jnp.asarray(lora.scale, t.dtype)
    # t holds x's free axes in order, then the rank; its rows stay grouped as x's.
    x_free = [i for i in range(x.ndim) if i not in x_contract]
    numbers = lax.RaggedDotDimensionNumbers(
        (((t.ndim - 1,), (b_axes.index(None),)), ((), ())),
        (x_free.index(view.lhs_ragged[0]),),
        (b_axes.index(group),),
    )
    delta = lax.ragged_dot_general(t, lora.b.astype(t.dtype), group_sizes, numbers, **options)
    return base + delta.astype(base.dtype)


def _merge_free_axes(x, x_spec, x_batch, x_contract, letter, shared) -> tuple[jax.Array, list[str]]:
    """``x`` with its free axes (neither batch nor contracted) merged into one, ``letter``.

    Laid out as ``(batch..., free, contract...)``. The adapter path then contracts
    one free axis: the gradients of ``A`` and ``B`` sum over a single axis, which
    XLA:CPU computes several times faster than a sum over two (batch and sequence).
    The free axes keep their order, so the output reshapes back to the base's.
    """
    free = [i for i in range(x.ndim) if i not in (*x_batch, *x_contract)]
    if len(free) < 2:
        return x, x_spec
    x = shared(_merged, x, tuple(x_batch), tuple(free), tuple(x_contract))
    return x, [x_spec[i] for i in x_batch] + [letter] + [x_spec[i] for i in x_contract]


def _merged(x: jax.Array, batch: tuple, free: tuple, contract: tuple) -> jax.Array:
    x = jnp.transpose(x, (*batch, *free, *contract))
    nb, nf = len(batch), len(free)
    return x.reshape(*x.shape[:nb], math.prod(x.shape[nb : nb + nf]), *x.shape[nb + nf :])


def _einsum(s1, s2, s_out, x, y, **options) -> jax.Array:
    return jnp.einsum(f"{''.join(s1)},{''.join(s2)}->{''.join(s_out)}", x, y, **options)


def conv(
    eqn: Any, x: jax.Array, lora: LoraValue, key: jax.Array | None, ctx: Context | None = None
) -> Any:
    """``conv_general_dilated`` with a LoRA kernel: ``A`` is a conv to ``r`` channels,
    ``B`` a 1x1 map from ``r`` to the output channels (as PEFT's Conv LoRA)."""
    view = views.conv(eqn)
    out_axis, in_axis, *spatial = view.kernel_spec
    stack, fan_in, fan_out = lora.layout
    if view.grouped or stack or fan_out != (out_axis,) or set(fan_in) != {in_axis, *spatial}:
        return None
    base = views.bind(eqn, [x, lora.w])
    # A is (fan_in..., r); lay it out as a kernel with r output channels.
    to_a = [len(fan_in) if i == out_axis else fan_in.index(i) for i in range(lora.w.ndim)]
    kernel_a = jnp.transpose(lora.a.astype(lora.w.dtype), to_a)
    y = views.bind(eqn, [dropout(x, lora.dropout, key), kernel_a])
    y = y * jnp.asarray(lora.scale, y.dtype)
    feature = view.out_feature
    delta = jnp.moveaxis(jnp.tensordot(y, lora.b.astype(y.dtype), ((feature,), (0,))), -1, feature)
    out = base + delta.astype(base.dtype)
    if lora.m is None:
        return out
    spec = list(range(out.ndim))  # the ratio's one axis is the output feature axis
    return _scaled(out, spread(lora.magnitude_ratio(), [feature], spec))


def gather(
    eqn: Any, lora: LoraValue, indices: jax.Array, key: jax.Array | None, ctx: Context | None = None
) -> Any:
    """A lookup of single entries along fan-in, fan-out or stacked axes, other axes whole.

    Fan-in lookups (an embedding table) are ``w[i] + scale * drop(A[i]) @ B``: a
    lookup is a product with a one-hot input, whose dropout keeps or drops each looked-up
    entry's adapter row whole (PEFT's embeddings take no dropout). Fan-out lookups
    gather ``B`` alike, without dropout. Lookups of stacked axes (an expert table
    indexed by a router) gather both factors and return a `LoraValue` whose new stacked
    axes are the index batch axes (the product that uses it drops its input).
    """
    view = views.gather(eqn)
    dims = view.dimension_numbers
    indexed = tuple(dims.start_index_map)
    shape, sizes = lora.w.shape, view.slice_sizes
    whole = all(sizes[i] == (1 if i in indexed else shape[i]) for i in range(len(shape)))
    if dims.operand_batching_dims or not whole:
        return None
    stack, fan_in, fan_out = lora.layout
    a_axes, b_axes = lora.layout.factor_axes()
    base = views.bind(eqn, [lora.w, indices])
    if set(indexed) <= set(stack):
        a = _gather_factor(view, lora.a, a_axes, indices, base.ndim)
        b = _gather_factor(view, lora.b, b_axes, indices, base.ndim)
        lora = lora.map_m(
            lambda m: _gather_factor(view, m, lora.layout.magnitude_axes(), indices, base.ndim)
        )
        return lora._replace(w=base, a=a, b=b, layout=_gathered_layout(lora.layout, dims, base))
    if lora.m is not None:
        raise ValueError(
            f"{lora.path}: a DoRA weight (use_dora) is looked up by gather (an embedding "
            f"table, shape {tuple(shape)}), which has no norm per output unit; exclude it "
            "from the targets or adapt it without DoRA"
        )
    if set(indexed) <= set(fan_in):
        rows, rows_axes, other, other_axes = lora.a, a_axes, lora.b, b_axes
    elif set(indexed) <= set(fan_out):
        rows, rows_axes, other, other_axes = lora.b, b_axes, lora.a, a_axes
    else:
        return None
    rows = _gather_factor(view, rows.astype(lora.w.dtype), rows_axes, indices, base.ndim)
    # Letters: weight axis i is letters[i], the rank is "r", index batch axes follow.
    letters = iter(string.ascii_letters.replace("r", ""))
    w_spec = [next(letters) for _ in shape]
    spec = lambda axes: "".join("r" if i is None else w_spec[i] for i in axes)
    batch = [next(letters) for _ in range(base.ndim - len(dims.offset_dims))]
    if set(indexed) <= set(fan_in):  # one mask per looked-up entry
        kept = dropout(jnp.ones(rows.shape[: len(batch)], rows.dtype), lora.dropout, key)
        rows = rows * kept.reshape(kept.shape + (1,) * (rows.ndim - kept.ndim))
    rows_spec = "".join(batch) + spec(a for a in rows_axes if a not in dims.collapsed_slice_dims)
    kept = iter(i for i in range(len(shape)) if i not in dims.collapsed_slice_dims)
    batch_iter = iter(batch)
    out = "".join(
        w_spec[next(kept)] if k in dims.offset_dims else next(batch_iter) for k in range(base.ndim)
    )
    delta = jnp.einsum(f"{rows_spec},{spec(other_axes)}->{out}", rows, other.astype(rows.dtype))
    return base + (lora.scale * delta).astype(base.dtype)


def _gather_factor(view, factor, axes, indices, out_ndim) -> jax.Array:
    """The same lookup on a factor: its indexed axes are the weight's, the rank whole.

    The factor's kept axes go last, in the factor's order, after the index batch
    axes; out-of-bounds entries of a filling gather read zero (no adapter delta).
    """
    dims = view.dimension_numbers
    n_batch = out_ndim - len(dims.offset_dims)
    collapsed = tuple(sorted(axes.index(i) for i in dims.collapsed_slice_dims))
    factor_dims = dims._replace(
        offset_dims=tuple(range(n_batch, n_batch + factor.ndim - len(collapsed))),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(axes.index(i) for i in dims.start_index_map),
    )
    sizes = tuple(1 if i in dims.start_index_map else n for i, n in zip(axes, factor.shape))
    return lax.gather(
        factor,
        indices,
        factor_dims,
        sizes,
        mode=view.mode,
        fill_value=None if view.fill_value is None else 0,
        indices_are_sorted=view.indices_are_sorted,
        unique_indices=view.unique_indices,
    )


def _gathered_layout(layout: Layout, dims: Any, out: jax.Array) -> Layout:
    """The layout after looking up stacked axes: index batch axes lead the new stack."""
    kept = [i for i in range(sum(map(len, layout))) if i not in dims.collapsed_slice_dims]
    position = dict(zip(kept, dims.offset_dims))
    batch = tuple(k for k in range(out.ndim) if k not in dims.offset_dims)
    moved = lambda axes: tuple(position[i] for i in axes if i in position)
    return Layout(batch + moved(layout.stack), moved(layout.fan_in), moved(layout.fan_out))


# ----- structural ops: the result is still a LoraValue ------------------------------


def convert(eqn: Any, lora: LoraValue) -> LoraValue:
    """A cast of the weight casts the factors too, so the adapter computes in the model's dtype."""
    dtype = views.new_dtype(eqn)
    w = views.bind(eqn, [lora.w])
    return lora._replace(w=w, a=lora.a.astype(dtype), b=lora.b.astype(dtype))


def transpose(eqn: Any, lora: LoraValue) -> LoraValue:
    """Permutes the weight's axes; the factors keep theirs, the layout is renumbered."""
    perm = views.permutation(eqn)
    renumber = lambda axes: tuple(perm.index(i) for i in axes)
    layout = Layout(*(renumber(g) for g in lora.layout))
    return lora._replace(w=views.bind(eqn, [lora.w]), layout=layout)


def slice_any(eqn: Any, lora: LoraValue, *starts: Any) -> LoraValue:
    """``slice``/``dynamic_slice`` on any axes: each factor is cut along its own copies
    of the cut axes (a layer of a stack, rows of ``A``, columns of ``B``)."""
    a_axes, b_axes = lora.layout.factor_axes()
    view = views.slicing(eqn)
    w = views.bind(eqn, [lora.w, *starts])
    a = _slice_factor(view, lora.a, a_axes, starts)
    b = _slice_factor(view, lora.b, b_axes, starts)
    m_axes = lora.layout.magnitude_axes()
    return lora.map_m(lambda m: _slice_factor(view, m, m_axes, starts))._replace(w=w, a=a, b=b)


def _slice_factor(view: views.Slice, factor, axes, starts) -> jax.Array:
    if view.sizes is not None:  # dynamic_slice
        if all(i is None or view.sizes[i] == n for i, n in zip(axes, factor.shape)):
            return factor
        idx = [0 if i is None else starts[i] for i in axes]
        sizes = [n if i is None else view.sizes[i] for i, n in zip(axes, factor.shape)]
        return lax.dynamic_slice(factor, idx, sizes)
    strides = view.strides or (1,) * len(view.start)
    pick = lambda values, rank_value: [rank_value if i is None else values[i] for i in axes]
    start = pick(view.start, 0)
    limit = [n if i is None else view.limit[i] for i, n in zip(axes, factor.shape)]
    stride = pick(strides, 1)
    if start == [0] * factor.ndim and limit == list(factor.shape) and stride == [1] * factor.ndim:
        return factor
    return lax.slice(factor, start, limit, stride)


def split(eqn: Any, lora: LoraValue) -> list[LoraValue]:
    """``split`` along any axis (a fused QKV kernel): the factors holding it split alike."""
    axis, sizes = views.split(eqn)
    a_axes, b_axes = lora.layout.factor_axes()

    def pieces(factor, axes):
        if axis not in axes:
            return [factor] * len(sizes)
        return lax.split(factor, sizes, axis=axes.index(axis))

    ws = lax.split(lora.w, sizes, axis=axis)
    ms = [None] * len(sizes) if lora.m is None else pieces(lora.m, lora.layout.magnitude_axes())
    parts = zip(ws, pieces(lora.a, a_axes), pieces(lora.b, b_axes), ms)
    return [lora._replace(w=w, a=a, b=b, m=m) for w, a, b, m in parts]


def squeeze(eqn: Any, lora: LoraValue) -> LoraValue:
    """Drops size-1 axes of any role (one layer of a stack, one row of a table)."""
    gone = {d % lora.w.ndim for d in views.dimensions(eqn)}
    a_axes, b_axes = lora.layout.factor_axes()
    a = jnp.squeeze(lora.a, tuple(k for k, i in enumerate(a_axes) if i in gone))
    b = jnp.squeeze(lora.b, tuple(k for k, i in enumerate(b_axes) if i in gone))
    m_axes = lora.layout.magnitude_axes()
    lora = lora.map_m(lambda m: jnp.squeeze(m, tuple(k for k, i in enumerate(m_axes) if i in gone)))
    renumber = lambda axes: tuple(i - sum(d < i for d in gone) for i in axes if i not in gone)
    layout = Layout(*(renumber(g) for g in lora.layout))
    w = views.bind(eqn, [lora.w])
    return lora._replace(w=w, a=a, b=b, layout=layout)


def rev(eqn: Any, lora: LoraValue) -> LoraValue:
    """Reverses axes: each factor reverses its own copies of them."""
    flipped = set(views.dimensions(eqn))
    a_axes, b_axes = lora.layout.factor_axes()
    flip = lambda f, axes: lax.rev(f, tuple(k for k, i in enumerate(axes) if i in flipped))
    w = views.bind(eqn, [lora.w])
    lora = lora.map_m(lambda m: flip(m, lora.layout.magnitude_axes()))
    return lora._replace(w=w, a=flip(lora.a, a_axes), b=flip(lora.b, b_axes))


def broadcast(eqn: Any, lora: LoraValue) -> LoraValue:
    """``broadcast_in_dim``: new axes are stacked copies; size-1 axes expand in the
    factors that hold them."""
    shape, kept = views.broadcast(eqn)
    new = tuple(k for k in range(len(shape)) if k not in kept)
    lead = tuple(shape[k] for k in new)

    def expand(factor, axes):
        sizes = tuple(n if i is None else shape[kept[i]] for i, n in zip(axes, factor.shape))
        return jnp.broadcast_to(factor, lead + sizes)

    a_axes, b_axes = lora.layout.factor_axes()
    moved = lambda axes: tuple(kept[i] for i in axes)
    lora = lora.map_m(lambda m: expand(m, lora.layout.magnitude_axes()))
    layout = Layout(new + moved(lora.layout.stack), *(moved(g) for g in lora.layout[1:]))
    w = views.bind(eqn, [lora.w])
    return lora._replace(w=w, a=expand(lora.a, a_axes), b=expand(lora.b, b_axes), layout=layout)


def sorted_groups(lora: LoraValue) -> LoraValue:
    """The same value with each layout group in the weight's axis order (factors permuted)."""
    stack, fan_in, fan_out = lora.layout
    order = lambda group, at: [at + k for k in sorted(range(len(group)), key=group.__getitem__)]
    n = len(stack)
    a_perm = order(stack, 0) + order(fan_in, n) + [n + len(fan_in)]
    b_perm = order(stack, 0) + [n] + order(fan_out, n + 1)
    m_perm = order(stack, 0) + order(fan_out, n)
    permute = lambda f, perm: f if perm == sorted(perm) else jnp.transpose(f, perm)
    layout = Layout(*(tuple(sorted(g)) for g in lora.layout))
    lora = lora.map_m(lambda m: permute(m, m_perm))
    return lora._replace(a=permute(lora.a, a_perm), b=permute(lora.b, b_perm), layout=layout)


def reshape(eqn: Any, lora: LoraValue) -> LoraValue | None:
    """A reshape that splits or merges axes within the stack, fan-in and fan-out groups.

    The weight's axes must come in contiguous runs by role; the new shape must cut
    into the same runs. Factors are permuted first if they hold a run in another order.
    """
    new_shape, dims = views.reshape(eqn)
    if dims is not None:
        return None
    runs = _role_runs(lora.layout)
    if runs is None:
        return None
    groups = _cut(new_shape, [math.prod(lora.w.shape[i] for i in axes) for _, axes in runs])
    if groups is None:
        return None
    new_axes, start = {}, 0
    for (role, _), dims in zip(runs, groups):
        new_axes[role] = tuple(range(start, start + len(dims)))
        start += len(dims)
    layout = Layout(new_axes.get("stack", ()), new_axes.get("in", ()), new_axes.get("out", ()))
    lora = sorted_groups(lora)
    a_shape, b_shape = layout.factor_shapes(new_shape, lora.a.shape[-1])
    a, b = lora.a.reshape(a_shape), lora.b.reshape(b_shape)
    lora = lora.map_m(lambda m: m.reshape(layout.magnitude_shape(new_shape)))
    return lora._replace(w=views.bind(eqn, [lora.w]), a=a, b=b, layout=layout)


def _role_runs(layout: Layout) -> list[tuple[str, tuple[int, ...]]] | None:
    """The weight's axes as runs of one role each, or None if a role is split in two runs."""
    runs: list[tuple[str, list[int]]] = []
    for axis, role in enumerate(layout.roles()):
        if runs and runs[-1][0] == role:
            runs[-1][1].append(axis)
        else:
            runs.append((role, [axis]))
    if len({r for r, _ in runs}) != len(runs):
        return None
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


# ----- the registry: primitive name -> rule -----------------------------------------

Rule = Callable[[Any, list[Any], Context], list[Any] | None]
"""The one calling convention of every rule: ``rule(eqn, operands, ctx)`` returns the
equation's outputs as a list, or ``None`` where it has no low-rank form (the
evaluator then materializes the weight)."""


def _which_lazy(operands: list[Any]) -> tuple[bool, ...]:
    return tuple(isinstance(x, LoraValue) for x in operands)


def _first_order(rule: Rule) -> Rule:
    """``rule`` on dequantized operands; an equation left with no LoRA operand (a plain
    quantized weight) binds as it is."""

    @functools.wraps(rule)
    def run(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        operands = [dequantized(x) for x in operands]
        if not any(_which_lazy(operands)):
            return views.bind_results(eqn, operands)
        return rule(eqn, operands, ctx)

    return run


def _listed(out: Any) -> list[Any] | None:
    return out if out is None or isinstance(out, list) else [out]


def _product(op: Callable, *patterns: tuple[bool, ...], recompute: bool = True) -> Rule:
    """The rule of a product ``op(eqn, *operands, key, ctx)`` whose LoRA operands sit as
    one of ``patterns`` says; each site draws its own dropout key.

    With a quantized operand and ``recompute``, the product runs under `jax.checkpoint`
    with the codes as its inputs: the backward pass dequantizes the weight again instead
    of keeping it in float as a residual (per layer, under a scan), so a quantized base
    saves memory without the user's remat. ``recompute=False`` where the product's
    derivative does not read the weight (a gather's).
    """

    def rule(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        lazy = _which_lazy(operands)
        if any(lazy) and lazy not in patterns:
            return None
        dropout = any(lazy) and operands[lazy.index(True)].dropout
        key = ctx.next_key() if dropout else None

        run = _first_order(lambda eqn, ops, ctx: _listed(op(eqn, *ops, key, ctx)))
        if not (recompute and any(map(_recomputed, operands))):
            return run(eqn, operands, ctx)
        flat, rebuild = flatten_values(operands)
        return jax.checkpoint(lambda flat: run(eqn, rebuild(flat), ctx))(flat)

    return rule


def _recomputed(x: Any) -> bool:
    """Whether a product recomputes ``x``'s weight in the backward pass: a quantized
    weight, or a LoRA base with a deferred `Cast`."""
    w = x.w if isinstance(x, LoraValue) else x
    return isinstance(w, QuantizedWeight | Cast)


def flatten_values(
    values: Sequence[Any],
) -> tuple[list[Any], Callable[[Sequence[Any]], list[Any]]]:
    """LoRA values as ``(w, a, b, m)`` tuples (to pass through a traced function), and back."""
    meta = [
        v._replace(w=None, a=None, b=None, m=None) if isinstance(v, LoraValue) else None
        for v in values
    ]
    flat = [(v.w, v.a, v.b, v.m) if m else v for v, m in zip(values, meta)]

    def rebuild(arrays: Sequence[Any]) -> list[Any]:
        return [rebuilt_value(m, x) if m else x for x, m in zip(arrays, meta)]

    return flat, rebuild


def rebuilt_value(meta: LoraValue, parts: Sequence[Any]) -> LoraValue:
    """A LoRA value from its static part and its ``(w, a, b, m)`` arrays."""
    return meta._replace(w=parts[0], a=parts[1], b=parts[2], m=parts[3])


def _structural(op: Callable) -> Rule:
    """The rule of a structural op ``op(eqn, lora, *others)`` of the first operand,
    the only lazy one: the result stays lazy."""

    @_first_order
    def rule(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        if any(_which_lazy(operands)[1:]):
            return None
        return _listed(_same_norm(operands[0], op(eqn, *operands)))

    return rule


def _cast(rule: Rule) -> Rule:
    """``rule`` for a cast, except for a float cast of a weight that a product can
    recompute (see `_product`) instead of keeping the cast weight as a residual:

    * a quantized weight dequantizing to float32 (alone, or the base of a LoRA weight
      without DoRA) is retyped to dequantize to the new dtype: exact, since dequantizing
      computes in float32, so casting its float32 result and dequantizing to the new
      dtype round once alike;
    * the float base of a LoRA weight without DoRA (a bfloat16 base in a float32 model)
      becomes a `Cast`, applied where it is used.
    """

    def run(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        dtype = jnp.dtype(views.new_dtype(eqn))
        (x,) = operands
        w = x.w if isinstance(x, LoraValue) and x.m is None else x
        if not jnp.issubdtype(dtype, jnp.floating):
            return rule(eqn, operands, ctx)
        if isinstance(w, QuantizedWeight) and jnp.dtype(w.dtype) == jnp.float32:
            retyped = dataclasses.replace(w, dtype=dtype)
        elif w is not x and jnp.dtype(w.dtype) != dtype:
            retyped = Cast(stored_value(w), dtype)  # a cast of a `Cast` applies the first
        else:
            return rule(eqn, operands, ctx)
        if w is x:
            return [retyped]
        return [x._replace(w=retyped, a=x.a.astype(dtype), b=x.b.astype(dtype))]

    return run


def _same_norm(before: LoraValue, after: Any) -> Any:
    """A structural rule's result, or None (the dense fallback) where it would change a
    DoRA weight's norm: an op that cuts or repeats fan-in entries (slicing rows, say)
    acts on ``m * V / ||V||`` with the norm of the whole weight, which the cut value
    could not recompute."""
    if before.m is None or after is None:
        return after
    pieces = after if isinstance(after, list) else [after]
    return after if all(v.fan_in_size() == before.fan_in_size() for v in pieces) else None


@_first_order
def _per_component(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
    """A cast of placement, type or differentiability of one operand: applied to w, A,
    B (and m) alike."""
    if len(operands) != 1:
        return None
    one = lambda x: views.bind_results(eqn, [x])[0]
    lora = operands[0].map_m(one)
    return [lora._replace(w=one(lora.w), a=one(lora.a), b=one(lora.b))]


@_first_order
def _on_w_only(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
    """A sharding constraint: it places the weight; the small factors stay as they are."""
    (lora,) = operands
    return [lora._replace(w=views.bind(eqn, [lora.w]))]


RULES: dict[str, Rule] = {
    **dict.fromkeys(views.PASS_THROUGH, _per_component),
    prim.convert_element_type_p.name: _cast(_structural(convert)),
    prim.sharding_constraint_p.name: _on_w_only,
    prim.dot_general_p.name: _product(dot_general, (True, False), (False, True)),
    prim.conv_general_dilated_p.name: _product(conv, (False, True)),
    views.RAGGED_DOT: _product(ragged_dot, (False, True, False)),
    prim.gather_p.name: _product(gather, (True, False), recompute=False),
    prim.transpose_p.name: _structural(transpose),
    prim.reshape_p.name: _structural(reshape),
    prim.squeeze_p.name: _structural(squeeze),
    prim.rev_p.name: _structural(rev),
    prim.broadcast_in_dim_p.name: _structural(broadcast),
    prim.slice_p.name: _structural(slice_any),
    prim.dynamic_slice_p.name: _structural(slice_any),
    "split": _structural(split),  # no public primitive object
}
"""The first-order rules, by primitive name; `lorax_lite.transform` adds the
higher-order ones (calls, ``remat``, custom derivatives, loops, ``cond``)."""
