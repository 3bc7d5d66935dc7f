"""Structural ops of a lazy LoRA weight (casts, transposes, reshapes, slices, splits,
broadcasts): the result is a new `LoraValue` whose factors (and DoRA magnitude) follow
the op; ``None`` where the op does not keep the weight's low-rank form."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import views
from .lazy import LoraValue
from .weight import Layout


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
    assert view.start is not None and view.limit is not None  # a static slice
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
