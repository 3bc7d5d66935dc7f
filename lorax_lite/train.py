"""Compiled training steps that update only the adapters: one device, `jax.pmap`, or a mesh.

All three builders share one update: gradients of the loss with respect to the trainable
partition only (the frozen base is closed over and never differentiated), averaged over
micro-batches and devices, then one optimizer step. They give the same numbers for the same data.
A step whose loss or gradients hold NaN or inf is reported in the metrics and, by default,
skipped: the adapters and the optimizer state stay as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from .distributed import is_main_process
from .optim import optimizer
from .quant import QuantizedWeight
from .targets import named_leaves
from .trees import TrainState, combine, partition

logger = logging.getLogger("lorax_lite")

LossFn = Callable[[Any, Any, jax.Array], Any]


class TrainStep(NamedTuple):
    """A pair of functions: ``init(tree, key) -> state`` and ``step(state, batch)``.

    ``step(state, batch) -> (state, metrics)`` runs one compiled update; ``metrics``
    holds ``"loss"``, ``"grad_norm"``, ``"nonfinite"`` (a bool: the loss or a gradient
    held NaN or inf), ``"skipped"`` (a bool: the update was not applied) and the loss
    function's aux, if any, as device arrays, so reading them is the only host
    synchronisation.
    ``step.lower(state, batch)`` lowers the compiled update without running it.
    """

    init: Callable[[Any, jax.Array], TrainState]
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]


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
        donate: donate the step counter, trainable partition, optimizer state and key
            to the update, so they are updated in place (the frozen base is never
            donated, and `init` copies what it donates).
        accum_steps: split the batch's leading axis into this many micro-batches
            (``lax.scan``) and average their gradients: the same update as the whole
            batch at once, with the activation memory of one micro-batch. Micro-batch
            ``i`` takes rows ``i, i + accum_steps, ...``.
        remat: wrap ``loss_fn`` in ``jax.checkpoint`` (recompute activations in the
            backward pass instead of storing them).
        skip_nonfinite: when the loss or any gradient is NaN or inf, keep the adapters
            and the optimizer state as they were (the step counter still advances) and
            report ``"skipped"``; with False such an update is applied (NaN spreads into
            the adapters). ``"nonfinite"`` is reported either way.

    Returns:
        `TrainStep` ``(init, step)``; ``step`` compiles once per batch shape.

    Raises:
        ValueError: if ``accum_steps < 1``; at the first step, if a batch leaf's leading
            axis is not divisible by ``accum_steps`` (naming every such leaf).

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
    update = _make_update(
        loss_fn, tx, accum_steps=accum_steps, remat=remat, skip_nonfinite=skip_nonfinite
    )
    jitted = jax.jit(update, donate_argnums=(0,) if donate else ())
    init = functools.partial(_init_state, tx=tx)
    return TrainStep(init, _stepper(jitted))


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
        ValueError: if ``accum_steps < 1``.

    Example:
        >>> init, step = ll.pmap_train_step(loss_fn, optax.adam(1e-2))  # doctest: +SKIP
        >>> state = init(lora_params, jax.random.key(0))  # doctest: +SKIP
        >>> batch = ll.shard_batch(batch, jax.local_device_count())  # doctest: +SKIP
        >>> state, metrics = step(state, batch)  # doctest: +SKIP
    """
    tx = optimizer(tx)
    update = _make_update(
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
        return replicate(_init_state(tree, key, tx=tx), devices, axis_name=axis_name)

    return TrainStep(init, _stepper(mapped, finish_metrics=unreplicate))


def sharded_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    data_axis: str = "data",
    base_sharding: str = "replicated",
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """The training step as one program over a device mesh (``jax.jit`` with shardings).

    The batch is split over ``data_axis``; adapters, optimizer state, step and key
    are replicated; the frozen base is replicated or FSDP-sharded (see `place`). XLA
    inserts the collectives; the result equals `train_step` on the whole batch. The
    mesh may span several processes (after `lorax_lite.distributed.initialize`):
    each process then passes its own rows of the global batch.

    Args:
        loss_fn: as for `train_step`, on the global batch.
        tx: as for `train_step`.
        mesh: the device mesh, e.g. ``jax.make_mesh((2, 4), ("data", "model"))``.
        data_axis: the mesh axis the batch is split over.
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
        places the batch (host arrays are split over ``data_axis``; with several
        processes, each passes its local rows) and returns replicated metrics.

    Raises:
        ValueError: if ``data_axis`` is not a mesh axis, ``base_sharding`` is unknown or
            ``accum_steps < 1``.

    Example:
        >>> mesh = jax.make_mesh((8,), ("data",))  # doctest: +SKIP
        >>> init, step = ll.sharded_train_step(loss_fn, tx, mesh=mesh)  # doctest: +SKIP
        >>> state, metrics = step(init(lora_params, jax.random.key(0)), batch)  # doctest: +SKIP
    """
    _check_layout(mesh, data_axis, base_sharding)
    tx = optimizer(tx)
    update = _make_update(
        loss_fn, tx, accum_steps=accum_steps, remat=remat, skip_nonfinite=skip_nonfinite
    )
    replicated = NamedSharding(_auto_axes(mesh), PartitionSpec())
    jitted = jax.jit(update, out_shardings=replicated, donate_argnums=(0,) if donate else ())
    on_mesh = functools.partial(place, mesh=mesh, data_axis=data_axis, base_sharding=base_sharding)

    def init(tree: Any, key: jax.Array) -> TrainState:
        return on_mesh(_init_state(tree, key, tx=tx))[0]

    return TrainStep(init, _stepper(jitted, prepare=on_mesh))


def _auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in Auto mode: XLA chooses the collectives, so a model
    written without sharding annotations runs unchanged (`jax.make_mesh` defaults to
    Explicit axes, where a matmul with an FSDP-sharded weight is a type error)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _check_layout(mesh: Mesh, data_axis: str, base_sharding: str) -> None:
    problems = []
    if data_axis not in mesh.axis_names:
        problems.append(f"data_axis {data_axis!r} is not a mesh axis {mesh.axis_names}")
    if base_sharding not in ("replicated", "fsdp"):
        problems.append(f"base_sharding must be 'replicated' or 'fsdp', got {base_sharding!r}")
    if problems:
        raise ValueError("sharded_train_step: " + "; ".join(problems))


def _init_state(tree: Any, key: jax.Array, *, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state; the trainable leaves and the key are copies, so donating them
    leaves the caller's tree and key intact."""
    trainable, frozen = partition(tree)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    key = jnp.copy(key)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), key)


