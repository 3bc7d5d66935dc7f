"""Device placement: training states and batches laid out for ``jax.pmap`` or a device mesh.

`replicate`/`unreplicate` add and drop the leading device axis ``pmap`` takes, `shard_batch`
splits a batch's leading axis over the devices, and `place` puts a state and a batch on a
mesh: adapters, optimizer state, step and key replicated, the frozen base replicated or
FSDP-sharded, the batch split over the data axis (also across processes). `factor_shardings`
gives an adapter's factors shardings derived from its base weight's, so an adapter loaded onto a
sharded base is sharded the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .checks import raise_problems
from .deprecation import renamed_keywords
from .quant import QuantizedWeight, is_quantized
from .scales import QuantizedScales
from .targets import named_leaves
from .trees import TrainState
from .weight import Layout


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
    check_leading_axis(batch, n, f"shard_batch: the device count {n}")
    return jax.tree_util.tree_map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)


@renamed_keywords(data_axis="axis_name")
def place(
    state: TrainState,
    batch: Any = None,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    base_sharding: str = "replicated",
) -> tuple[TrainState, Any]:
    """Puts a state (and a batch) on ``mesh`` the way `sharded_train_step` expects them.

    Leaves already placed are left as they are, so calling this every step is cheap.
    Every process must pass the same state (e.g. built from the same base and key).

    Args:
        state: a `TrainState` (on the host, one device, or already on the mesh).
        batch: optional pytree of arrays with a leading batch axis, split over
            ``axis_name``; with several processes, each passes its own rows (see
            ``jax.make_array_from_process_local_data``).
        mesh: the device mesh.
        axis_name: the mesh axis the batch is split over (``data_axis=`` before: warns
            ``DeprecationWarning``).
        base_sharding: ``"replicated"``, or ``"fsdp"``: each frozen leaf split over all
            mesh axes along its largest axis the device count divides (else replicated);
            a `QuantizedWeight` keeps whole blocks with their scales on each device.

    Returns:
        ``(state, batch)`` on the mesh: adapters, optimizer state, step and key replicated.

    Raises:
        ValueError: for an unknown mesh axis or ``base_sharding``; in one process, naming
            every batch leaf whose leading axis the data axis does not divide.

    Example:
        >>> mesh = jax.make_mesh((8,), ("data",))  # doctest: +SKIP
        >>> state, batch = place(state, batch, mesh=mesh, base_sharding="fsdp")  # doctest: +SKIP
    """
    check_layout(mesh, axis_name, base_sharding, "place")
    mesh = auto_axes(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    base = (
        (lambda x: _fsdp_sharding(x, mesh)) if base_sharding == "fsdp" else (lambda x: replicated)
    )
    shardings = dataclasses.replace(
        jax.tree_util.tree_map(lambda x: replicated, state),
        frozen=jax.tree_util.tree_map(base, state.frozen, is_leaf=is_quantized),
    )
    if jax.process_count() == 1:
        state = jax.device_put(state, shardings)
    else:
        state = jax.tree_util.tree_map(_put_global, state, shardings)
    if batch is not None:
        batch = _place_batch(batch, NamedSharding(mesh, PartitionSpec(axis_name)))
    return state, batch


def _fsdp_sharding(x: Any, mesh: Mesh) -> NamedSharding | QuantizedWeight:
    """Split along the largest axis divisible by the mesh size, over all mesh axes.

    A `QuantizedWeight` gets a `QuantizedWeight` of shardings: its codes, scales and
    offsets split along the same axis of ``data``, never the in-block axis (a block and
    its scale stay on one device; the scales have size 1 there, so it could not split
    them alike). Double-quantized scales (`QuantizedScales`) split their codes so and
    replicate their factors and offsets (one per group of scales: small, and shaped
    unlike the codes).
    """
    if isinstance(x, QuantizedWeight):
        in_block = x.data.ndim + x.axis
        spec = _fsdp_spec(x.data.shape, mesh, exclude=in_block)
        sharding = NamedSharding(mesh, spec)
        replicated = NamedSharding(mesh, PartitionSpec())

        def like_blocks(s: Any) -> Any:
            if isinstance(s, QuantizedScales):
                offsets = None if s.offsets is None else replicated
                # The sharding tree of the scales: shardings where its fields hold arrays.
                shardings = dict(codes=sharding, factors=replicated, offsets=offsets)
                return dataclasses.replace(s, **shardings)  # type: ignore[arg-type]
            return None if s is None else sharding

        # A QuantizedWeight of shardings: the sharding tree of the weight's arrays.
        parts = dict(data=sharding, scales=like_blocks(x.scales), offsets=like_blocks(x.offsets))
        return dataclasses.replace(x, **parts)
    return NamedSharding(mesh, _fsdp_spec(np.shape(x), mesh))


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, *, exclude: int | None = None) -> PartitionSpec:
    """The spec splitting the largest axis (not ``exclude``) the mesh size divides; ``P()``
    if there is none."""
    divisible = [i for i in range(len(shape)) if shape[i] % mesh.size == 0 and i != exclude]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: shape[i])
    return PartitionSpec(
        *(tuple(mesh.axis_names) if i == axis else None for i in range(len(shape)))
    )


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
        check_leading_axis(batch, n, f"the data axis ({n} devices)")

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(put, batch)


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in Auto mode: XLA chooses the collectives, so a model
    written without sharding annotations runs unchanged (`jax.make_mesh` defaults to
    Explicit axes, where a matmul with an FSDP-sharded weight is a type error)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_layout(mesh: Mesh, axis_name: str, base_sharding: str, caller: str) -> None:
    """Raises naming ``caller`` (`sharded_train_step`, `place`) and every problem with
    its mesh layout."""
    problems = []
    if axis_name not in mesh.axis_names:
        problems.append(f"axis_name {axis_name!r} is not a mesh axis {mesh.axis_names}")
    if base_sharding not in ("replicated", "fsdp"):
        problems.append(f"base_sharding must be 'replicated' or 'fsdp', got {base_sharding!r}")
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))


def check_leading_axis(batch: Any, n: int, what: str) -> None:
    """Raises naming every batch leaf whose leading axis ``what`` (``n``) does not divide."""
    bad = [
        f"{path or '<batch>'}: shape {np.shape(x)}"
        for path, x in named_leaves(batch)
        if np.ndim(x) == 0 or np.shape(x)[0] % n
    ]
    raise_problems(
        f"{what} must divide the leading (batch) axis of every batch leaf; these do not", bad
    )


def factor_shardings(base: Any, layout: Layout) -> tuple[Any, Any, Any]:
    """Shardings for ``A``, ``B`` and DoRA's ``m`` derived from the base weight's sharding.

    A `NamedSharding` carries over axis by axis: ``A`` takes the weight's spec of
    the stacked and fan-in axes (rank axis unsharded), ``B`` and ``m`` that of the
    stacked and fan-out axes. A single-device base gives single-device factors; other
    multi-device shardings give factors replicated on the same devices.
    """
    sharding = getattr(base, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (base.ndim - len(sharding.spec))
        pick = lambda axes: PartitionSpec(*(None if i is None else spec[i] for i in axes))
        axes = (*layout.factor_axes(), layout.magnitude_axes())
        a, b, m = (NamedSharding(sharding.mesh, pick(x)) for x in axes)
        return a, b, m
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        single = same_shape_sharding(base)
        return single, single, single
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    replicated = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())
    return replicated, replicated, replicated


def same_shape_sharding(base: Any) -> Any:
    """The base leaf's sharding (for a value of its shape), or the default device."""
    sharding = getattr(base, "sharding", None)
    return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])
