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
import json
import math
import numbers
import os
import pathlib
import shutil
import string
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .config import AXIS_ROLES, LoraConfig
from .decompose import RESIDUAL_INITS
from .quant import is_quantized
from .targets import named_leaves, path_str, unflatten
from .trees import base_of, content_hash, dtype_name, fingerprint, host_array, storage
from .version import __version__
from .weight import Layout, LoraWeight, Trainable, is_lora_node

FORMAT = "lorax_lite.adapter"
FORMAT_VERSION = 1
# Each targeted base leaf is fingerprinted from about this many evenly strided elements.


def save_adapter(
    path: str | pathlib.Path,
    tree: Any,
    config: LoraConfig,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the adapters and fully trained leaves of ``tree``, never the base.

    The directory holds an orbax checkpoint of every ``a``, ``b``, DoRA ``m`` and
    `Trainable` value, and JSON metadata: the format version, ``config``, each adapter's
    path, base shape/dtype, rank, scale, axis roles, dropout and (DoRA) whether the
    norm is detached, the trained paths, a
    fingerprint of the base (every leaf's path, shape and dtype, and a hash of a
    strided sample of each adapted weight), checksums of the saved arrays, the
    library and JAX versions, ``metadata``, and a checksum of the metadata itself.

    The write is atomic: the checkpoint is written to a hidden sibling directory
    and renamed into place when complete. An overwrite moves the old checkpoint
    aside, renames the new one in and only then deletes the old one, so a save
    that fails or is killed at any point leaves the old checkpoint or the new one,
    never neither (a failed save puts the old one back; the next save or load
    recovers from a killed one).

    In a multi-process run every process calls it with the same ``path`` and its
    copy of ``tree`` (arrays may span processes): orbax writes each array once,
    and process 0 alone writes the metadata and renames the directories.

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
            ``combine(trainable, frozen)``), if ``path`` exists and ``overwrite``
            is False, or if ``path`` exists and is not an adapter checkpoint (never
            replaced, even with ``overwrite``).
        TypeError: if ``config`` or ``metadata`` cannot be serialized to JSON (the
            message names every offending key); nothing is written then.

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
        "adapters": [_factors(n) for _, n in adapters],
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
    _check_json(info["user"], "save_adapter", "metadata")
    info["sha256"] = _metadata_digest(info)
    items = ocp.args.Composite(
        adapter=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(info)
    )
    _save_beside_and_swap(path, items, overwrite=overwrite)
    return path


# Hidden siblings of an adapter checkpoint ``name`` during a save: the new checkpoint is
# written to the first, the old one is moved to the second while the new one is renamed
# in, then to the third to be deleted.
_NEW, _OLD, _TRASH = "lorax-lite-new", "lorax-lite-old", "lorax-lite-trash"


