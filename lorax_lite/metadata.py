"""What an adapter checkpoint's metadata records, and how a read checks it.

`adapter_entry` and `array_entry` describe what `save_adapter` writes (each adapter's path,
base shape and dtype, rank, scale, axis roles and the checksums of its arrays);
`metadata_problems` lists every field of a read that is not what it writes, naming the field
and what was expected and found.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .checks import is_int, is_number
from .config import AXIS_ROLES, LoraConfig
from .decompose import RESIDUAL_INITS
from .fingerprints import dtype_name, host_array
from .json_values import clipped, json_digest
from .version import __version__
from .weight import Layout, LoraWeight

FORMAT = "lorax_lite.adapter"
FORMAT_VERSION = 1


def metadata_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``info`` without its own ``sha256`` field."""
    return json_digest({k: v for k, v in info.items() if k != "sha256"})


def factor_arrays(node: LoraWeight) -> dict[str, Any]:
    """The saved arrays of an adapter: ``a``, ``b``, and DoRA's magnitude ``m``."""
    return {"a": node.a, "b": node.b, **({} if node.m is None else {"m": node.m})}


def adapter_entry(path: str, node: LoraWeight) -> dict[str, Any]:
    """What the metadata records of the adapter ``node`` at ``path``."""
    if node.w is None:
        raise ValueError(f"{path}: the adapter has no base weight to describe")
    dora = {} if node.m is None else {"m": array_entry(node.m), "detach_norm": node.detach_norm}
    residual = {} if node.residual_init is None else {"residual_init": node.residual_init}
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
        "a": array_entry(node.a),
        "b": array_entry(node.b),
        **dora,
        **residual,
    }


def array_entry(x: Any) -> dict[str, Any]:
    """Shape, dtype and a SHA-256 checksum of the bytes of ``x``."""
    host = host_array(x)
    digest = hashlib.sha256(np.ascontiguousarray(host).tobytes()).hexdigest()
    return {"shape": list(host.shape), "dtype": str(host.dtype), "sha256": digest}


def versions() -> dict[str, str]:
    """The versions of lorax_lite, JAX and orbax, recorded with every adapter."""
    return {"lorax_lite": __version__, "jax": jax.__version__, "orbax": ocp.__version__}


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()


def metadata_problems(info: dict[str, Any]) -> list[str]:
    """``"field: expected ..., found ..."`` for every field of the metadata that is not
    what `save_adapter` writes."""
    kinds = {"adapters": list, "trained": list, "base": dict, "versions": dict, "user": dict}
    problems = [
        f"{key}: expected a JSON {'object' if kind is dict else 'array'}, found "
        f"{clipped(info.get(key, _MISSING))}"
        for key, kind in kinds.items()
        if not isinstance(info.get(key), kind)
    ]
    config = info.get("config", _MISSING)
    if config is not None and not isinstance(config, dict):  # null: saved without a config
        problems.append(f"config: expected a JSON object or null, found {clipped(config)}")
    if "sha256" in info and not _is_hex(info["sha256"], 64):
        problems.append(f"sha256: expected 64 hexadecimal digits, found {clipped(info['sha256'])}")
    if problems:
        return problems
    try:
        if config is not None:
            LoraConfig.from_dict(config)
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
        f"versions[{k!r}]: expected a version string, found {clipped(v)}"
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
    if not is_int(rank, 1):
        problems.append(f"{field}.rank: expected an int >= 1, found {clipped(rank)}")
    scale, dropout = entry.get("scale", _MISSING), entry.get("dropout", _MISSING)
    if not _is_finite(scale):
        problems.append(f"{field}.scale: expected a finite number, found {clipped(scale)}")
    if not is_number(dropout) or not 0 <= dropout < 1:
        problems.append(f"{field}.dropout: expected a number in [0, 1), found {clipped(dropout)}")
    if not (
        isinstance(layout, list)
        and len(layout) == len(shape)
        and all(isinstance(r, str) and r in AXIS_ROLES for r in layout)
        and {"in", "out"} <= set(layout)
    ):
        problems.append(
            f"{field}.layout: expected one role of {AXIS_ROLES} per axis of the shape "
            f"{shape}, 'in' and 'out' among them, found {clipped(layout)}"
        )
    factors = saved_factors(entry)
    for factor in factors:
        problems += _array_entry_problems(
            entry.get(factor, _MISSING), f"{field}.{factor}", floating=True, named=False
        )
    if "residual_init" in entry and entry["residual_init"] not in RESIDUAL_INITS:
        problems.append(
            f"{field}.residual_init: expected one of {RESIDUAL_INITS}, found "
            f"{clipped(entry['residual_init'])}"
        )
    if "m" in entry and not isinstance(entry.get("detach_norm"), bool):
        problems.append(
            f"{field}.detach_norm: expected true or false, found "
            f"{clipped(entry.get('detach_norm', _MISSING))}"
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


def saved_factors(entry: dict[str, Any]) -> tuple[str, ...]:
    """The arrays an adapter entry describes: ``a``, ``b``, and ``m`` for DoRA."""
    return ("a", "b", "m") if "m" in entry else ("a", "b")


def _array_entry_problems(
    entry: Any, field: str, *, floating: bool, named: bool, checksum: bool = True
) -> list[str]:
    """Problems of a ``{path?, shape, dtype, sha256?}`` entry."""
    if not isinstance(entry, dict):
        return [f"{field}: expected a JSON object, found {clipped(entry)}"]
    get = lambda key: entry.get(key, _MISSING)
    problems = []
    if named and (not isinstance(get("path"), str) or not get("path")):
        problems.append(f"{field}.path: expected a leaf path, found {clipped(get('path'))}")
    if not _is_shape(get("shape")):
        found = clipped(get("shape"))
        problems.append(f"{field}.shape: expected a list of ints >= 0, found {found}")
    if not _is_dtype(get("dtype"), "floating" if floating else "array"):
        kind = "a floating-point dtype name" if floating else "the dtype name of a number or bool"
        problems.append(f"{field}.dtype: expected {kind}, found {clipped(get('dtype'))}")
    if checksum and not _is_hex(get("sha256"), 64):
        problems.append(
            f"{field}.sha256: expected 64 hexadecimal digits, found {clipped(get('sha256'))}"
        )
    return problems


def _fingerprint_field_problems(base: dict[str, Any]) -> list[str]:
    leaves, hashes = base.get("leaves", _MISSING), base.get("hashes", _MISSING)
    if not isinstance(leaves, dict) or not isinstance(hashes, dict):
        return [
            "base: expected {'leaves': {path: [shape, dtype]}, 'hashes': {path: hash}}, found "
            + clipped(base)
        ]
    problems = [
        f"base.leaves[{path!r}]: expected [shape, dtype name], found {clipped(value)}"
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
        f"found {clipped(value)}"
        for path, value in hashes.items()
        if path not in leaves or not _is_hex(value, 32)
    ]
    quantized = base.get("quantized", {})  # absent in files written before quantized bases
    if not isinstance(quantized, dict):
        found = clipped(quantized)
        return [*problems, f"base.quantized: expected {{path: storage}}, found {found}"]
    problems += [
        f"base.quantized[{path!r}]: expected the storage of a leaf in base.leaves, found "
        f"{clipped(value)}"
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


def _is_finite(value: Any) -> bool:
    """A number that is a finite float (JSON integers are unbounded: 10**400 is not)."""
    try:
        return is_number(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(d, 0) for d in value)


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
