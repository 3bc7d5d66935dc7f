"""Quantized frozen weights: int8, int4 (symmetric and asymmetric) and NF4 blocks.

A `QuantizedWeight` stores a weight as integer codes in blocks of ``block``
consecutive entries along one axis, each block with its own scale (and, for
``"int4-asym"``, its own minimum). Two 4-bit codes share a byte: the first half
of a block in the low nibbles, the second half in the high nibbles (GGUF's order,
so that GGUF ``Q4_0``/``Q4_1`` blocks of 32 import as they are). The blocked axis
is counted from the end (``axis=-2`` for an ``(in, out)`` kernel blocked along
``in``), so stacking or slicing leading axes (``scan`` over layers, ``vmap``)
keeps a `QuantizedWeight` valid.

Kinds (``x`` one block, ``m = max |x|``):

* ``"int8"``: codes ``round(x / s)`` in ``[-127, 127]``, ``s = m / 127``.
* ``"int4"``: codes ``round(x / s)`` in ``[-8, 7]``, ``s = m / 7``, stored ``+ 8``.
* ``"int4-asym"``: codes ``round((x - min) / s)`` in ``[0, 15]``, ``s = (max - min) / 15``.
* ``"nf4"``: the nearest of QLoRA's 16 NormalFloat values to ``x / m``, scale ``m``.

Integer data has no gradient, so a quantized weight is frozen by construction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import is_float_dtype, is_int

KINDS = ("int8", "int4", "int4-asym", "nf4")

# QLoRA's NormalFloat-4 code book (Dettmers et al. 2023, appendix E): quantiles of a
# standard normal, normalized to [-1, 1], with an exact zero.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A frozen weight stored as blocks of integer codes with per-block scales.

    Attributes:
        data: the codes, shaped like the weight with the blocked axis split into
            ``(n_blocks, block)`` (``block // 2`` bytes for 4-bit kinds); ``int8`` for
            ``"int8"``, ``uint8`` (two codes a byte) otherwise.
        scales: one scale per block, shaped like ``data`` with the in-block axis 1.
        offsets: one minimum per block for ``"int4-asym"``, else ``None``.
        kind: one of `KINDS`.
        block: entries per block along the blocked axis.
        axis: the blocked axis of the weight, negative (counted from the end).
        dtype: the dtype `dequantize` returns.

    Example:
        >>> q = quantize_array(jnp.ones((64, 3)), kind="int8", block=32, axis=-2)
        >>> q.shape, bool((q.dequantize() == 1).all())
        ((64, 3), True)
    """

    data: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the weight."""
        pos = self.data.ndim + self.axis  # the in-block axis of data
        shape = self.data.shape
        return (*shape[: pos - 1], shape[pos - 1] * self.block, *shape[pos + 1 :])

    @property
    def ndim(self) -> int:
        """The number of axes of the weight."""
        return self.data.ndim - 1

    @property
    def nbytes(self) -> int:
        """Bytes as stored: codes, scales and offsets."""
        parts = (self.data, self.scales, self.offsets)
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in parts if x is not None)

    def dequantize(self) -> jax.Array:
        """The weight in ``dtype``, computed in float32 block by block."""
        pos = self.data.ndim + self.axis
        codes = self.data if self.kind == "int8" else _unpack(self.data, pos)
        if self.kind == "nf4":
            values = jnp.asarray(NF4_CODE)[codes]
        else:
            values = codes.astype(jnp.float32) - (8.0 if self.kind == "int4" else 0.0)
        out = values * self.scales.astype(jnp.float32)
        if self.offsets is not None:
            out = out + self.offsets.astype(jnp.float32)
        return out.reshape(self.shape).astype(self.dtype)

    @property
    def T(self) -> QuantizedWeight:
        """The transpose of a 2-D weight: its codes moved, nothing re-quantized."""
        if self.ndim != 2:
            raise ValueError(f"QuantizedWeight.T needs a 2-D weight, got shape {self.shape}")
        # (n, block, out) <-> (out, n, block): the other axis moves across the block pair.
        src, dst, axis = (-1, 0, -1) if self.axis == -2 else (0, -1, -2)
        move = lambda x: None if x is None else jnp.moveaxis(x, src, dst)
        parts = dict(data=move(self.data), scales=move(self.scales), offsets=move(self.offsets))
        return dataclasses.replace(self, **parts, axis=axis)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a `QuantizedWeight`."""
    return isinstance(x, QuantizedWeight)