def _sibling(path: pathlib.Path, role: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{role}")


def _save_beside_and_swap(
    path: pathlib.Path, items: ocp.args.Composite, *, overwrite: bool
) -> None:
    """Writes ``items`` to a sibling of ``path``, then swaps it into place (see `save_adapter`)."""
    primary = jax.process_index() == 0
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover(path)
    _sync_processes("lorax_lite.save_adapter:start")
    if os.path.lexists(path):
        if not overwrite:
            raise ValueError(
                f"save_adapter: {path} exists; pass overwrite=True to replace it, or another path"
            )
        if not _is_adapter_directory(path):
            raise ValueError(
                f"save_adapter: {path} exists and is not an adapter checkpoint; overwrite=True "
                "replaces only a directory written by save_adapter. Remove it or pick another path."
            )
    try:
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(_sibling(path, _NEW), items)
        _sync_processes("lorax_lite.save_adapter:written")
        if primary:
            _swap_in(_sibling(path, _NEW), path)
        _sync_processes("lorax_lite.save_adapter:swapped")
    except BaseException:
        if primary:
            try:
                _recover(path, settle=True)
            except OSError:  # the save's own error matters; the next save cleans up
                pass
        raise


def _swap_in(new: pathlib.Path, path: pathlib.Path) -> None:
    """Renames ``new`` to ``path``, replacing and then deleting what was there."""
    old = _sibling(path, _OLD)
    replacing = os.path.lexists(path)
    if replacing:
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if replacing:
            os.rename(old, path)
        raise
    if replacing:  # renamed before deleting: a half-deleted directory is never read
        os.rename(old, _sibling(path, _TRASH))
        _remove(_sibling(path, _TRASH))


def _recover(path: pathlib.Path, *, settle: bool = False) -> None:
    """Undoes an interrupted or failed save of ``path``: puts the old checkpoint back if
    it is aside and nothing replaced it, and removes the other leftovers (a partial new
    checkpoint, orbax's temporary directories, an old checkpoint already replaced)."""
    old = _sibling(path, _OLD)
    if os.path.lexists(old) and not os.path.lexists(path):
        os.rename(old, path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}.lorax-lite-"
    for leftover in path.parent.iterdir():
        if leftover.name.startswith(prefix):
            _remove(leftover, settle=settle)


def _remove(path: pathlib.Path, *, settle: bool = False) -> None:
    """Deletes the file or directory ``path``; with ``settle``, until it stays deleted
    (after a failed write, orbax's threads may still create directories for a moment)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for _ in range(20 if settle else 0):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)
        if not os.path.lexists(path):
            return
    shutil.rmtree(path)


def _is_adapter_directory(path: pathlib.Path) -> bool:
    """Whether ``path`` is an adapter checkpoint (or an empty directory) that an overwrite may
    replace: never a file or some other directory given by mistake."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / "metadata").is_dir() or not any(path.iterdir())


def _adapter_location(path: pathlib.Path) -> pathlib.Path:
    """Where the checkpoint ``path`` is: ``path``, or the old checkpoint set aside by an
    overwrite killed between its two renames (it is complete then)."""
    old = _sibling(path, _OLD)
    return old if not os.path.lexists(path) and old.is_dir() else path


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_json(value: Any, caller: str, name: str) -> None:
    """Raises ``TypeError`` naming every part of ``value`` that JSON would not round-trip.

    Allowed: dicts with string keys, lists, tuples, strings, bools, None, ints and
    floats (Python's, or subclasses such as ``np.float64``).
    """
    problems = _json_problems(value, name)
    if problems:
        raise TypeError(
            f"{caller}: {name} must be JSON-serializable; these parts are not:\n  "
            + "\n  ".join(problems)
            + "\n(convert NumPy and JAX scalars with int(...) or float(...))"
        )


def _json_problems(value: Any, where: str) -> list[str]:
    if isinstance(value, Mapping):
        problems = []
        for key, item in value.items():
            if isinstance(key, str):
                problems += _json_problems(item, f"{where}[{key!r}]")
            else:
                problems.append(
                    f"{where}: key {key!r} ({_type_name(key)}) is not a string, as JSON keys are"
                )
        return problems
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in _json_problems(item, f"{where}[{i}]")]
    if value is None or isinstance(value, str | bool | int | float):
        return []
    shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
    return [f"{where}: {_type_name(value)} {shown} is not JSON-serializable"]


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _metadata_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``info`` without its own ``sha256`` field."""
    return _json_digest({k: v for k, v in info.items() if k != "sha256"})


def _factors(node: LoraWeight) -> dict[str, Any]:
    """The saved arrays of an adapter: ``a``, ``b``, and DoRA's magnitude ``m``."""
    return {"a": node.a, "b": node.b, **({} if node.m is None else {"m": node.m})}


def _adapter_entry(path: str, node: LoraWeight) -> dict[str, Any]:
    dora = {} if node.m is None else {"m": _array_entry(node.m), "detach_norm": node.detach_norm}
    return {
        "path": path,
        # The base weight's shape and dtype only: it is never copied to the host whole
        # (the fingerprint holds its cheap content hash).
        "shape": list(node.w.shape),
        "dtype": dtype_name(node.w),
        "rank": node.rank,
        "scale": float(node.scale),
        "layout": list(node.layout.roles()),
        "dropout": float(node.dropout),
        "a": _array_entry(node.a),
        "b": _array_entry(node.b),
        **dora,
    }


def _array_entry(x: Any) -> dict[str, Any]:
    """Shape, dtype and a SHA-256 checksum of the bytes of ``x``."""
    host = host_array(x)
    digest = hashlib.sha256(np.ascontiguousarray(host).tobytes()).hexdigest()
    return {"shape": list(host.shape), "dtype": str(host.dtype), "sha256": digest}


