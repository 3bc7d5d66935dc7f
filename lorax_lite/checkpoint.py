"""Adapter checkpoints with orbax: small, self-describing, checked against their base.

`save_adapter` writes only the adapters (``a``, ``b``) and fully trained leaves, with JSON
metadata (`metadata`) describing each adapter and fingerprinting the base it was trained on,
and swaps the directory into place atomically (`atomic`); `load_adapter` rebuilds the LoRA
tree on a base and refuses a base that does not match.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from .atomic import NEW, current, recover, sibling, swap_in
from .checks import raise_problems
from .config import LoraConfig, tree_conflicts
from .decompose import RESIDUAL_INITS
from .deprecation import warn
from .fingerprints import content_hash, dtype_name, fingerprint, storage
from .json_values import check_json
from .metadata import (
    FORMAT,
    FORMAT_VERSION,
    adapter_entry,
    array_entry,
    factor_arrays,
    metadata_digest,
    metadata_problems,
    saved_factors,
    versions,
)
from .placement import factor_shardings, same_shape_sharding
from .quant import is_quantized
from .targets import named_leaves, path_str, unflatten
from .trees import base_of, combine, lora_tree, partition
from .weight import Layout, LoraWeight, Trainable, is_lora_node


def save_adapter(
    path: str | pathlib.Path,
    tree: Any,
    config: LoraConfig | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the adapters and fully trained leaves of ``tree``, never the base.

    The directory holds an orbax checkpoint of every ``a``, ``b``, DoRA ``m`` and `Trainable`
    value, and JSON metadata (see `adapter_metadata`): ``config``, each adapter's
    description, a fingerprint of the base, checksums, versions and ``metadata``. The
    write is atomic: a save that fails or is killed leaves the old checkpoint or the new
    one. In a multi-process run every process calls it with the same ``path``.

    Args:
        path: the checkpoint directory to create.
        tree: the LoRA tree (from `init`), base weights included, or a `TrainState`, as
            every writer takes. A ``(trainable, frozen)`` pair from `partition` warns
            ``DeprecationWarning``: pass ``ll.combine(trainable, frozen)``.
        config: optional: the configuration the adapters were made with, recorded in the
            metadata (null without one); its dropout and DoRA are checked against the tree.
        metadata: optional JSON-serializable user data stored alongside.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute checkpoint path.

    Raises:
        ValueError: if ``tree`` holds no adapter or trained leaf, if some adapters lack
            their base weight (a partition), if ``config`` disagrees with the tree (naming
            each leaf and field), if ``path`` exists and ``overwrite`` is False,
            or if ``path`` exists and is not an adapter checkpoint (never replaced).
        TypeError: naming every offending key, if ``config`` or ``metadata`` cannot be
            serialized to JSON; nothing is written then.

    Example:
        >>> save_adapter("/tmp/run/adapter", lora_params, config)  # doctest: +SKIP
        >>> save_adapter("/tmp/run/adapter", state, config, overwrite=True)  # doctest: +SKIP
    """
    path = pathlib.Path(path).absolute()
    tree = _full_tree(lora_tree(tree))
    nodes = named_leaves(tree, is_leaf=is_lora_node)
    adapters = [(p, n) for p, n in nodes if isinstance(n, LoraWeight)]
    trained = [(p, n.value) for p, n in nodes if isinstance(n, Trainable)]
    if not adapters and not trained:
        raise ValueError("save_adapter: the tree holds no LoraWeight or Trainable leaf")
    holes = _holes(tree)
    if holes:
        raise ValueError(
            "save_adapter needs the base weights and the factors (the full LoRA tree, a "
            "TrainState, or ll.combine of the (trainable, frozen) pair from partition) to "
            f"fingerprint the base; these leaves lack one: {holes}"
        )
    if config is not None:
        raise_problems(
            "save_adapter: the config disagrees with the tree", tree_conflicts(config, tree)
        )
    arrays = {
        "adapters": [factor_arrays(n) for _, n in adapters],
        "trained": [v for _, v in trained],
    }
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": None if config is None else config.to_dict(),
        "adapters": [adapter_entry(p, n) for p, n in adapters],
        "trained": [{"path": p, **array_entry(v)} for p, v in trained],
        "base": fingerprint(base_of(tree), [p for p, _ in adapters]),
        "versions": versions(),
        "user": dict(metadata or {}),
    }
    check_json(info["user"], "save_adapter", "metadata")
    info["sha256"] = metadata_digest(info)
    items = ocp.args.Composite(
        adapter=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(info)
    )
    _save_beside_and_swap(path, items, overwrite=overwrite)
    return path


