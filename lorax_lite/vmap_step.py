"""`vmap_train_step`: every adapter of a set trained at once over one shared frozen base."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from .adapter_set import AdapterSet
from .checks import raise_problems
from .optim import optimizer
from .step import CompiledStep, LossFn, TrainStep, init_state, make_update
from .trees import TrainState, combine
from .weight import LoraWeight, Trainable, is_node


def vmap_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    batch_axis: int | None = None,
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """All adapters of a set trained at once, side by side, over one frozen base.

    `ll.train_step`'s update under ``jax.vmap`` over the adapter axis: each adapter takes
    the steps it would take alone, with its own factors, optimizer state and key; the
    base is shared and never differentiated.

    Args:
        loss_fn: as for `ll.train_step`: ``loss_fn(tree, batch, key)`` on one adapter.
        tx: a plain optax optimizer (wrapped with `ll.optimizer`).
        batch_axis: ``None``: every adapter trains on the same batch; an int: the
            batch leaves hold one batch per adapter along this axis.
        donate: donate the stacked state (not the base) to the update.
        accum_steps: as for `ll.train_step`.
        remat: as for `ll.train_step`.
        skip_nonfinite: as for `ll.train_step`, per adapter: an adapter whose loss or
            gradients are NaN or inf keeps its factors and optimizer state; the
            others take their step.

    Returns:
        `TrainStep` ``(init, step)``: ``init(adapters, keys)`` takes an `AdapterSet` (or
        ``{name: tree}``, made one with `AdapterSet.from_trees`) and one key per adapter
        (shape ``(n,)``) and returns a `TrainState` whose ``trainable``, ``opt_state``,
        ``key`` and ``step`` have a leading adapter axis (the base in ``frozen`` has none);
        ``step(state, batch) -> (state, metrics)`` with per-adapter metrics.
        ``adapters.with_trainable(state.trainable)`` puts the trained factors back into
        the set.

    Raises:
        ValueError: if ``accum_steps < 1``; from ``init``, if the adapters' scales differ
            at a leaf (each would need its own static scale), if any adapter is padded
            (training would fill the padding), the keys are not one per adapter, or
            nothing trains.
        TypeError: if ``skip_nonfinite`` is not a bool; from ``init``, if ``adapters`` is
            neither an `AdapterSet` nor a mapping.

    Example:
        >>> init, step = vmap_train_step(loss_fn, optax.adam(1e-3))  # doctest: +SKIP
        >>> state = init(adapters, jax.random.split(key, len(adapters)))  # doctest: +SKIP
        >>> state, metrics = step(state, batch)  # metrics["loss"]: one per adapter
        ...                                                       # doctest: +SKIP
    """
    tx = optimizer(tx)
    update = make_update(
        loss_fn, tx, accum_steps=accum_steps, remat=remat, skip_nonfinite=skip_nonfinite
    )
    # One update per adapter; the frozen base (the second argument) is shared, not mapped.
    mapped = jax.vmap(update, in_axes=(0, None, batch_axis))
    jitted = jax.jit(mapped, donate_argnums=(0,) if donate else ())
    init_one = functools.partial(init_state, tx=tx, caller="vmap_train_step")

    def init(adapters: AdapterSet | Mapping[str, Any], keys: jax.Array) -> TrainState:
        adapters = _as_adapter_set(adapters)
        _check_trainable_set(adapters, keys)
        tree = combine(adapters.stacked, adapters.frozen)
        state_axes = TrainState(0, 0, None, 0, 0)  # type: ignore[arg-type]  # vmap axes
        in_axes = (_adapter_axes(tree), 0)
        return jax.vmap(init_one, in_axes=in_axes, out_axes=state_axes)(tree, keys)

    return TrainStep(init, CompiledStep(jitted))


def _as_adapter_set(adapters: Any) -> AdapterSet:
    """An `AdapterSet`, or ``{name: LoRA tree}`` made one (as `combine_adapters` takes)."""
    if isinstance(adapters, AdapterSet):
        return adapters
    if isinstance(adapters, Mapping):
        return AdapterSet.from_trees(adapters)
    raise TypeError(
        "vmap_train_step.init takes an AdapterSet or a mapping {name: LoRA tree}, got "
        f"{type(adapters).__name__}"
    )


def _check_trainable_set(adapters: AdapterSet, keys: jax.Array) -> None:
    problems = [
        f"{path}: scales {sorted({s[k] for s in adapters.scales})} differ"
        for k, path in enumerate(adapters.lora_paths)
        if len({s[k] for s in adapters.scales}) > 1
    ]
    if problems:
        problems.append("(give the adapters equal alpha / rank to train them side by side)")
    # Training would fill the zero padding: a rank-2 adapter would come back rank 4.
    problems += [
        f"{name}: {path} is padded from rank {r} to {full} (train adapters of equal ranks "
        "on the same leaves)"
        for name, leaves in adapters.padding.items()
        for path, (r, full) in leaves.items()
    ]
    if np.shape(keys) != (len(adapters),):
        problems.append(f"keys of shape {np.shape(keys)}, expected ({len(adapters)},)")
    raise_problems("vmap_train_step.init", problems)


def _adapter_axes(tree: Any) -> Any:
    """``in_axes`` for a LoRA tree whose factors and trained values carry the adapter axis."""

    def axes(node):
        if isinstance(node, LoraWeight):
            return dataclasses.replace(node, w=None, a=0, b=0)
        return Trainable(0) if isinstance(node, Trainable) else None

    return jax.tree_util.tree_map(axes, tree, is_leaf=is_node)