def _versions() -> dict[str, str]:
    return {"lorax_lite": __version__, "jax": jax.__version__, "orbax": ocp.__version__}


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
        ValueError: if the metadata is missing, unreadable or of an unknown format
            version, if a field of it is not what `save_adapter` writes (the message
            names the file, each such field, what was expected and what was found),
            or if it does not match its checksum (edited or corrupted).

    Example:
        >>> info = adapter_metadata("/tmp/run/adapter")  # doctest: +SKIP
        >>> config = ll.LoraConfig.from_dict(info["config"])  # doctest: +SKIP
    """
    path = _adapter_location(pathlib.Path(path).absolute())
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
    problems = _metadata_problems(info)
    if not problems and "sha256" in info and info["sha256"] != _metadata_digest(info):
        problems = ["sha256: the metadata does not match the checksum written with it"]
    if problems:
        raise ValueError(
            f"The adapter metadata {path / 'metadata' / 'metadata'} is corrupted or was edited:"
            "\n  " + "\n  ".join(problems) + "\nSave the adapter again or load another copy."
        )
    return info


def _unreadable(path: pathlib.Path, err: Exception) -> ValueError:
    return ValueError(
        f"Cannot read the adapter checkpoint at {path}: it is truncated, corrupted or was "
        f"not completely written ({type(err).__name__}: {err}). Save the adapter again or "
        "load another copy."
    )


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()


def _metadata_problems(info: dict[str, Any]) -> list[str]:
    """``"field: expected ..., found ..."`` for every field of the metadata that is not
    what `save_adapter` writes."""
    kinds = {"config": dict, "adapters": list, "trained": list, "base": dict}
    kinds.update(versions=dict, user=dict)
    problems = [
        f"{key}: expected a JSON {'object' if kind is dict else 'array'}, found "
        f"{_shown(info.get(key, _MISSING))}"
        for key, kind in kinds.items()
        if not isinstance(info.get(key), kind)
    ]
    if "sha256" in info and not _is_hex(info["sha256"], 64):
        problems.append(f"sha256: expected 64 hexadecimal digits, found {_shown(info['sha256'])}")
    if problems:
        return problems
    try:
        LoraConfig.from_dict(info["config"])
    except Exception as err:  # whatever LoraConfig raises for fields it cannot take
        problems.append(f"config: expected the fields of a valid LoraConfig ({err})")
    for i, entry in enumerate(info["adapters"]):
        problems += _adapter_entry_problems(entry, f"adapters[{i}]")
    for i, entry in enumerate(info["trained"]):
        problems += _array_entry_problems(entry, f"trained[{i}]", floating=False, named=True)
    if not problems:
        paths = [e["path"] for e in [*info["adapters"], *info["trained"]]]
        problems += [f"adapters/trained: {p}" for p in path_conflicts(paths)]
    problems += _fingerprint_field_problems(info["base"])
    problems += [
        f"versions[{k!r}]: expected a version string, found {_shown(v)}"
        for k, v in info["versions"].items()
        if not isinstance(v, str)
    ]
    return problems


def _adapter_entry_problems(entry: Any, field: str) -> list[str]:
    problems = _array_entry_problems(entry, field, floating=False, named=True, checksum=False)
    if problems:
        return problems
    shape, rank, layout = entry["shape"], entry.get("rank"), entry.get("layout")
    if len(shape) < 2:
        problems.append(f"{field}.shape: expected at least 2 axes, found {shape}")
    if not _is_int(rank, 1):
        problems.append(f"{field}.rank: expected an int >= 1, found {_shown(rank)}")
    scale, dropout = entry.get("scale", _MISSING), entry.get("dropout", _MISSING)
    if not _is_finite(scale):
        problems.append(f"{field}.scale: expected a finite number, found {_shown(scale)}")
    if not _is_real(dropout) or not 0 <= dropout < 1:
        problems.append(f"{field}.dropout: expected a number in [0, 1), found {_shown(dropout)}")
    if not (
        isinstance(layout, list)
        and len(layout) == len(shape)
        and all(isinstance(r, str) and r in AXIS_ROLES for r in layout)
        and {"in", "out"} <= set(layout)
    ):
        problems.append(
            f"{field}.layout: expected one role of {AXIS_ROLES} per axis of the shape "
            f"{shape}, 'in' and 'out' among them, found {_shown(layout)}"
        )
    factors = _saved_factors(entry)
    for factor in factors:
        problems += _array_entry_problems(
            entry.get(factor, _MISSING), f"{field}.{factor}", floating=True, named=False
        )
    if "m" in entry and not isinstance(entry.get("detach_norm"), bool):
        problems.append(
            f"{field}.detach_norm: expected true or false, found "
            f"{_shown(entry.get('detach_norm', _MISSING))}"
        )
    if problems:
        return problems
    layout = Layout.from_roles(tuple(layout))
    expected = (*layout.factor_shapes(tuple(shape), rank), layout.magnitude_shape(tuple(shape)))
    return [
        f"{field}.{factor}.shape: expected {list(want)} (rank {rank} on a {shape} weight), "
        f"found {entry[factor]['shape']}"
        for factor, want in zip(factors, expected)
        if tuple(entry[factor]["shape"]) != want
    ]


def _saved_factors(entry: dict[str, Any]) -> tuple[str, ...]:
    """The arrays an adapter entry describes: ``a``, ``b``, and ``m`` for DoRA."""
    return ("a", "b", "m") if "m" in entry else ("a", "b")


def _array_entry_problems(
    entry: Any, field: str, *, floating: bool, named: bool, checksum: bool = True
) -> list[str]:
    """Problems of a ``{path?, shape, dtype, sha256?}`` entry."""
    if not isinstance(entry, dict):
        return [f"{field}: expected a JSON object, found {_shown(entry)}"]
    get = lambda key: entry.get(key, _MISSING)
    problems = []
    if named and (not isinstance(get("path"), str) or not get("path")):
        problems.append(f"{field}.path: expected a leaf path, found {_shown(get('path'))}")
    if not _is_shape(get("shape")):
        problems.append(
            f"{field}.shape: expected a list of ints >= 0, found {_shown(get('shape'))}"
        )
    if not _is_dtype(get("dtype"), "floating" if floating else "array"):
        kind = "a floating-point dtype name" if floating else "the dtype name of a number or bool"
        problems.append(f"{field}.dtype: expected {kind}, found {_shown(get('dtype'))}")
    if checksum and not _is_hex(get("sha256"), 64):
        problems.append(
            f"{field}.sha256: expected 64 hexadecimal digits, found {_shown(get('sha256'))}"
        )
    return problems


def _fingerprint_field_problems(base: dict[str, Any]) -> list[str]:
    leaves, hashes = base.get("leaves", _MISSING), base.get("hashes", _MISSING)
    if not isinstance(leaves, dict) or not isinstance(hashes, dict):
        return [
            "base: expected {'leaves': {path: [shape, dtype]}, 'hashes': {path: hash}}, found "
            + _shown(base)
        ]
    problems = [
        f"base.leaves[{path!r}]: expected [shape, dtype name], found {_shown(value)}"
        for path, value in leaves.items()
        if not (
            isinstance(value, list)
            and len(value) == 2
            and _is_shape(value[0])
            and _is_dtype(value[1], "any")
        )
    ]
    problems += [
        f"base.hashes[{path!r}]: expected 32 hexadecimal digits of a leaf in base.leaves, "
        f"found {_shown(value)}"
        for path, value in hashes.items()
        if path not in leaves or not _is_hex(value, 32)
    ]
    quantized = base.get("quantized", {})  # absent in files written before quantized bases
    if not isinstance(quantized, dict):
        return [*problems, f"base.quantized: expected {{path: storage}}, found {_shown(quantized)}"]
    problems += [
        f"base.quantized[{path!r}]: expected the storage of a leaf in base.leaves, found "
        f"{_shown(value)}"
        for path, value in quantized.items()
        if path not in leaves or not isinstance(value, str)
    ]
    return problems


def path_conflicts(paths: list[str]) -> list[str]:
    """Each path given twice, or that is also the module of another path (``a/b`` and
    ``a/b/c`` cannot both be leaves of one tree)."""
    seen, problems = set(), []
    for path in paths:
        if path in seen:
            problems.append(f"{path!r} is given twice")
        seen.add(path)
    for path in sorted(seen):
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        problems += [f"{p!r} is a leaf and the module of {path!r}" for p in prefixes if p in seen]
    return problems


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is a finite float (JSON integers are unbounded: 10**400 is not)."""
    try:
        return _is_real(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d, 0) for d in value)