def _full_tree(tree: Any) -> Any:
    """``tree``, or the ``(trainable, frozen)`` pair from `partition` combined (deprecated:
    warns ``DeprecationWarning``). A pair is a 2-tuple with holes that is the partition of
    its combination: no LoRA tree has holes, so no tree that `save_adapter` can write is
    taken for a pair."""
    if isinstance(tree, tuple) and len(tree) == 2 and _holes(tree):
        try:
            combined = combine(*tree)
        except ValueError:  # the halves differ in structure
            return tree
        present = lambda t: [path for path, _ in jax.tree_util.tree_leaves_with_path(t)]
        if present(partition(combined)) != present(tree):  # a leaf in the wrong half
            return tree
        instead = "save_adapter(ll.combine(trainable, frozen))"
        warn("save_adapter((trainable, frozen))", instead, stacklevel=4)
        return combined
    return tree


def _holes(tree: Any) -> list[str]:
    """The paths of the nodes of ``tree`` that a partition emptied: a `LoraWeight` without
    its base weight or a factor, a `Trainable` without its value."""
    return [
        path
        for path, node in named_leaves(tree, is_leaf=is_lora_node)
        if (isinstance(node, LoraWeight) and (node.w is None or node.a is None or node.b is None))
        or (isinstance(node, Trainable) and node.value is None)
    ]


def _save_beside_and_swap(
    path: pathlib.Path, items: ocp.args.Composite, *, overwrite: bool
) -> None:
    """Writes ``items`` to a sibling of ``path``, then swaps it into place (see `save_adapter`)."""
    primary = jax.process_index() == 0
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
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
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(sibling(path, NEW), items)
        _sync_processes("lorax_lite.save_adapter:written")
        if primary:
            swap_in(sibling(path, NEW), path)
        _sync_processes("lorax_lite.save_adapter:swapped")
    except BaseException:
        if primary:
            try:
                recover(path, settle=True)
            except OSError:  # the save's own error matters; the next save cleans up
                pass
        raise


