"""Adapter checkpoints with orbax: small, self-describing, checked against their base.

`save_adapter` writes only the adapters (``a``, ``b``) and fully trained leaves,
with JSON metadata describing each adapter and fingerprinting the base it was
trained on; `load_adapter` rebuilds the LoRA tree on a base and refuses a base
that does not match. `TrainCheckpointer` saves and restores whole training
states (adapters, optimizer state, step, data position) asynchronously.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .config import LoraConfig
from .targets import named_leaves, path_str, unflatten
from .weight import Layout, LoraWeight, Trainable, is_lora_node

FORMAT = "lorax_lite.adapter"
FORMAT_VERSION = 1
# Each targeted base leaf is fingerprinted from about this many evenly strided elements.
HASH_SAMPLES = 4096


def save_adapter(
    path: str | pathlib.Path,
    tree: Any,
    config: LoraConfig,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the adapters and fully trained leaves of ``tree``, never the base.

    The directory holds an orbax checkpoint of every ``a``, ``b`` and `Trainable`
    value, and JSON metadata: the format version, ``config``, each adapter's path,
    base shape/dtype, rank, scale, axis roles and dropout, the trained paths, a
    fingerprint of the base (every leaf's path, shape and dtype, and a hash of a
    strided sample of each adapted weight), checksums of the saved arrays, the
    library and JAX versions, and ``metadata``. The write is atomic.

    In a multi-process run every process calls it with the same ``path`` and its
    copy of ``tree`` (arrays may span processes): orbax writes each array once and
    the metadata from process 0 alone.

    Args:
        path: the checkpoint directory to create.
        tree: a full LoRA tree (from `init` or `combine`), base weights included.
        config: the configuration the adapters were made with.
        metadata: optional JSON-serializable user data stored alongside.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute checkpoint path.

    Raises:
        ValueError: if ``tree`` holds no adapter or trained leaf, if some adapters
            lack their base weight (a trainable partition: save
            ``combine(trainable, frozen)``), or if ``path`` exists and ``overwrite``
            is False.
        TypeError: if ``config`` or ``metadata`` cannot be serialized to JSON.

    Example:
        >>> save_adapter("/tmp/run/adapter", lora_params, config)  # doctest: +SKIP
    """
    path = pathlib.Path(path).absolute()
    nodes = named_leaves(tree, is_leaf=is_lora_node)
    adapters = [(p, n) for p, n in nodes if isinstance(n, LoraWeight)]
    trained = [(p, n.value) for p, n in nodes if isinstance(n, Trainable)]
    if not adapters and not trained:
        raise ValueError("save_adapter: the tree holds no LoraWeight or Trainable leaf")
    no_base = [p for p, n in adapters if n.w is None or n.a is None or n.b is None]
    if no_base:
        raise ValueError(
            "save_adapter needs the full LoRA tree (base weights and factors) to fingerprint "
            f"the base; these adapters lack one: {no_base}"
        )
    arrays = {
        "adapters": [{"a": n.a, "b": n.b} for _, n in adapters],
        "trained": [v for _, v in trained],
    }
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "adapters": [_adapter_entry(p, n) for p, n in adapters],
        "trained": [{"path": p, **_array_entry(v)} for p, v in trained],
        "base": fingerprint(base_of(tree), [p for p, _ in adapters]),
        "versions": _versions(),
        "user": dict(metadata or {}),
    }
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        path,
        ocp.args.Composite(adapter=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(info)),
        force=overwrite,
    )
    return path


def _adapter_entry(path: str, node: LoraWeight) -> dict[str, Any]:
    return {
        "path": path,
        # The base weight's shape and dtype only: it is never copied to the host whole
        # (the fingerprint holds its cheap content hash).
        "shape": list(node.w.shape),
        "dtype": _dtype_name(node.w),
        "rank": node.rank,
        "scale": node.scale,
        "layout": list(node.layout.roles()),
        "dropout": node.dropout,
        "a": _array_entry(node.a),
        "b": _array_entry(node.b),
    }