def _is_dtype(value: Any, kind: str) -> bool:
    """Whether ``value`` is the name of a dtype of ``kind``: ``"any"``, ``"array"`` (a
    number or bool: what the arrays of a checkpoint hold) or ``"floating"``."""
    if not isinstance(value, str):
        return False
    try:
        dtype = jnp.dtype(value)
    except Exception:  # NumPy raises TypeError, some names other errors
        return False
    if kind == "floating":
        fits = jnp.issubdtype(dtype, jnp.floating)
    else:
        fits = kind == "any" or jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_
    return str(dtype) == value and bool(fits)


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= set(string.hexdigits)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    path = _adapter_location(pathlib.Path(path).absolute())
    info = adapter_metadata(path)
    if params is None:
        arrays = _restore_arrays(path, info, None)
        return _adapters_only(info, arrays)
    base = base_of(params)
    named = dict(named_leaves(base, is_leaf=is_quantized))
    misfits = _shape_problems(info, named)
    problems = list(misfits.values())
    if check_base:
        problems += _fingerprint_problems(info, named, misfits)
    if problems:
        hint = "\n(check_base=False loads onto a different base with the same shapes)"
        if info["config"].get("init") in RESIDUAL_INITS:
            hint += (
                f"\nThis adapter was initialized with init={info['config']['init']!r}: its "
                "base is the residual W - s*A0@B0 that ll.init put in the tree, not the "
                "original weights. Load it onto that residual base (save "
                "ll.partition(tree)[1] beside the adapter; ll.init with the same config "
                "and key rebuilds it on the same JAX and device), or use ll.merge(tree)."
            )
        raise ValueError(
            f"Cannot load the adapter {path} onto this base:\n  " + "\n  ".join(problems) + hint
        )
    arrays = _restore_arrays(path, info, named)
    adapted = {e["path"]: (e, ab) for e, ab in zip(info["adapters"], arrays["adapters"])}
    trained = {e["path"]: v for e, v in zip(info["trained"], arrays["trained"])}

    def rebuild(key_path, leaf):
        name = path_str(key_path)
        if name in adapted:
            return _rebuilt_adapter(leaf, *adapted[name])
        return Trainable(trained[name]) if name in trained else leaf

    return jax.tree_util.tree_map_with_path(rebuild, base, is_leaf=is_quantized)


