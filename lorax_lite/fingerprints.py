"""Fingerprints of a base: what a checkpoint records to recognise the weights it was
trained on (paths, shapes, dtypes, a cheap content hash of sampled elements)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .quant import is_quantized
from .targets import named_leaves

HASH_SAMPLES = 4096


def fingerprint(base: Any, hashed: list[str]) -> dict[str, Any]:
    """Path, shape and dtype of every leaf of ``base``, a content hash of the ``hashed``
    (of the stored codes and scales for a quantized leaf), and each quantized leaf's
    storage (`storage`)."""
    leaves = dict(named_leaves(base, is_leaf=is_quantized))
    return {
        "leaves": {p: [list(np.shape(x)), dtype_name(x)] for p, x in leaves.items()},
        "hashes": {p: content_hash(leaves[p]) for p in hashed},
        "quantized": {p: storage(x) for p, x in leaves.items() if is_quantized(x)},
    }


def storage(x: Any) -> str:
    """How a base leaf is stored: ``"nf4 (block 64, axis -2)"``, with the blocked axes
    when blocks span several (``"axes (-3, -2)"``) and ``", double quant"`` when the
    scales are quantized too; or ``"float"``."""
    if not is_quantized(x):
        return "float"
    axes = tuple(a - x.ndim for a in x.blocked_axes)
    where = f"axis {x.axis}" if len(axes) == 1 else f"axes {axes}"
    double = ", double quant" if x.double_quant else ""
    return f"{x.kind} (block {x.block}, {where}{double})"


def dtype_name(x: Any) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else str(np.asarray(x).dtype)


def content_hash(x: Any) -> str:
    """A cheap hash of an array: shape, dtype and an evenly strided sample of its elements
    (of each stored array, codes and scales, for a `QuantizedWeight`).

    The sample is taken with one stride per axis, so a sharded array is never
    gathered whole. Two different weights (a fine-tuned base, another seed) differ
    in the sample unless they agree on every sampled element.
    """
    if is_quantized(x):
        parts = [content_hash(a) for a in jax.tree_util.tree_leaves(x)]
        text = "|".join([storage(x), *parts]).encode()
        return hashlib.sha256(text).hexdigest()[:32]
    shape = tuple(np.shape(x))
    per_axis = math.ceil(HASH_SAMPLES ** (1 / max(len(shape), 1)))
    index = tuple(slice(None, None, max(1, math.ceil(d / per_axis))) for d in shape)
    sample = np.ascontiguousarray(host_array(x[index] if shape else x))
    header = f"{shape}|{sample.dtype}|".encode()
    return hashlib.sha256(header + sample.tobytes()).hexdigest()[:32]


def host_array(x: Any) -> np.ndarray:
    """``x`` as a NumPy array; one spanning processes is gathered from all of them (a
    collective: every process must make the same calls in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