def _array_entry(x: Any) -> dict[str, Any]:
    """Shape, dtype and a SHA-256 checksum of the bytes of ``x``."""
    host = _on_host(x)
    digest = hashlib.sha256(np.ascontiguousarray(host).tobytes()).hexdigest()
    return {"shape": list(host.shape), "dtype": str(host.dtype), "sha256": digest}


def _on_host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array; one spanning processes is gathered from all of them (a
    collective: every process must make the same calls in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _versions() -> dict[str, str]:
    from . import __version__

    return {"lorax_lite": __version__, "jax": jax.__version__, "orbax": ocp.__version__}


def base_of(tree: Any) -> Any:
    """The plain base tree: each `LoraWeight` replaced by ``w``, each `Trainable` unwrapped."""

    def unwrap(node):
        if isinstance(node, LoraWeight):
            return node.w
        return node.value if isinstance(node, Trainable) else node

    return jax.tree_util.tree_map(unwrap, tree, is_leaf=is_lora_node)


def fingerprint(base: Any, hashed: list[str]) -> dict[str, Any]:
    """Path, shape and dtype of every leaf of ``base``, and a content hash of the ``hashed``."""
    leaves = dict(named_leaves(base))
    return {
        "leaves": {p: [list(np.shape(x)), _dtype_name(x)] for p, x in leaves.items()},
        "hashes": {p: content_hash(leaves[p]) for p in hashed},
    }


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else str(np.asarray(x).dtype)


def content_hash(x: Any) -> str:
    """A cheap hash of an array: shape, dtype and an evenly strided sample of its elements.

    The sample is taken with one stride per axis, so a sharded array is never
    gathered whole. Two different weights (a fine-tuned base, another seed) differ
    in the sample unless they agree on every sampled element.
    """
    shape = tuple(np.shape(x))
    per_axis = math.ceil(HASH_SAMPLES ** (1 / max(len(shape), 1)))
    index = tuple(slice(None, None, max(1, math.ceil(d / per_axis))) for d in shape)
    sample = np.ascontiguousarray(_on_host(x[index] if shape else x))
    header = f"{shape}|{sample.dtype}|".encode()
    return hashlib.sha256(header + sample.tobytes()).hexdigest()[:32]


def adapter_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The JSON metadata of an adapter checkpoint (what `save_adapter` wrote).

    Reads the metadata alone, not the arrays.

    Args:
        path: a directory written by `save_adapter`.

    Returns:
        The metadata dict: ``format``, ``format_version``, ``config``, ``adapters``,
        ``trained``, ``base`` (the fingerprint), ``versions`` and ``user``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the metadata is missing, unreadable or of an unknown format version.

    Example:
        >>> info = adapter_metadata("/tmp/run/adapter")  # doctest: +SKIP
        >>> config = ll.LoraConfig.from_dict(info["config"])  # doctest: +SKIP
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No adapter checkpoint at {path}")
    if not (path / "metadata").is_dir():
        raise ValueError(f"{path} is not a lorax_lite adapter checkpoint (no adapter metadata)")
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            path, ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )
        info = restored["metadata"]
    except Exception as err:
        raise _unreadable(path, err) from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lorax_lite adapter checkpoint (no adapter metadata)")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown adapter format version {info.get('format_version')!r}; this "
            f"lorax_lite reads version {FORMAT_VERSION}. Upgrade lorax_lite to load it."
        )
    return info


def _unreadable(path: pathlib.Path, err: Exception) -> ValueError:
    return ValueError(
        f"Cannot read the adapter checkpoint at {path}: it is truncated, corrupted or was "
        f"not completely written ({type(err).__name__}: {err}). Save the adapter again or "
        "load another copy."
    )