def _rebuilt_adapter(w: Any, entry: dict[str, Any], arrays: dict[str, Any]) -> LoraWeight:
    """The `LoraWeight` of a saved entry and its restored arrays, on the base ``w``."""
    layout = Layout.from_roles(tuple(entry["layout"]))
    dora = {"m": arrays["m"], "detach_norm": entry["detach_norm"]} if "m" in entry else {}
    return LoraWeight(w, arrays["a"], arrays["b"], entry["scale"], layout, entry["dropout"], **dora)


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
    quantized = info["base"].get("quantized", {})
    for path, (shape, dtype) in saved.items():
        if path in reported or path not in named:
            continue
        found = (tuple(np.shape(named[path])), dtype_name(named[path]))
        stored = (quantized.get(path, "float"), storage(named[path]))
        if found != (tuple(shape), dtype):
            problems.append(f"{path}: saved base {(tuple(shape), dtype)}, this base {found}")
        elif stored[0] != stored[1]:
            problems.append(
                f"{path}: the adapter was trained on a base stored {stored[0]}, this base is "
                f"stored {stored[1]} (check_base=False loads it anyway)"
            )
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
        shardings = dict(zip(("a", "b", "m"), factor_shardings(base, layout)))
        adapters.append({f: target(entry[f], shardings[f]) for f in _saved_factors(entry)})
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
        for f in _saved_factors(e)
    ]
    saved += [(e["path"], e, v) for e, v in zip(info["trained"], restored["trained"])]
    bad = [name for name, entry, value in saved if _array_entry(value)["sha256"] != entry["sha256"]]
    if bad:
        raise ValueError(
            f"The adapter checkpoint at {path} is corrupted: the arrays of {bad} do not match "
            "the checksums written with them. Save the adapter again or load another copy."
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
        pick = lambda axes: tuple(spec[i] for i in axes)
        stack = pick(layout.stack)
        a_spec = PartitionSpec(*stack, *pick(layout.fan_in), None)
        b_spec = PartitionSpec(*stack, None, *pick(layout.fan_out))
        m_spec = PartitionSpec(*stack, *pick(layout.fan_out))
        return tuple(NamedSharding(sharding.mesh, s) for s in (a_spec, b_spec, m_spec))
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        single = _same_shape_sharding(base)
        return single, single, single
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    replicated = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())
    return replicated, replicated, replicated