def _unpack(data: jax.Array, pos: int) -> jax.Array:
    """Two 4-bit codes a byte: low nibbles first, then high nibbles, along ``pos``."""
    return jnp.concatenate([data & 0xF, data >> 4], axis=pos)


def _pack(codes: jax.Array, pos: int) -> jax.Array:
    low, high = jnp.split(codes.astype(jnp.uint8), 2, axis=pos)
    return low | (high << 4)


def quantize_array(
    x: jax.Array, *, kind: str, block: int = 64, axis: int = -1, path: str = "weight"
) -> QuantizedWeight:
    """Quantizes one float array in blocks of ``block`` entries along ``axis``.

    Args:
        x: a floating-point array.
        kind: one of `KINDS`.
        block: entries per block; must divide the size of ``axis`` (and be even for
            4-bit kinds).
        axis: the blocked axis (any sign; stored counted from the end).
        path: the leaf's name, for error messages.

    Returns:
        A `QuantizedWeight` that dequantizes to ``x``'s shape and dtype.

    Raises:
        ValueError: unknown kind, a block that is not a positive integer dividing the
            axis, odd 4-bit blocks, an axis out of range, a NaN or infinite entry
            (its block's scale would be lost).
        TypeError: a non-float array.
    """
    problem = _problem(x, kind, block, axis)
    if problem:
        raise (TypeError if "float" in problem else ValueError)(f"{path}: {problem}")
    block, axis = int(block), int(axis) % x.ndim - x.ndim
    pos = x.ndim + axis
    shape = x.shape
    blocks = jnp.asarray(x, jnp.float32).reshape(
        *shape[:pos], shape[pos] // block, block, *shape[pos + 1 :]
    )
    inner = pos + 1
    offsets = None
    if kind == "int4-asym":
        low, high = blocks.min(inner, keepdims=True), blocks.max(inner, keepdims=True)
        scales, offsets = (high - low) / 15, low
        codes = jnp.clip(jnp.round((blocks - low) / _nonzero(scales)), 0, 15)
    else:
        absmax = jnp.abs(blocks).max(inner, keepdims=True)
        if kind == "nf4":
            scales = absmax
            mid = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
            codes = jnp.searchsorted(mid, blocks / _nonzero(absmax))
        else:
            top = 127 if kind == "int8" else 7
            scales = absmax / top
            codes = jnp.clip(jnp.round(blocks / _nonzero(scales)), -top - (kind == "int4"), top)
            codes = codes.astype(jnp.int8) if kind == "int8" else codes + 8
    data = codes if kind == "int8" else _pack(codes, inner)
    return QuantizedWeight(data, scales, offsets, kind, block, axis, np.dtype(x.dtype))


def _nonzero(scale: jax.Array) -> jax.Array:
    return jnp.where(scale == 0, 1.0, scale)


def _problem(x: Any, kind: str, block: int, axis: int) -> str | None:
    """Why ``x`` cannot be quantized so, or None."""
    if kind not in KINDS:
        return f"unknown quantization kind {kind!r}; expected one of {KINDS}"
    if isinstance(x, QuantizedWeight):
        return f"already quantized ({x.kind}, block {x.block})"
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return f"only float weights are quantized, got dtype {x.dtype}"
    if not is_int(axis, -x.ndim) or axis >= x.ndim:
        return f"axis {axis!r} out of range for shape {tuple(x.shape)}"
    if not is_int(block, 1):
        return f"block must be a positive integer, got {block!r}"
    if x.shape[axis] % block:
        return f"block {block} does not divide axis {axis % x.ndim} of shape {tuple(x.shape)}"
    if kind != "int8" and block % 2:
        return f"4-bit blocks hold two codes a byte: block must be even, got {block}"
    return _nonfinite(x)


