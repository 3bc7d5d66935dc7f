"""Per-example serving: every example of a batch runs with its own adapter, in one call.

`route` wraps a model function like `ll.lora` does, taking an `AdapterSet` (or
`AdapterSlots`, for a server that swaps adapters) and one adapter id per example: the
base product stays one matmul over the batch, the adapter path becomes batched matmuls
over each example's factors, gathered where they are used (see
`AdapterSet.per_example`). A decode step maps a key/value cache whose examples are on
another axis through ``in_axes`` and ``out_axes``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .adapter_set import AdapterSet
from .slots import AdapterSlots
from .transform import lora

Axes = Any  # an int, None, or a pytree prefix of ints and Nones, as jax.vmap takes


def route(fn: Callable, *, strict: bool = False, in_axes: Axes = 0, out_axes: Axes = 0) -> Callable:
    """Makes ``fn`` run each example of a batch with its own adapter, in one call.

    The routed function takes an `AdapterSet` and an ``adapter_ids`` vector (one id
    per example; ``-1``: the base model). Under ``jax.vmap`` over the examples, each
    example gets its adapter's factors (gathered by id where each is used: inside a
    scan over layers, one layer per step) while the base weights stay unbatched: the
    base product stays one matmul over the whole batch and the adapter path becomes
    batched matmuls. No loop over adapters, no sub-batching.

    Args:
        fn: the model function ``fn(params, *batch, **kwargs)``, e.g. ``model.apply``;
            it sees each example as a batch of one (a size-1 axis where its examples
            were), and its outputs must keep that axis (per-example outputs, not a
            batch mean).
        strict: as for `ll.lora`.
        in_axes: where each ``batch`` argument holds the examples, as ``jax.vmap``'s
            ``in_axes`` for ``batch`` (``None``: shared by every example, e.g. a decode
            position); a key/value cache ``(layers, batch, ...)`` maps on axis 1.
        out_axes: where each output holds the examples, as ``jax.vmap``'s.

    Returns:
        ``routed(adapters, adapter_ids, *batch, dropout_key=None, **kwargs)``: every
        mapped ``batch`` leaf has the examples on its ``in_axes`` axis; keyword
        arguments are passed to every example unbatched; with a ``dropout_key``, each
        example draws its own masks. Returns ``fn``'s outputs stacked over the examples
        on ``out_axes``. ``adapters`` is an `AdapterSet` or an `AdapterSlots` (ids are
        slots). Under ``jax.jit`` the ids are traced and cannot be checked: an id
        outside ``[-1, len(adapters))`` makes that example's output NaN.

    Raises:
        TypeError: from ``routed``, for ids that are not integers.
        ValueError: from ``routed``, for ids that are not one per example (a vector as
            long as every batch leaf's leading axis), or concrete ids out of range.

    Example:
        >>> routed = jax.jit(route(model.apply))  # doctest: +SKIP
        >>> logits = routed(adapters, jnp.array([0, 2, -1, 0]), tokens)  # doctest: +SKIP
        >>> step = jax.jit(route(model.apply, in_axes=(0, 1, None), out_axes=(0, 1)))
        ...                                                      # doctest: +SKIP
        >>> logits, cache = step(slots, ids, tokens, cache, start, method="decode")
        ...                                                      # doctest: +SKIP
    """
    apply = lora(fn, strict=strict)

    def one_example(kwargs, tree, batch_of_one, key):
        return apply(tree, *batch_of_one, dropout_key=key, **kwargs)

    @functools.wraps(fn)
    def routed(
        adapters: AdapterSet,
        adapter_ids: jax.Array,
        *batch: Any,
        dropout_key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        if not isinstance(adapters, AdapterSet | AdapterSlots):
            raise TypeError(
                f"routed: expected an AdapterSet or AdapterSlots, got {type(adapters).__name__}"
            )
        axes = _batch_axes(in_axes, batch)
        ids = _check_ids(adapter_ids, batch, axes, len(adapters))
        keys = None if dropout_key is None else jax.random.split(dropout_key, ids.shape[0])
        # The factors stay stacked, each example holding its index (Gathered): gathered
        # where used, per layer inside a scan, never every layer's up front. The keyword
        # arguments are closed over: kwargs may hold Python values (flags) that the
        # model branches on.
        # Each example keeps a size-1 axis where its examples were: the axis is split
        # (examples, 1) before the map and merged after it, reshapes that move no data
        # (an expand_dims/squeeze inside the map would move the examples' axis first:
        # a transpose of a whole key/value cache every call).
        tree, tree_axes = adapters.per_example(ids)
        mapped = jax.vmap(
            functools.partial(one_example, kwargs),
            in_axes=(tree_axes, axes, 0),
            out_axes=out_axes,
        )
        out = mapped(tree, _at_axes(_split, axes, batch), keys)
        return _at_axes(_merge, out_axes, out)

    return routed


def _batch_axes(in_axes: Axes, batch: tuple) -> tuple:
    """``in_axes`` as one prefix per ``batch`` argument."""
    if in_axes is None or isinstance(in_axes, int):
        return (in_axes,) * len(batch)
    axes = tuple(in_axes)
    if len(axes) != len(batch):
        raise ValueError(f"in_axes has {len(axes)} entries for {len(batch)} batch arguments")
    return axes


def _is_axis(x: Any) -> bool:
    return x is None or isinstance(x, int)


def _at_axes(fn: Callable, axes: Axes, tree: Any) -> Any:
    """``fn(leaf, axis)`` for every leaf of ``tree`` under a mapped axis of the prefix
    ``axes`` (leaves under ``None`` as they are)."""
    on_leaves = lambda axis, sub: (
        sub if axis is None else jax.tree_util.tree_map(lambda x: fn(x, axis), sub)
    )
    return jax.tree_util.tree_map(on_leaves, axes, tree, is_leaf=_is_axis)


def _mapped_leaves(axes: Axes, tree: Any) -> list[tuple[Any, int]]:
    """``(leaf, axis)`` for every leaf of ``tree`` under a mapped axis of the prefix ``axes``."""
    treedef = jax.tree_util.tree_structure(axes, is_leaf=_is_axis)
    flat = treedef.flatten_up_to  # type: ignore[attr-defined]  # not in jaxlib's stubs
    pairs = zip(flat(axes), flat(tree))
    leaves = jax.tree_util.tree_leaves
    return [(x, axis) for axis, sub in pairs if axis is not None for x in leaves(sub)]


def _axis_size(x: Any, axis: int) -> int | str:
    """The size of ``x``'s ``axis``, or what is wrong with it."""
    shape = np.shape(x)
    return shape[axis] if -len(shape) <= axis < len(shape) else f"no axis {axis} in {shape}"


def _split(x: Any, axis: int) -> jax.Array:
    """``x`` with its ``axis`` of size ``n`` reshaped to ``(n, 1)`` (``(1, n)`` for a
    negative ``axis``: ``n`` stays at index ``axis``)."""
    x = jnp.asarray(x)
    at, n = axis % x.ndim, x.shape[axis]
    return x.reshape(x.shape[:at] + ((1, n) if axis < 0 else (n, 1)) + x.shape[at + 1 :])


def _merge(x: jax.Array, axis: int) -> jax.Array:
    """``x`` with the examples' axis ``n`` (``vmap``'s ``out_axes=axis``) and the size-1
    axis beside it reshaped to ``n``."""
    axis %= x.ndim - 1
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _check_ids(adapter_ids: Any, batch: tuple, axes: tuple, n: int) -> jax.Array:
    """``adapter_ids`` as int32, checked: a vector, one per example, in ``[-1, n)`` if concrete."""
    ids = jnp.asarray(adapter_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"adapter_ids must be integers, got dtype {ids.dtype}")
    sizes = {_axis_size(x, axis) for x, axis in _mapped_leaves(axes, batch)}
    if ids.ndim != 1 or sizes - {ids.shape[0]}:
        raise ValueError(
            f"adapter_ids must be a vector with one id per example; got shape {ids.shape} "
            f"for batch leaves with sizes {sorted(sizes, key=str)} on their mapped axes"
        )
    if not isinstance(ids, jax.core.Tracer):
        concrete = np.asarray(ids)
        bad = np.unique(concrete[(concrete < -1) | (concrete >= n)])
        if bad.size:
            raise ValueError(f"adapter_ids {bad.tolist()} outside [-1, {n}) (-1: the base model)")
    return ids.astype(jnp.int32)