def _same_shape_sharding(base: Any) -> Any:
    """The base leaf's sharding (for a value of its shape), or the default device."""
    sharding = getattr(base, "sharding", None)
    return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])


def _adapters_only(info: dict[str, Any], arrays: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of the adapters and trained values alone, keyed by path components."""
    flat: dict[str, Any] = {}
    for entry, ab in zip(info["adapters"], arrays["adapters"]):
        flat[entry["path"]] = _rebuilt_adapter(None, entry, ab)
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

    Raises:
        ValueError: if the metadata file of a saved step in ``directory`` is corrupted
            (orbax reads them all when it opens the directory).

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
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                # Handlers known up front, so a fresh process reads a step's metadata.
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError:
            raise
        except Exception as err:  # orbax reads every step's metadata file here
            raise ValueError(
                f"Cannot open the training checkpoints in {self.directory}: the metadata of a "
                f"step (its _CHECKPOINT_METADATA file) is corrupted ({type(err).__name__}: "
                f"{err}). Move the broken step directory aside to use the others."
            ) from err

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

        Raises:
            TypeError: if ``data`` is not JSON-serializable (the message names every
                offending key), before anything is written.
        """
        data = dict(data or {})
        _check_json(data, "TrainCheckpointer.save", "data")
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_frozen(state)),
                data=ocp.args.JsonSave(data),
            ),
            force=force,
            custom_metadata={_DATA_DIGEST: _json_digest(data)},
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
            ValueError: if ``like`` does not have the saved state's structure and
                shapes (the message lists each leaf that differs, with both shapes),
                or if the step cannot be read (truncated or corrupted files).
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No training checkpoint for step {step} in {self.directory}; "
                f"saved steps: {self.all_steps()}"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _without_frozen(like))
        self._check_like(step, abstract)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
            data = self._checked_data(step, restored["data"])
        except Exception as err:
            raise ValueError(
                f"Cannot restore step {step} from {self.directory}: the files are truncated or "
                f"corrupted ({type(err).__name__}: {err}). Restore an earlier step with "
                f"step=... (saved: {self.all_steps()})."
            ) from err
        return Restored(_with_frozen(restored["state"], like), step, data)

    def _check_like(self, step: int, abstract: Any) -> None:
        """Raises if the saved state's leaves differ in path or shape from ``abstract``'s.

        Unreadable metadata is left for the restore to report as corruption.
        """
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = _leaf_shapes(saved.tree if hasattr(saved, "tree") else saved)
        except Exception:
            return
        if not saved:
            return
        wanted = _leaf_shapes(abstract)
        problems = [
            f"{p}: saved with shape {saved[p]}, `like` has shape {wanted[p]}"
            for p in wanted
            if p in saved and saved[p] != wanted[p]
        ]
        problems += [f"{p}: in `like`, not in the saved state" for p in wanted if p not in saved]
        problems += [f"{p}: in the saved state, not in `like`" for p in saved if p not in wanted]
        if problems:
            raise ValueError(
                f"Cannot restore step {step} from {self.directory} onto `like`: its leaves "
                "differ from the saved state's:\n  " + "\n  ".join(problems)
            )

    def _checked_data(self, step: int, data: Any) -> dict[str, Any]:
        """The restored ``data``, checked against the digest saved with it (if any)."""
        if not isinstance(data, dict):
            raise TypeError(f"the data of step {step} is not a JSON object: {_shown(data)}")
        custom = self._manager.metadata(step).custom_metadata or {}
        digest = custom.get(_DATA_DIGEST) if isinstance(custom, dict) else None
        if digest is not None and digest != _json_digest(data):
            raise ValueError(f"the data of step {step} does not match the checksum saved with it")
        return data

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


# The key of the SHA-256 of a training step's ``data`` in the step's orbax metadata.
_DATA_DIGEST = "lorax_lite_data_sha256"


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"/"-joined path: shape}`` of the array leaves of an abstract or metadata tree, a
    PRNG key by the shape of its key data (as orbax saves it)."""
    shapes = {}
    for path, leaf in ocp.tree.to_flat_dict(tree).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        if getattr(leaf, "shape", None) is not None:
            shapes["/".join(str(k) for k in path)] = tuple(leaf.shape)
    return shapes


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