def _nonfinite(x: Any) -> str | None:
    """Where ``x`` holds NaN or infinity (one such entry takes its whole block's scale
    with it), or None. A traced ``x`` cannot be looked at and passes."""
    if isinstance(x, jax.core.Tracer):
        return None
    finite = jnp.isfinite(x)
    if bool(finite.all()):
        return None
    bad = np.argwhere(~np.asarray(finite))
    first = tuple(int(i) for i in bad[0])
    return (
        f"{len(bad)} non-finite entries, the first {np.asarray(x)[first]} at index {first}; "
        "quantizing would lose their blocks"
    )


# GGUF block types that map onto a kind exactly: bytes a block of 32, kind, has a minimum.
_GGUF = {"Q8_0": (34, "int8", False), "Q4_0": (18, "int4", False), "Q4_1": (20, "int4-asym", True)}


def from_gguf(
    blocks: np.ndarray, tensor_type: Any, *, dtype: Any = jnp.float32, path: str = "tensor"
) -> QuantizedWeight:
    """A GGUF tensor's ``Q8_0``, ``Q4_0`` or ``Q4_1`` blocks as a `QuantizedWeight`, as they
    are: each block's float16 scale (and minimum), its codes unchanged.

    Args:
        blocks: the raw bytes, ``uint8`` of shape ``(*rows, bytes_per_row)`` (as
            ``gguf.GGUFReader`` gives a quantized tensor's ``data``); the weight is
            ``(*rows, columns)`` in row-major (PyTorch) order, blocked along the columns.
        tensor_type: the block type: a name (``"Q4_1"``) or a ``gguf.GGMLQuantizationType``.
        dtype: the dtype `QuantizedWeight.dequantize` returns.
        path: the tensor's name, for error messages.

    Returns:
        A `QuantizedWeight` blocked along the last axis, 32 entries a block.

    Raises:
        ValueError: an unsupported block type, or bytes that are not whole blocks.
        TypeError: ``blocks`` that is not a ``uint8`` array (floats would be truncated
            to bytes; a ``bytes`` object has no rows: ``np.frombuffer(data, np.uint8)``
            reshaped to them), or a ``dtype`` that is not floating.
    """
    name = getattr(tensor_type, "name", str(tensor_type))
    if name not in _GGUF:
        raise ValueError(
            f"{path}: GGUF tensor type {name} is not supported as quantized blocks; "
            f"supported: {sorted(_GGUF)} (dequantize other types to float first)"
        )
    found = getattr(blocks, "dtype", None)
    if found != np.uint8 or not hasattr(blocks, "shape"):
        what = type(blocks).__name__ + ("" if found is None else f" of dtype {found}")
        raise TypeError(
            f"{path}: {name} blocks must be a uint8 array of raw bytes, shaped "
            f"(*rows, bytes_per_row), got a {what} (for a bytes object: "
            "np.frombuffer(data, np.uint8).reshape(rows, -1))"
        )
    if not is_float_dtype(dtype):
        raise TypeError(f"{path}: dtype must be a floating dtype, got {dtype!r}")
    size, kind, has_min = _GGUF[name]
    raw = np.ascontiguousarray(blocks, np.uint8)
    if raw.ndim < 1 or raw.shape[-1] % size:
        raise ValueError(
            f"{path}: {name} rows must be whole {size}-byte blocks, got shape {raw.shape}"
        )
    raw = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)
    half = lambda start: raw[..., start : start + 2].copy().view(np.float16)
    codes = raw[..., 4 if has_min else 2 :]
    data = codes.copy().view(np.int8) if kind == "int8" else codes.copy()
    offsets = jnp.asarray(half(2)) if has_min else None
    return QuantizedWeight(
        jnp.asarray(data), jnp.asarray(half(0)), offsets, kind, 32, -1, np.dtype(dtype)
    )
