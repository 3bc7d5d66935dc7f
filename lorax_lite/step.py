"""Compiled training steps that update only the adapters: one device, `jax.pmap` or a mesh
(`lorax_lite.vmap_step`: every adapter of a set at once).

All builders share one update: gradients of the loss with respect to the trainable partition
only (the frozen base is passed beside the state and never differentiated or donated),
averaged over micro-batches and devices, then one optimizer step. They give the same numbers
for the same data. A step whose loss or gradients hold NaN or inf is reported in the metrics
and, by default, skipped: the adapters and the optimizer state stay as they were.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .checks import is_int
from .deprecation import renamed_keywords
from .optim import optimizer
from .placement import auto_axes, check_layout, check_leading_axis, place, replicate, unreplicate
from .trees import TrainState, combine, partition, require_trainable

LossFn = Callable[[Any, Any, jax.Array], Any]


class TrainStep(NamedTuple):
    """A pair of functions: ``init(tree, key) -> state`` and ``step(state, batch)``.

    ``step(state, batch) -> (state, metrics)`` runs one compiled update; ``metrics``
    holds ``"loss"``, ``"grad_norm"``, ``"nonfinite"`` (a bool: the loss or the gradients'
    norm is NaN or inf, so a gradient held NaN or inf, or overflowed the norm),
    ``"skipped"`` (a bool: the update was not applied) and the loss
    function's aux, if any, as device arrays, so reading them is the only host
    synchronisation.
    ``step.lower(state, batch)`` lowers the compiled update without running it
    (`~lorax_lite.step.CompiledStep`).
    """

    init: Callable[[Any, jax.Array], TrainState]
    step: CompiledStep


def train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """A jitted training step on one device.

    Args:
        loss_fn: ``loss_fn(tree, batch, key) -> loss`` or ``(loss, aux)``: ``tree`` is the
            full LoRA tree (call ``ll.lora(model.apply)(tree, ..., dropout_key=key)``),
            ``key`` a fresh PRNG key per step (and micro-batch). ``loss`` is a scalar mean
            over the batch; ``aux`` a dict of arrays merged into the metrics.
        tx: a plain optax optimizer, e.g. ``optax.adamw(1e-3)``; it is wrapped with
            `lorax_lite.optimizer` (one already wrapped works too: on the trainable
            partition every leaf is trained).
        donate: update the state in place (the frozen base is never donated; `init`
            copies what it donates).
        accum_steps: split the batch's leading axis into this many micro-batches (rows
            ``i, i + accum_steps, ...``) and average their gradients: the same update,
            with one micro-batch's activation memory.
        remat: wrap ``loss_fn`` in ``jax.checkpoint``.
        skip_nonfinite: when the loss or a gradient is NaN or inf, keep the adapters
            and optimizer state (the step counter advances) and report ``"skipped"``;
            False applies such an update.

    Returns:
        `TrainStep` ``(init, step)``; ``step`` compiles once per batch shape.

    Raises:
        ValueError: if ``accum_steps < 1``; from ``init``, if the tree has nothing to
            train (``ll.init`` not called); at the first step, if a batch leaf's leading
            axis is not divisible by ``accum_steps`` (naming every such leaf).
        TypeError: if ``skip_nonfinite`` is not a bool.

    Example:
        >>> def loss_fn(tree, batch, key):  # doctest: +SKIP
        ...     x, y = batch
        ...     pred = ll.lora(model.apply)(tree, x, dropout_key=key)
        ...     return jnp.mean((pred - y) ** 2)
        >>> init, step = ll.train_step(loss_fn, optax.adam(1e-2))  # doctest: +SKIP
        >>> state = init(lora_params, jax.random.key(0))  # doctest: +SKIP
        >>> state, metrics = step(state, (x, y))  # doctest: +SKIP
    """
    tx = optimizer(tx)
    update = make_update(
        loss_fn, tx, accum_steps=accum_steps, remat=remat, skip_nonfinite=skip_nonfinite
    )
    jitted = jax.jit(update, donate_argnums=(0,) if donate else ())
    init = functools.partial(init_state, tx=tx, caller="train_step")
    return TrainStep(init, CompiledStep(jitted))


def pmap_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    devices: list[jax.Device] | None = None,
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """The training step under ``jax.pmap``: each device takes a slice of the batch.

    Gradients, loss and float aux values are averaged over the devices with
    ``lax.pmean``, so every replica takes the same optimizer step, the one `train_step`
    takes on the whole batch. Each device draws its own dropout mask
    (``fold_in(key, axis_index)``).

    Args:
        loss_fn: as for `train_step`, on one device's slice of the batch.
        tx: as for `train_step`.
        axis_name: the name of the mapped device axis.
        devices: the devices to map over (default: all local devices).
        donate: as for `train_step`.
        accum_steps: as for `train_step`, per device.
        remat: as for `train_step`.
        skip_nonfinite: as for `train_step`; a NaN on one device skips the update on all.

    Returns:
        `TrainStep` ``(init, step)``: ``init`` returns a state replicated over the
        devices (leading device axis, see `replicate`); ``step`` takes a batch with a
        leading device axis (see `shard_batch`) and returns unreplicated metrics.

    Raises:
        ValueError: if ``accum_steps < 1``; from ``init``, as `train_step`'s.
        TypeError: if ``skip_nonfinite`` is not a bool.

    Example:
        >>> init, step = ll.pmap_train_step(loss_fn, optax.adam(1e-2))  # doctest: +SKIP
        >>> state = init(lora_params, jax.random.key(0))  # doctest: +SKIP
        >>> batch = ll.shard_batch(batch, jax.local_device_count())  # doctest: +SKIP
        >>> state, metrics = step(state, batch)  # doctest: +SKIP
    """
    tx = optimizer(tx)
    update = make_update(
        loss_fn,
        tx,
        accum_steps=accum_steps,
        remat=remat,
        skip_nonfinite=skip_nonfinite,
        axis_name=axis_name,
    )
    mapped = jax.pmap(
        update, axis_name=axis_name, devices=devices, donate_argnums=(0,) if donate else ()
    )

    def init(tree: Any, key: jax.Array) -> TrainState:
        state = init_state(tree, key, tx=tx, caller="pmap_train_step")
        return replicate(state, devices, axis_name=axis_name)

    return TrainStep(init, CompiledStep(mapped, finish_metrics=unreplicate))


@renamed_keywords(data_axis="axis_name")
def sharded_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    base_sharding: str = "replicated",
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """The training step as one program over a device mesh (``jax.jit`` with shardings).

    The batch is split over ``axis_name``; adapters, optimizer state, step and key
    are replicated; the frozen base is replicated or FSDP-sharded (see `place`). XLA
    inserts the collectives; the result equals `train_step` on the whole batch. The
    mesh may span several processes (after `lorax_lite.distributed.initialize`):
    each process then passes its own rows of the global batch.

    Args:
        loss_fn: as for `train_step`, on the global batch.
        tx: as for `train_step`.
        mesh: the device mesh, e.g. ``jax.make_mesh((2, 4), ("data", "model"))``.
        axis_name: the mesh axis the batch is split over (as `pmap_train_step`'s;
            ``data_axis=`` before, which warns ``DeprecationWarning``).
        base_sharding: ``"replicated"`` (each device holds the whole base) or
            ``"fsdp"`` (each leaf split along its largest axis divisible by the
            number of devices, over all mesh axes: 1/N of the base per device; a
            `QuantizedWeight` is split as one unit, see `place`).
        donate: as for `train_step`.
        accum_steps: as for `train_step`.
        remat: as for `train_step`.
        skip_nonfinite: as for `train_step`.

    Returns:
        `TrainStep` ``(init, step)``: ``init`` puts the state on the mesh; ``step``
        places the batch (host arrays are split over ``axis_name``; with several
        processes, each passes its local rows) and returns replicated metrics.

    Raises:
        ValueError: if ``axis_name`` is not a mesh axis, ``base_sharding`` is unknown or
            ``accum_steps < 1``; from ``init``, as `train_step`'s.
        TypeError: if ``skip_nonfinite`` is not a bool.

    Example:
        >>> mesh = jax.make_mesh((8,), ("data",))  # doctest: +SKIP
        >>> init, step = ll.sharded_train_step(loss_fn, tx, mesh=mesh)  # doctest: +SKIP
        >>> state, metrics = step(init(lora_params, jax.random.key(0)), batch)  # doctest: +SKIP
    """
    check_layout(mesh, axis_name, base_sharding, "sharded_train_step")
    tx = optimizer(tx)
    update = make_update(
        loss_fn, tx, accum_steps=accum_steps, remat=remat, skip_nonfinite=skip_nonfinite
    )
    replicated = NamedSharding(auto_axes(mesh), PartitionSpec())
    jitted = jax.jit(update, out_shardings=replicated, donate_argnums=(0,) if donate else ())
    on_mesh = functools.partial(place, mesh=mesh, axis_name=axis_name, base_sharding=base_sharding)

    def init(tree: Any, key: jax.Array) -> TrainState:
        return on_mesh(init_state(tree, key, tx=tx, caller="sharded_train_step"))[0]

    return TrainStep(init, CompiledStep(jitted, prepare=on_mesh))


def init_state(
    tree: Any, key: jax.Array, *, tx: optax.GradientTransformation, caller: str
) -> TrainState:
    """A fresh state; the trainable leaves and the key are copies, so donating them
    leaves the caller's tree and key intact. Raises if nothing in ``tree`` trains."""
    require_trainable(tree, f"{caller}.init")
    trainable, frozen = partition(tree)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    key = jnp.copy(key)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), key)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The ``step`` of a `TrainStep`: ``step(state, batch) -> (state, metrics)``.

    Passes the frozen base beside the donated state (so it is never donated or copied)
    and puts it back into the new state.

    Attributes:
        compiled: the jitted (or pmapped) update ``(state without base, base, batch)``.
        prepare: puts ``(state, batch)`` where ``compiled`` expects them, or None.
        finish_metrics: applied to the metrics before they are returned, or None.
    """

    compiled: jax.stages.Wrapped
    prepare: Callable | None = None
    finish_metrics: Callable | None = None

    def _arguments(self, state: TrainState, batch: Any) -> tuple[TrainState, Any, Any]:
        if self.prepare is not None:
            state, batch = self.prepare(state, batch)
        return dataclasses.replace(state, frozen=None), state.frozen, batch

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        """One update of ``state`` on ``batch``: ``(new state, metrics)``."""
        updated, metrics = self.compiled(*self._arguments(state, batch))
        if self.finish_metrics is not None:
            metrics = self.finish_metrics(metrics)
        return dataclasses.replace(updated, frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: Any) -> Any:
        """The update lowered for ``(state, batch)`` without running it (``jax.stages.Lowered``)."""
        return self.compiled.lower(*self._arguments(state, batch))


def make_update(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    accum_steps: int,
    remat: bool,
    skip_nonfinite: bool,
    axis_name: str | None = None,
) -> Callable:
    """``update(state_without_frozen, frozen, batch) -> (state_without_frozen, metrics)``,
    with ``tx`` already wrapped by `optimizer`.

    A non-finite update is undone with a select (``jnp.where``), not ``lax.cond`` (on GPU a
    conditional may wait for its predicate on the host) nor ``optax.apply_if_finite`` (it looks at
    the gradients only, applies the non-finite update after ``max_consecutive_errors``, and
    adds its counters to the optimizer state, whose structure checkpoints rely on).
    """
    if not is_int(accum_steps, 1):
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")
    accum_steps = int(accum_steps)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    loss_fn = jax.checkpoint(loss_fn) if remat else loss_fn

    def update(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        key = jax.random.fold_in(state.key, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        (loss, aux), grads = _gradients(loss_fn, state.trainable, frozen, batch, key, accum_steps)
        if axis_name is not None:
            loss, aux, grads = _float_mean(
                (loss, aux, grads), lambda x: jax.lax.pmean(x, axis_name)
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree.norm(grads)
        # One test on two scalars: NaN or inf in any gradient makes the norm NaN or inf. (A
        # stacked isfinite per leaf compiled 2.4x slower on a 10-layer unrolled model.)
        nonfinite = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        skipped = nonfinite if skip_nonfinite else jnp.zeros((), bool)
        trainable, opt_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(skipped, old, new),
            (state.trainable, state.opt_state),
            (trainable, opt_state),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        metrics.update(nonfinite=nonfinite, skipped=skipped)
        return TrainState(state.step + 1, trainable, None, opt_state, state.key), metrics

    return update


METRIC_NAMES = ("loss", "grad_norm", "nonfinite", "skipped")


def _gradients(
    loss_fn: LossFn, trainable: Any, frozen: Any, batch: Any, key: jax.Array, accum_steps: int
) -> tuple[tuple[jax.Array, dict[str, Any]], Any]:
    """``((loss, aux), grads)`` of the mean loss, w.r.t. ``trainable`` only."""

    def objective(trainable: Any, batch: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        out = loss_fn(combine(trainable, frozen), batch, key)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if not isinstance(aux, Mapping):
            raise TypeError(f"loss_fn's aux must be a dict of arrays, got {type(aux).__name__}")
        clashes = sorted(set(METRIC_NAMES) & set(aux))
        if clashes:
            raise ValueError(f"loss_fn's aux may not use the metric names {clashes}")
        return loss, dict(aux)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:
        return value_and_grad(trainable, batch, key)

    def accumulate(total: Any, inputs: tuple[jax.Array, Any]) -> tuple[Any, Any]:
        index, micro_batch = inputs
        out, grads = value_and_grad(trainable, micro_batch, jax.random.fold_in(key, index))
        return jax.tree_util.tree_map(jnp.add, total, grads), out

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    micro_batches = (jnp.arange(accum_steps), _micro_batches(batch, accum_steps))
    total, outs = jax.lax.scan(accumulate, zeros, micro_batches)
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, total)
    return _float_mean(outs, lambda x: x.mean(axis=0), last=True), grads


def _float_mean(tree: Any, mean: Callable, *, last: bool = False) -> Any:
    """``mean`` of every inexact leaf; other leaves kept (``last``: their last entry)."""

    def reduce(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return mean(x)
        return x[-1] if last else x

    return jax.tree_util.tree_map(reduce, tree)


def _micro_batches(batch: Any, accum_steps: int) -> Any:
    """Each leaf ``(n, ...)`` as ``(accum_steps, n // accum_steps, ...)``, micro-batch ``i``
    holding rows ``i, i + accum_steps, ...``: with the batch split over devices in
    contiguous blocks, every micro-batch takes rows from every device's block, so each
    device keeps computing on its own rows."""
    check_leading_axis(batch, accum_steps, f"accum_steps={accum_steps}")

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)