def load_adapter(path: str | pathlib.Path, params: Any = None, *, check_base: bool = True) -> Any:
    """Rebuilds the LoRA tree of a saved adapter on the base ``params``.

    The arrays are restored against an abstract target built from the metadata
    and the base: shapes and dtypes from the metadata, shardings derived from the
    base leaves (an ``A`` factor takes its weight's sharding of the stacked and
    fan-in axes), so a sharded base gives sharded adapters.

    Args:
        path: a directory written by `save_adapter`.
        params: the base parameter tree (a LoRA tree is accepted; its base is
            used). Without it, returns the adapters alone: a nested dict keyed by
            path components holding ``LoraWeight(None, a, b, ...)`` and `Trainable`
            leaves, for inspection and export.
        check_base: compare ``params`` with the fingerprint of the base the adapter
            was trained on (every path, shape and dtype, and the content hash of
            each adapted weight). ``False`` allows a deliberate transfer to another
            base with the same paths and shapes.

    Returns:
        The LoRA tree: ``params`` with adapted leaves as `LoraWeight` and trained
        leaves as `Trainable`.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: listing every mismatch at once (missing path, wrong shape,
            another base's fingerprint), for an unknown format version, or when the
            checkpoint is truncated or corrupted.

    Example:
        >>> lora_params = load_adapter("/tmp/run/adapter", params)  # doctest: +SKIP
    """
    path = pathlib.Path(path).absolute()
    info = adapter_metadata(path)
    if params is None:
        arrays = _restore_arrays(path, info, None)
        return _adapters_only(info, arrays)
    base = base_of(params)
    named = dict(named_leaves(base))
    misfits = _shape_problems(info, named)
    problems = list(misfits.values())
    if check_base:
        problems += _fingerprint_problems(info, named, misfits)
    if problems:
        hint = "\n(check_base=False loads onto a different base with the same shapes)"
        raise ValueError(
            f"Cannot load the adapter {path} onto this base:\n  " + "\n  ".join(problems) + hint
        )
    arrays = _restore_arrays(path, info, named)
    adapted = {e["path"]: (e, ab) for e, ab in zip(info["adapters"], arrays["adapters"])}
    trained = {e["path"]: v for e, v in zip(info["trained"], arrays["trained"])}

    def rebuild(key_path, leaf):
        name = path_str(key_path)
        if name in adapted:
            entry, ab = adapted[name]
            layout = Layout.from_roles(tuple(entry["layout"]))
            return LoraWeight(leaf, ab["a"], ab["b"], entry["scale"], layout, entry["dropout"])
        return Trainable(trained[name]) if name in trained else leaf

    return jax.tree_util.tree_map_with_path(rebuild, base)


def _shape_problems(info: dict[str, Any], named: dict[str, Any]) -> dict[str, str]:
    """``{path: message}`` for each saved adapter or trained leaf the base lacks or misshapes."""
    problems = {}
    for entry in [*info["adapters"], *info["trained"]]:
        path, shape = entry["path"], tuple(entry["shape"])
        if path not in named:
            problems[path] = f"{path}: missing from the base (the adapter needs shape {shape})"
        elif tuple(np.shape(named[path])) != shape:
            problems[path] = (
                f"{path}: the base has shape {tuple(np.shape(named[path]))}, the adapter was "
                f"saved for shape {shape}"
            )
    return problems


def _fingerprint_problems(
    info: dict[str, Any], named: dict[str, Any], reported: dict[str, str]
) -> list[str]:
    """Differences from the saved base fingerprint, except paths already ``reported``."""
    saved, hashes = info["base"]["leaves"], info["base"]["hashes"]
    problems = [
        f"{p}: in the saved base, missing from this base"
        for p in saved
        if p not in named and p not in reported
    ]
    problems += [f"{p}: in this base, not in the saved base" for p in named if p not in saved]
    for path, (shape, dtype) in saved.items():
        if path in reported or path not in named:
            continue
        found = (tuple(np.shape(named[path])), _dtype_name(named[path]))
        if found != (tuple(shape), dtype):
            problems.append(f"{path}: saved base {(tuple(shape), dtype)}, this base {found}")
        elif path in hashes and content_hash(named[path]) != hashes[path]:
            problems.append(
                f"{path}: the base weights differ from those the adapter was trained on "
                "(content fingerprint mismatch)"
            )
    return problems


