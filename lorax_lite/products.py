"""Products with a lazy LoRA operand, without forming ``w + scale * A @ B``.

``dot_general`` computes ``x.w + scale * ((drop(x).A).B)`` for any dimension numbers,
``conv_general_dilated`` ``conv(x, w) + scale * (conv(drop(x), A)).B``, ``gather`` (an
embedding lookup) ``w[i] + scale * A[i] @ B``, and ``ragged_dot`` (a grouped
mixture-of-experts matmul) two ragged dots through the per-expert factors. A DoRA value
scales the output units by ``m / ||w + scale * A @ B||``, the norm from the factors.
Each returns ``None`` where it has no low-rank form.
"""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import views
from .lazy import Context, LoraValue, dropout
from .structural import sorted_groups
from .weight import Layout, spread


def dot_general(
    eqn: Any, lhs: Any, rhs: Any, key: jax.Array | None, ctx: Context | None = None
) -> jax.Array | None:
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
    shared_axes = dict(zip((*w_contract, *w_batch), (*x_contract, *x_batch)))
    w_spec = [
        x_spec[shared_axes[i]] if i in shared_axes else next(letters) for i in range(lora.w.ndim)
    ]
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
    kept_axes = iter(i for i in range(len(shape)) if i not in dims.collapsed_slice_dims)
    batch_iter = iter(batch)
    out = "".join(
        w_spec[next(kept_axes)] if k in dims.offset_dims else next(batch_iter)
        for k in range(base.ndim)
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