def _is_adapter_directory(path: pathlib.Path) -> bool:
    """Whether ``path`` is an adapter checkpoint (or an empty directory) that an overwrite may
    replace: never a file or some other directory given by mistake."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / "metadata").is_dir() or not any(path.iterdir())


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def adapter_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The JSON metadata of an adapter checkpoint (what `save_adapter` wrote), without the arrays.

    Args:
        path: a directory written by `save_adapter`.

    Returns:
        The metadata dict: ``format``, ``format_version``, ``config``, ``adapters`` (each
        one's path, base shape and dtype, rank, scale, axis roles, dropout, checksums),
        ``trained``, ``base`` (the fingerprint), ``versions``, ``user`` and ``sha256``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the metadata is missing, unreadable or of an unknown format version,
            listing every field that is not what `save_adapter` writes, or if it does not
            match its checksum (edited or corrupted).

    Example:
        >>> info = adapter_metadata("/tmp/run/adapter")  # doctest: +SKIP
        >>> config = ll.LoraConfig.from_dict(info["config"])  # doctest: +SKIP
    """
    path = current(pathlib.Path(path).absolute())
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
    problems = metadata_problems(info)
    if not problems and "sha256" in info and info["sha256"] != metadata_digest(info):
        problems = ["sha256: the metadata does not match the checksum written with it"]
    raise_problems(
        f"The adapter metadata {path / 'metadata' / 'metadata'} is corrupted or was edited",
        problems,
        hint="Save the adapter again or load another copy.",
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

    The arrays are restored with shardings derived from the base leaves, so a sharded base
    gives sharded adapters.

    Args:
        path: a directory written by `save_adapter`.
        params: the base parameter tree (a LoRA tree or its frozen partition is accepted:
            its base is used). None returns the adapters alone, a nested dict of
            ``LoraWeight(None, a, b, ...)`` and `Trainable` leaves, for inspection and export.
        check_base: compare ``params`` with the fingerprint of the base the adapter was
            trained on (paths, shapes, dtypes and a content hash of each adapted weight);
            False allows a deliberate transfer to another base of the same shapes.

    Returns:
        The LoRA tree: ``params`` with adapted leaves as `LoraWeight` and trained leaves as
        `Trainable`.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: listing every mismatch with the base at once (missing path, wrong shape,
            another base's fingerprint), for an unknown format version, or when the
            checkpoint is truncated or corrupted.

    Example:
        >>> lora_params = load_adapter("/tmp/run/adapter", params)  # doctest: +SKIP
    """
    path = current(pathlib.Path(path).absolute())
    info = adapter_metadata(path)
    if params is None:
        arrays = _restore_arrays(path, info, None)
        return _adapters_only(info, arrays)
    base = base_of(_fill_trained_holes(params, info))
    named = dict(named_leaves(base, is_leaf=is_quantized))
    misfits = _shape_problems(info, named)
    problems = list(misfits.values())
    if check_base:
        problems += _fingerprint_problems(info, named, misfits)
    hint = "(check_base=False loads onto a different base with the same shapes)"
    residual = [e["residual_init"] for e in info["adapters"] if "residual_init" in e]
    residual += [(info["config"] or {}).get("init")]  # files written before residual_init
    if residual[0] in RESIDUAL_INITS:
        hint += (
            f"\nThis adapter was initialized with init={residual[0]!r}: its "
            "base is the residual W - s*A0@B0 that ll.init put in the tree, not the "
            "original weights. Load it onto that residual base (save "
            "ll.partition(tree)[1] beside the adapter; ll.init with the same config "
            "and key rebuilds it on the same JAX and device), or use ll.merge(tree)."
        )
    raise_problems(f"Cannot load the adapter {path} onto this base", problems, hint=hint)
    arrays = _restore_arrays(path, info, named)
    adapted = {e["path"]: (e, ab) for e, ab in zip(info["adapters"], arrays["adapters"])}
    trained = {e["path"]: v for e, v in zip(info["trained"], arrays["trained"])}

    def rebuild(key_path, leaf):
        name = path_str(key_path)
        if name in adapted:
            return _rebuilt_adapter(leaf, *adapted[name])
        return Trainable(trained[name]) if name in trained else leaf

    return jax.tree_util.tree_map_with_path(rebuild, base, is_leaf=is_quantized)


def _fill_trained_holes(params: Any, info: dict[str, Any]) -> Any:
    """``params`` with each ``Trainable(None)`` hole (where a frozen partition had a fully
    trained leaf) that the checkpoint trains filled by a stand-in of the saved shape and
    dtype: the frozen partition is a base, and the saved value takes the stand-in's place."""
    saved = {e["path"]: e for e in info["trained"]}

    def fill(key_path: Any, node: Any) -> Any:
        entry = saved.get(path_str(key_path))
        if isinstance(node, Trainable) and node.value is None and entry is not None:
            return jax.ShapeDtypeStruct(tuple(entry["shape"]), entry["dtype"])
        return node

    return jax.tree_util.tree_map_with_path(fill, params, is_leaf=is_lora_node)


def _rebuilt_adapter(w: Any, entry: dict[str, Any], arrays: dict[str, Any]) -> LoraWeight:
    """The `LoraWeight` of a saved entry and its restored arrays, on the base ``w``."""
    layout = Layout.from_roles(tuple(entry["layout"]))
    dora = {"m": arrays["m"], "detach_norm": entry["detach_norm"]} if "m" in entry else {}
    residual = entry.get("residual_init")  # absent: the original base, or an older file
    return LoraWeight(
        w,
        arrays["a"],
        arrays["b"],
        entry["scale"],
        layout,
        entry["dropout"],
        **dora,
        residual_init=residual,
    )


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
        adapters.append({f: target(entry[f], shardings[f]) for f in saved_factors(entry)})
    trained = [
        target(e, same_shape_sharding(None if named is None else named[e["path"]]))
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
        for f in saved_factors(e)
    ]
    saved += [(e["path"], e, v) for e, v in zip(info["trained"], restored["trained"])]
    bad = [name for name, entry, value in saved if array_entry(value)["sha256"] != entry["sha256"]]
    if bad:
        raise ValueError(
            f"The adapter checkpoint at {path} is corrupted: the arrays of {bad} do not match "
            "the checksums written with them. Save the adapter again or load another copy."
        )


def _adapters_only(info: dict[str, Any], arrays: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of the adapters and trained values alone, keyed by path components."""
    flat: dict[str, Any] = {}
    for entry, ab in zip(info["adapters"], arrays["adapters"]):
        flat[entry["path"]] = _rebuilt_adapter(None, entry, ab)
    for entry, value in zip(info["trained"], arrays["trained"]):
        flat[entry["path"]] = Trainable(value)
    return unflatten(flat)