def _stepper(
    compiled: Callable,
    *,
    prepare: Callable | None = None,
    finish_metrics: Callable | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """The public ``step``: passes the frozen base beside the donated state, so the base
    is never donated or copied, and puts it back into the new state."""

    def arguments(state: TrainState, batch: Any) -> tuple[TrainState, Any, Any]:
        if prepare is not None:
            state, batch = prepare(state, batch)
        return dataclasses.replace(state, frozen=None), state.frozen, batch

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        updated, metrics = compiled(*arguments(state, batch))
        if finish_metrics is not None:
            metrics = finish_metrics(metrics)
        return dataclasses.replace(updated, frozen=state.frozen), metrics

    step.lower = lambda state, batch: compiled.lower(*arguments(state, batch))
    return step


def _make_update(
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
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")
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
        nonfinite = jnp.logical_not(_all_finite((loss, grads)))
        skipped = nonfinite if skip_nonfinite else jnp.zeros((), bool)
        trainable, opt_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(skipped, old, new),
            (state.trainable, state.opt_state),
            (trainable, opt_state),
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        metrics.update(nonfinite=nonfinite, skipped=skipped)
        return TrainState(state.step + 1, trainable, None, opt_state, state.key), metrics

    return update


def _all_finite(tree: Any) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is free of NaN and inf (a bool scalar)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


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


def _check_leading_axis(batch: Any, n: int, what: str) -> None:
    """Raises naming every batch leaf whose leading axis ``what`` (``n``) does not divide."""
    bad = [
        f"{path or '<batch>'}: shape {np.shape(x)}"
        for path, x in named_leaves(batch)
        if np.ndim(x) == 0 or np.shape(x)[0] % n
    ]
    if bad:
        raise ValueError(
            f"{what} must divide the leading (batch) axis of every batch leaf; these do "
            "not:\n  " + "\n  ".join(bad)
        )


def _micro_batches(batch: Any, accum_steps: int) -> Any:
    """Each leaf ``(n, ...)`` as ``(accum_steps, n // accum_steps, ...)``, micro-batch ``i``
    holding rows ``i, i + accum_steps, ...``: with the batch split over devices in
    contiguous blocks, every micro-batch takes rows from every device's block, so each
    device keeps computing on its own rows."""
    _check_leading_axis(batch, accum_steps, f"accum_steps={accum_steps}")

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def replicate(
    tree: Any, devices: list[jax.Device] | None = None, *, axis_name: str = "batch"
) -> Any:
    """Each leaf copied to every device, stacked on a new leading device axis.

    Built on the sharding APIs (``jax.make_array_from_single_device_arrays``); the
    result is what ``jax.pmap`` takes for an argument held by every device. Every
    leaf is copied, also one already laid out this way.

    Args:
        tree: a pytree of arrays (or numbers).
        devices: the devices (default: all local devices).
        axis_name: the name of the mesh axis the result is sharded over (use
            ``pmap``'s ``axis_name``).

    Returns:
        The same tree, each leaf of shape ``(len(devices), *leaf.shape)``.

    Example:
        >>> replicate({"w": jnp.ones(3)})["w"].shape == (jax.local_device_count(), 3)
        True
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), PartitionSpec(axis_name))

    def put(x: Any) -> jax.Array:
        x = jnp.asarray(x)[None]
        shards = [jax.device_put(x, device) for device in devices]
        return jax.make_array_from_single_device_arrays(
            (len(devices), *x.shape[1:]), sharding, shards
        )

    return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of each leaf of a `replicate`\\ d (or ``pmap``-output) tree.

    Args:
        tree: a pytree whose leaves have a leading device axis.

    Returns:
        The same tree without the device axis; no host transfer.

    Example:
        >>> unreplicate(replicate({"w": jnp.ones(3)}))["w"].shape
        (3,)
    """

    def first(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return x.addressable_shards[0].data[0]
        return x[0]

    return jax.tree_util.tree_map(first, tree)


def shard_batch(batch: Any, n: int) -> Any:
    """Reshapes each leaf's leading axis ``(m, ...)`` to ``(n, m // n, ...)`` for ``pmap``.

    Args:
        batch: a pytree of arrays sharing a leading batch axis.
        n: the number of devices.

    Returns:
        The reshaped tree; device ``i`` gets rows ``i * m // n`` to ``(i + 1) * m // n``.

    Raises:
        ValueError: naming every leaf whose leading axis is not divisible by ``n``.

    Example:
        >>> shard_batch(np.zeros((8, 3)), 4).shape
        (4, 2, 3)
    """
    _check_leading_axis(batch, n, f"shard_batch: the device count {n}")
    return jax.tree_util.tree_map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)


def place(
    state: TrainState,
    batch: Any = None,
    *,
    mesh: Mesh,
    data_axis: str = "data",
    base_sharding: str = "replicated",
) -> tuple[TrainState, Any]:
    """Puts a state (and a batch) on ``mesh`` the way `sharded_train_step` expects them.

    Leaves already placed are left as they are, so calling this every step is cheap.
    Every process must pass the same state (e.g. built from the same base and key).

    Args:
        state: a `TrainState` (on the host, one device, or already on the mesh).
        batch: optional pytree of arrays with a leading batch axis, split over
            ``data_axis``; with several processes, each passes its own rows (see
            ``jax.make_array_from_process_local_data``).
        mesh: the device mesh.
        data_axis: the mesh axis the batch is split over.
        base_sharding: ``"replicated"`` or ``"fsdp"``: each frozen leaf split along its
            largest axis divisible by the number of mesh devices, over all mesh axes
            (leaves with no such axis stay replicated). A `QuantizedWeight`'s codes,
            scales and offsets are split along one and the same axis, never the
            in-block one, so each device holds whole blocks with their scales.

    Returns:
        ``(state, batch)`` on the mesh: adapters, optimizer state, step and key replicated.

    Raises:
        ValueError: for an unknown mesh axis or ``base_sharding``; in one process, naming
            every batch leaf whose leading axis the data axis does not divide.

    Example:
        >>> mesh = jax.make_mesh((8,), ("data",))  # doctest: +SKIP
        >>> state, batch = place(state, batch, mesh=mesh, base_sharding="fsdp")  # doctest: +SKIP
    """
    _check_layout(mesh, data_axis, base_sharding)
    mesh = _auto_axes(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    base = (
        (lambda x: _fsdp_sharding(x, mesh)) if base_sharding == "fsdp" else (lambda x: replicated)
    )
    is_quantized = lambda x: isinstance(x, QuantizedWeight)
    shardings = dataclasses.replace(
        jax.tree_util.tree_map(lambda x: replicated, state),
        frozen=jax.tree_util.tree_map(base, state.frozen, is_leaf=is_quantized),
    )
    if jax.process_count() == 1:
        state = jax.device_put(state, shardings)
    else:
        state = jax.tree_util.tree_map(_put_global, state, shardings)
    if batch is not None:
        batch = _place_batch(batch, NamedSharding(mesh, PartitionSpec(data_axis)))
    return state, batch


def _fsdp_sharding(x: Any, mesh: Mesh) -> NamedSharding | QuantizedWeight:
    """Split along the largest axis divisible by the mesh size, over all mesh axes.

    A `QuantizedWeight` gets a `QuantizedWeight` of shardings: its codes, scales and
    offsets split along the same axis of ``data``, never the in-block axis (a block and
    its scale stay on one device; the scales have size 1 there, so it could not split
    them alike).
    """
    if isinstance(x, QuantizedWeight):
        in_block = x.data.ndim + x.axis
        spec = _fsdp_spec(x.data.shape, mesh, exclude=in_block)
        sharding = NamedSharding(mesh, spec)
        offsets = None if x.offsets is None else sharding
        return dataclasses.replace(x, data=sharding, scales=sharding, offsets=offsets)
    return NamedSharding(mesh, _fsdp_spec(np.shape(x), mesh))


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, *, exclude: int | None = None) -> PartitionSpec:
    """The spec splitting the largest axis (not ``exclude``) the mesh size divides; ``P()``
    if there is none."""
    divisible = [i for i in range(len(shape)) if shape[i] % mesh.size == 0 and i != exclude]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = tuple(mesh.axis_names)
    return PartitionSpec(*spec)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x``, the same value in every process, on a sharding spanning processes: each
    process fills its own devices' shards from its copy (``jax.device_put`` would refuse
    committed arrays and compare every leaf across processes)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place_batch(batch: Any, sharding: NamedSharding) -> Any:
    if jax.process_count() == 1:
        n = sharding.mesh.shape[sharding.spec[0]]
        _check_leading_axis(batch, n, f"the data axis ({n} devices)")

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(put, batch)


def fit(
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]],
    state: TrainState,
    batches: Iterable[Any],
    *,
    steps: int,
    eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    tokens_per_batch: int | None = None,
    log_every: int = 10,
    desc: str = "train",
    max_consecutive_nonfinite: int | None = 5,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Runs ``steps`` training steps with a progress bar; returns the state and a history.

    The host reads the metrics only every ``log_every`` steps (and at the first, last
    and eval steps), so the device runs ahead in between. The bar (loss, tokens/s) and
    warnings show on process 0 only; every process must call `fit` with its own batches.

    Steps whose loss or gradients are NaN or inf are skipped by the library's steps
    (``skip_nonfinite=True``, their default): their history entries say
    ``"skipped": True`` and `fit` warns with their count at the end. After
    ``max_consecutive_nonfinite`` such steps in a row, `fit` raises (at the host read
    that sees them).

    Args:
        step: a step function, e.g. ``ll.train_step(...).step``.
        state: the state to start from.
        batches: an iterable of batches; training stops early (with a warning) if it
            runs out.
        steps: the number of steps to take.
        eval_fn: ``eval_fn(state) -> dict`` of scalars, called every ``eval_every``
            steps; its results enter that step's history entry prefixed ``"eval_"``.
        eval_every: steps between evaluations (0: never).
        tokens_per_batch: tokens (or examples) per batch, for the throughput figure.
        log_every: steps between host reads of the metrics.
        desc: the progress bar's label.
        max_consecutive_nonfinite: how many steps in a row may have a non-finite loss
            or gradients (the ``"nonfinite"`` metric, else a non-finite ``"loss"``)
            before `fit` stops; None never stops.

    Returns:
        ``(state, history)``: one dict per step with ``step`` (the state's step count
        after it), ``loss``, ``grad_norm``, ``nonfinite``, ``skipped``, other scalar
        metrics, ``tokens_per_s`` (measured over the steps since the previous host
        read, so the first entry includes compilation; None without
        ``tokens_per_batch``) and eval results.

    Raises:
        NonFiniteError: after ``max_consecutive_nonfinite`` non-finite steps in a row,
            naming them; its ``state`` and ``history`` are those `fit` would have
            returned (the state passed in was donated to the steps).
        ValueError: if ``max_consecutive_nonfinite`` is not None or an int >= 1.

    Example:
        >>> init, step = ll.train_step(loss_fn, optax.adam(1e-3))  # doctest: +SKIP
        >>> state, history = ll.fit(step, init(tree, key), batches, steps=100)  # doctest: +SKIP
    """
    limit = max_consecutive_nonfinite
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"max_consecutive_nonfinite must be None or an int >= 1, got {limit!r}")
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    run: list[int] = []  # the steps of the current run of non-finite steps

    def read(pending: list[dict[str, Any]]) -> None:
        """Records the pending metrics; raises once a run of non-finite steps is too long."""
        nonlocal run
        _record(
            history,
            pending,
            first_step=first_step,
            tokens=tokens_per_batch,
            started=started,
            bar=bar,
        )
        run, too_long = _nonfinite_run(history[-len(pending) :], run, limit)
        if too_long:
            bar.close()
            raise NonFiniteError(_nonfinite_message(run, history, limit), state, history)

    first_step = int(_host_value(state.step))
    iterator = iter(batches)
    bar = tqdm(total=steps, desc=desc, disable=not is_main_process(), dynamic_ncols=True)
    started = time.perf_counter()
    for done in range(1, steps + 1):
        batch = next(iterator, _END)
        if batch is _END:
            if is_main_process():
                logger.warning("fit: the batches ran out after %d of %d steps", done - 1, steps)
            break
        state, metrics = step(state, batch)
        pending.append(metrics)
        evaluate = bool(eval_fn and eval_every and done % eval_every == 0)
        if done in (1, steps) or done % log_every == 0 or evaluate:
            read(pending)
            pending = []
            if evaluate:
                results = eval_fn(state)
                history[-1].update({f"eval_{k}": _host_value(v) for k, v in results.items()})
            started = time.perf_counter()
    if pending:  # the batches ran out between host reads
        read(pending)
    bar.close()
    _warn_skipped(history)
    return state, history


_END = object()


class NonFiniteError(FloatingPointError):
    """`fit` met too many steps in a row whose loss or gradients were NaN or inf.

    Attributes:
        state: the training state when `fit` stopped (skipped steps changed no adapter).
        history: the history up to that point.
    """

    def __init__(self, message: str, state: TrainState, history: list[dict[str, Any]]):
        super().__init__(message)
        self.state = state
        self.history = history


def _nonfinite_run(
    entries: list[dict[str, Any]], run: list[int], limit: int | None
) -> tuple[list[int], bool]:
    """The run of non-finite steps after ``entries`` (continuing ``run``), and whether it
    reached ``limit`` (then the run is the one that did)."""
    for entry in entries:
        nonfinite = entry.get("nonfinite", not np.isfinite(entry.get("loss", 0.0)))
        run = [*run, entry["step"]] if nonfinite else []
        if limit is not None and len(run) >= limit:
            return run, True
    return run, False


def _nonfinite_message(run: list[int], history: list[dict[str, Any]], limit: int) -> str:
    first, last = run[0], run[-1]
    if all(h.get("skipped") for h in history if first <= h["step"] <= last):
        effect = "their updates were skipped (they changed no adapter)"
    else:
        effect = "their updates were applied (a step built with skip_nonfinite=False)"
    return (
        f"fit: steps {first} to {last} ({len(run)} in a row, max_consecutive_nonfinite="
        f"{limit}) had a NaN or inf loss or gradients; {effect}. Check the batches for "
        "NaN/inf and the learning rate; the exception's state and history attributes hold "
        "where training stopped."
    )


def _warn_skipped(history: list[dict[str, Any]]) -> None:
    skipped = [h["step"] for h in history if h.get("skipped")]
    if skipped and is_main_process():
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        logger.warning(
            "fit: skipped %d of %d updates with a NaN or inf loss or gradients (steps %s)",
            len(skipped),
            len(history),
            shown,
        )


def _record(
    history: list[dict[str, Any]],
    pending: list[dict[str, Any]],
    *,
    first_step: int,
    tokens: int | None,
    started: float,
    bar: tqdm,
) -> None:
    """Reads the pending steps' metrics on the host into ``history``; updates the bar.

    Throughput counts from ``started`` to the completion of the last pending step.
    """
    jax.block_until_ready(pending[-1])
    rate = None if tokens is None else tokens * len(pending) / (time.perf_counter() - started)
    for metrics in pending:
        scalars = {k: _host_value(v) for k, v in metrics.items() if np.size(v) == 1}
        history.append({"step": first_step + len(history) + 1, **scalars, "tokens_per_s": rate})
    shown = {"loss": f"{history[-1]['loss']:.4g}"}
    if rate is not None:
        shown["tok/s"] = f"{rate:.4g}"
    bar.set_postfix(shown, refresh=False)
    bar.update(len(pending))


def _host_value(x: Any) -> Any:
    """A size-1 (or replicated) array's value as a Python scalar, read from this
    process's first shard, so it works for arrays spanning processes."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return np.asarray(x).reshape(-1)[0].item()