def _restore_arrays(
    path: pathlib.Path, info: dict[str, Any], named: dict[str, Any] | None
) -> dict[str, Any]:
    """Restores the saved arrays onto shardings derived from the base, and checks them."""

    def target(entry, sharding):
        return jax.ShapeDtypeStruct(tuple(entry["shape"]), entry["dtype"], sharding=sharding)

    adapters = []
    for entry in info["adapters"]:
        layout = Layout.from_roles(tuple(entry["layout"]))
        base = None if named is None else named[entry["path"]]
        a_sharding, b_sharding = factor_shardings(base, layout)
        adapters.append({"a": target(entry["a"], a_sharding), "b": target(entry["b"], b_sharding)})
    trained = [
        target(e, _same_shape_sharding(None if named is None else named[e["path"]]))
        for e in info["trained"]
    ]
    abstract = {"adapters": adapters, "trained": trained}
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            path, ocp.args.Composite(adapter=ocp.args.StandardRestore(abstract))
        )["adapter"]
    except Exception as err:
        raise _unreadable(path, err) from err
    _check_checksums(path, info, restored)
    return restored


def _check_checksums(path: pathlib.Path, info: dict[str, Any], restored: dict[str, Any]) -> None:
    saved = [
        (f"{e['path']} ({f})", e[f], ab[f])
        for e, ab in zip(info["adapters"], restored["adapters"])
        for f in ("a", "b")
    ]
    saved += [(e["path"], e, v) for e, v in zip(info["trained"], restored["trained"])]
    bad = [name for name, entry, value in saved if _array_entry(value)["sha256"] != entry["sha256"]]
    if bad:
        raise ValueError(
            f"The adapter checkpoint at {path} is corrupted: the arrays of {bad} do not match "
            "the checksums written with them. Save the adapter again or load another copy."
        )


def factor_shardings(base: Any, layout: Layout) -> tuple[Any, Any]:
    """Shardings for ``A`` and ``B`` derived from the base weight's sharding.

    A `NamedSharding` carries over axis by axis: ``A`` takes the weight's spec of
    the stacked and fan-in axes (rank axis unsharded), ``B`` that of the stacked and
    fan-out axes. A single-device base gives single-device factors; other
    multi-device shardings give factors replicated on the same devices.
    """
    sharding = getattr(base, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (base.ndim - len(sharding.spec))
        pick = lambda axes: tuple(spec[i] for i in axes)
        stack = pick(layout.stack)
        a_spec = PartitionSpec(*stack, *pick(layout.fan_in), None)
        b_spec = PartitionSpec(*stack, None, *pick(layout.fan_out))
        return NamedSharding(sharding.mesh, a_spec), NamedSharding(sharding.mesh, b_spec)
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        single = _same_shape_sharding(base)
        return single, single
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    replicated = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())
    return replicated, replicated


def _same_shape_sharding(base: Any) -> Any:
    """The base leaf's sharding (for a value of its shape), or the default device."""
    sharding = getattr(base, "sharding", None)
    return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])


def _adapters_only(info: dict[str, Any], arrays: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of the adapters and trained values alone, keyed by path components."""
    flat: dict[str, Any] = {}
    for entry, ab in zip(info["adapters"], arrays["adapters"]):
        layout = Layout.from_roles(tuple(entry["layout"]))
        flat[entry["path"]] = LoraWeight(
            None, ab["a"], ab["b"], entry["scale"], layout, entry["dropout"]
        )
    for entry, value in zip(info["trained"], arrays["trained"]):
        flat[entry["path"]] = Trainable(value)
    return unflatten(flat)


class Restored(NamedTuple):
    """What `TrainCheckpointer.restore` returns."""

    state: Any
    step: int
    data: dict[str, Any]


class TrainCheckpointer:
    """Saves and restores training states with an orbax ``CheckpointManager``.

    Each step directory holds the state (any pytree: adapters, optimizer state,
    step counter, PRNG key) and a JSON dict of data position or other bookkeeping.
    Saves are asynchronous (the arrays are copied to host, then written in a
    background thread) and atomic: a process killed mid-save leaves the earlier
    steps intact, and the half-written one is ignored and cleaned up. Only the
    last ``max_to_keep`` steps are kept. In a multi-process run every process makes
    the same calls on the same ``directory``; orbax writes each step once.

    A state with a ``frozen`` field (lorax_lite's ``TrainState``, or any NamedTuple
    or dataclass with one) is saved without it, so the base weights are never
    written; `restore` takes them from ``like``.

    Args:
        directory: where the step directories go (created if missing).
        max_to_keep: how many of the most recent steps to keep (None keeps all).
        save_interval_steps: `save` skips steps not divisible by this.
        async_save: write in a background thread; `wait` or `close` to finish.

    Example:
        >>> with TrainCheckpointer("/tmp/run/ckpt", max_to_keep=3) as ckpt:  # doctest: +SKIP
        ...     if ckpt.latest_step() is not None:
        ...         state, step, data = ckpt.restore(state)
        ...     ckpt.save(step, state, data={"epoch": 0, "batch": 120})
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def save(
        self, step: int, state: Any, *, data: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Starts saving ``state`` and the JSON-serializable ``data`` as ``step``.

        Args:
            step: the step number naming the checkpoint.
            state: any pytree of arrays (a ``frozen`` field is left out).
            data: JSON-serializable bookkeeping, e.g. the data position.
            force: save even if ``save_interval_steps`` would skip this step.

        Returns:
            Whether a save was started (``save_interval_steps`` may skip the step).
        """
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_frozen(state)),
                data=ocp.args.JsonSave(dict(data or {})),
            ),
            force=force,
        )

    def restore(self, like: Any, *, step: int | None = None) -> Restored:
        """Restores ``step`` (the latest by default) onto the structure of ``like``.

        Args:
            like: a state of the same structure, e.g. freshly initialised; its
                shapes, dtypes and shardings are the restore target, and its
                ``frozen`` field, if any, is put back in the restored state.
            step: the step to restore; the latest saved one by default.

        Returns:
            ``Restored(state, step, data)``.

        Raises:
            FileNotFoundError: if there is no saved step (or not ``step``).
            ValueError: if the step cannot be read (truncated or corrupted files).
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No training checkpoint for step {step} in {self.directory}; "
                f"saved steps: {self.all_steps()}"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _without_frozen(like))
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:
            raise ValueError(
                f"Cannot restore step {step} from {self.directory}: the files are truncated or "
                f"corrupted ({type(err).__name__}: {err}). Restore an earlier step with "
                f"step=... (saved: {self.all_steps()})."
            ) from err
        return Restored(_with_frozen(restored["state"], like), step, dict(restored["data"]))

    def latest_step(self) -> int | None:
        """The most recent completely saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every completely saved step, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _without_frozen(state: Any) -> Any:
    """``state``'s fields other than ``frozen`` (the base weights) as a dict, if it has one.

    A plain dict, not ``state``'s own type: orbax probes the item with ``isinstance``
    against a protocol, which would evaluate properties such as `TrainState.tree`.
    """
    if dataclasses.is_dataclass(state) and any(
        f.name == "frozen" for f in dataclasses.fields(state)
    ):
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    elif "frozen" in getattr(state, "_fields", ()):
        fields = state._asdict()
    else:
        return state
    del fields["frozen"]
    return fields


def _with_frozen(state: Any, like: Any) -> Any:
    if _without_frozen(like) is like:
        return state
    if dataclasses.is_dataclass(like):
        return dataclasses.replace(like, **state)
    return like._replace(**state)
