"""Quantized frozen weights: int8, int4 (symmetric and asymmetric) and NF4 blocks.

A `QuantizedWeight` stores a weight as integer codes in blocks of ``block``
consecutive entries along one axis, each block with its own scale (and, for
``"int4-asym"``, its own minimum). Two 4-bit codes share a byte: the first half
of a block in the low nibbles, the second half in the high nibbles (GGUF's order,
so that GGUF ``Q4_0``/``Q4_1`` blocks of 32 import as they are). The blocked axis
is counted from the end (``axis=-2`` for an ``(in, out)`` kernel blocked along
``in``), so stacking or slicing leading axes (``scan`` over layers, ``vmap``)
keeps a `QuantizedWeight` valid. Blocks may run across several consecutive axes
flattened (a DenseGeneral kernel's fan-in ``(heads, head_dim)``), as bitsandbytes
blocks the flattened tensor.

Kinds (``x`` one block, ``m = max |x|``):

* ``"int8"``: codes ``round(x / s)`` in ``[-127, 127]``, ``s = m / 127``.
* ``"int4"``: codes ``round(x / s)`` in ``[-8, 7]``, ``s = m / 7``, stored ``+ 8``.
* ``"int4-asym"``: codes ``round((x - min) / s)`` in ``[0, 15]``, ``s = (max - min) / 15``.
* ``"nf4"``: the nearest of QLoRA's 16 NormalFloat values to ``x / m``, scale ``m``.

GGUF k-quants (`from_gguf` only) add ``"int5-asym"`` (``Q5_K``, codes in ``[0, 31]``) and
``"int6"`` (``Q6_K``, codes in ``[-32, 31]`` stored ``+ 32``): the low four bits of each
code as nibbles, the others in bit planes after them.

With ``double_quant=True`` (QLoRA's double quantization) the block scales are themselves
quantized: `QuantizedScales`, 8-bit codes with a float32 factor per group of up to 256
scales and an offset, the mean of the scales. NF4 at block 64 then stores about 4.127
bits a weight instead of 4.5. GGUF k-quants store their sub-block scales (and minimums)
the same way, 6- or 8-bit codes with a float16 factor per super-block.

Integer data has no gradient, so a quantized weight is frozen by construction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import kquants
from .checks import is_float_dtype, is_int
from .scales import QuantizedScales, nonzero, quantize_scales, stored_bytes

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


Scales = jax.Array | QuantizedScales


def _value(x: Scales) -> jax.Array:
    return x.value() if isinstance(x, QuantizedScales) else x.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A frozen weight stored as blocks of integer codes with per-block scales.

    Attributes:
        data: the codes, shaped like the weight with the blocked axis (or axes, see
            ``merged``) split into ``(n_blocks, block * bits // 8)``; ``int8`` for
            ``"int8"``, ``uint8`` (two 4-bit codes a byte, then any higher bits in
            bit planes) otherwise.
        scales: one scale per block, shaped like ``data`` with the in-block axis 1;
            a `QuantizedScales` when double-quantized.
        offsets: one minimum per block for the ``-asym`` kinds, else ``None``.
        kind: one of `KINDS` or `GGUF_KINDS`.
        block: entries per block along the blocked axis.
        axis: the (last) blocked axis of the weight, negative (counted from the end).
        dtype: the dtype `dequantize` returns.
        merged: the sizes of the axes just before ``axis`` that the blocks also run
            across, flattened with it (``()``: blocks along ``axis`` alone).

    Example:
        >>> q = quantize_array(jnp.ones((64, 3)), kind="int8", block=32, axis=-2)
        >>> q.shape, bool((q.dequantize() == 1).all())
        ((64, 3), True)
    """

    data: jax.Array
    scales: Scales
    offsets: Scales | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    merged: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the weight."""
        pos = self.data.ndim + self.axis  # the in-block axis of data
        shape = self.data.shape
        last = shape[pos - 1] * self.block // math.prod(self.merged)
        return (*shape[: pos - 1], *self.merged, last, *shape[pos + 1 :])

    @property
    def ndim(self) -> int:
        """The number of axes of the weight."""
        return self.data.ndim - 1 + len(self.merged)

    @property
    def blocked_axes(self) -> tuple[int, ...]:
        """The weight's axes the blocks run along (non-negative, in order)."""
        last = self.ndim + self.axis
        return tuple(range(last - len(self.merged), last + 1))

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are quantized too (`QuantizedScales`)."""
        return isinstance(self.scales, QuantizedScales)

    @property
    def nbytes(self) -> int:
        """The bytes stored (codes, scales and offsets)."""
        return stored_bytes(self.data, self.scales, self.offsets)

    def dequantize(self) -> jax.Array:
        """The weight in ``dtype``, computed in float32 block by block."""
        pos = self.data.ndim + self.axis
        codes = _unpack(self.data, pos, _BITS[self.kind], self.block)
        if self.kind == "nf4":
            values = jnp.asarray(NF4_CODE)[codes]
        else:
            values = codes.astype(jnp.float32) - float(_ZERO.get(self.kind, 0))
        out = values * _value(self.scales)
        if self.offsets is not None:
            out = out + _value(self.offsets)
        return out.reshape(self.shape).astype(self.dtype)

    @property
    def T(self) -> QuantizedWeight:
        """Transposes a 2-D weight; its codes move, nothing is re-quantized."""
        if self.ndim != 2:
            raise ValueError(f"QuantizedWeight.T needs a 2-D weight, got shape {self.shape}")
        # (n, block, out) <-> (out, n, block): the other axis moves across the block pair.
        src, dst, axis = (-1, 0, -1) if self.axis == -2 else (0, -1, -2)

        def move(x):
            if isinstance(x, QuantizedScales):
                return x.moveaxis(src, dst)
            return None if x is None else jnp.moveaxis(x, src, dst)

        parts = dict(data=move(self.data), scales=move(self.scales), offsets=move(self.offsets))
        return dataclasses.replace(self, **parts, axis=axis)

    def options(self) -> dict[str, Any]:
        """The keywords of `quantize_array` that quantize a weight of this shape the same
        way (kind, block, blocked axes, double quantization).

        Example:
            >>> q = quantize_array(jnp.ones((4, 32, 8)), kind="nf4", block=64, axis=(0, 1))
            >>> q.options()
            {'kind': 'nf4', 'block': 64, 'axis': (0, 1), 'double_quant': False}
        """
        axes = self.blocked_axes
        axis = axes[0] if len(axes) == 1 else axes
        return dict(kind=self.kind, block=self.block, axis=axis, double_quant=self.double_quant)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a `QuantizedWeight`."""
    return isinstance(x, QuantizedWeight)


GGUF_KINDS = ("int5-asym", "int6")
"""Kinds that only GGUF k-quant blocks make (`from_gguf`)."""
_BITS = {"int8": 8, "int4": 4, "int4-asym": 4, "nf4": 4, "int5-asym": 5, "int6": 6}
_ZERO = {"int4": 8, "int6": 32}  # stored code of the value 0 for symmetric kinds


def _unpack(data: jax.Array, pos: int, bits: int, block: int) -> jax.Array:
    """Codes from ``data`` along ``pos``: the low four bits as two nibbles a byte (low
    nibbles first), then ``bits - 4`` higher bits a code in bit planes."""
    if bits == 8:
        return data
    nibbles, high = jnp.split(data, [block // 2], axis=pos)
    codes = jnp.concatenate([nibbles & 0xF, nibbles >> 4], axis=pos)
    if bits == 4:
        return codes
    extra = bits - 4
    mask = (1 << extra) - 1
    planes = [(high >> (extra * k)) & mask for k in range(8 // extra)]
    return codes | (jnp.concatenate(planes, axis=pos) << 4)


def _pack(codes: jax.Array, pos: int, bits: int) -> jax.Array:
    """The inverse of `_unpack` (codes of ``bits <= 6`` bits)."""
    codes = codes.astype(jnp.uint8)
    low, high = jnp.split(codes & 0xF, 2, axis=pos)
    packed = [low | (high << 4)]
    if bits > 4:
        extra = bits - 4
        planes = jnp.split(codes >> 4, 8 // extra, axis=pos)
        shifted = (p << (extra * k) for k, p in enumerate(planes))
        packed.append(sum(shifted, jnp.uint8(0)).astype(jnp.uint8))
    return jnp.concatenate(packed, axis=pos)


def quantize_array(
    x: jax.Array,
    *,
    kind: str,
    block: int = 64,
    axis: int | tuple[int, ...] = -1,
    double_quant: bool = False,
    path: str = "weight",
) -> QuantizedWeight:
    """Quantizes one float array in blocks of ``block`` entries along ``axis``.

    Args:
        x: a floating-point array.
        kind: one of `KINDS`.
        block: entries per block; must divide the size of ``axis`` (and be even for
            4-bit kinds).
        axis: the blocked axis (any sign; stored counted from the end), or consecutive
            axes (a kernel's fan-in): blocks run along the last of them, and across as
            many of the ones before it as ``block`` needs to divide their flattened size.
        double_quant: quantize the block scales too (QLoRA's double quantization): int8
            codes of ``scale - mean``, one float32 factor per group of up to
            ``lorax_lite.scales.SCALE_GROUP`` scales (consecutive blocks, then
            neighbouring columns).
        path: the leaf's name, for error messages.

    Returns:
        A `QuantizedWeight` that dequantizes to ``x``'s shape and dtype.

    Raises:
        ValueError: unknown kind, a block that is not a positive integer dividing the
            axis, odd 4-bit blocks, an axis out of range or axes not consecutive, a NaN
            or infinite entry (its block's scale would be lost).
        TypeError: a non-float array.

    Example:
        >>> w = jnp.ones((4, 32, 8))  # a DenseGeneral kernel, fan-in (4, 32)
        >>> q = quantize_array(w, kind="nf4", block=64, axis=(0, 1), double_quant=True)
        >>> q.blocked_axes, q.shape, bool((q.dequantize() == 1).all())
        ((0, 1), (4, 32, 8), True)
    """
    axes, problem = _blocked_axes(x, kind, block, axis)
    if problem:
        raise (TypeError if "float" in problem else ValueError)(f"{path}: {problem}")
    block, first, last = int(block), axes[0], axes[-1]
    shape = x.shape
    pos = last - x.ndim  # counted from the end: unchanged by the flattening
    span = math.prod(shape[first : last + 1])
    blocks = jnp.asarray(x, jnp.float32).reshape(
        *shape[:first], span // block, block, *shape[last + 1 :]
    )
    inner = blocks.ndim + pos
    offsets = None
    if kind == "int4-asym":
        low, high = blocks.min(inner, keepdims=True), blocks.max(inner, keepdims=True)
        scales, offsets = (high - low) / 15, low
        codes = jnp.clip(jnp.round((blocks - low) / nonzero(scales)), 0, 15)
    else:
        absmax = jnp.abs(blocks).max(inner, keepdims=True)
        if kind == "nf4":
            scales = absmax
            mid = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
            codes = jnp.searchsorted(mid, blocks / nonzero(absmax))
        else:
            top = 127 if kind == "int8" else 7
            scales = absmax / top
            codes = jnp.clip(jnp.round(blocks / nonzero(scales)), -top - (kind == "int4"), top)
            codes = codes.astype(jnp.int8) if kind == "int8" else codes + 8
    data = codes if kind == "int8" else _pack(codes, inner, 4)
    if double_quant:
        scales = quantize_scales(scales, inner - 1)
    merged = tuple(shape[first:last])
    return QuantizedWeight(data, scales, offsets, kind, block, pos, np.dtype(x.dtype), merged)


def fan_in_axis(fan_in: tuple[int, ...], ndim: int) -> int | tuple[int, ...]:
    """The default blocked ``axis`` of a weight of ``ndim`` axes with these fan-in axes:
    all of them when consecutive (blocks may run across them), else the last; ``-1``
    (the last axis) without fan-in axes.

    Example:
        >>> fan_in_axis((0, 1), 3), fan_in_axis((0,), 2), fan_in_axis((), 2)
        ((-3, -2), -2, -1)
    """
    if not fan_in:
        return -1
    axes = [i - ndim for i in fan_in]
    consecutive = len(axes) > 1 and axes == list(range(axes[0], axes[-1] + 1))
    return tuple(axes) if consecutive else axes[-1]


def _blocked_axes(
    x: Any, kind: str, block: int, axis: int | tuple[int, ...]
) -> tuple[tuple[int, ...], str | None]:
    """The axes blocks run along (non-negative) and why ``x`` cannot be quantized so, or
    None."""
    if kind not in KINDS:
        return (), f"unknown quantization kind {kind!r}; expected one of {KINDS}"
    if isinstance(x, QuantizedWeight):
        return (), f"already quantized ({x.kind}, block {x.block})"
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return (), f"only float weights are quantized, got dtype {x.dtype}"
    given = tuple(axis) if isinstance(axis, tuple | list) else (axis,)
    if not given or not all(is_int(a, -x.ndim) and a < x.ndim for a in given):
        return (), f"axis {axis!r} out of range for shape {tuple(x.shape)}"
    axes = tuple(int(a) % x.ndim for a in given)
    if axes != tuple(range(axes[0], axes[0] + len(axes))):
        return (), f"axes {axis!r} are not consecutive in shape {tuple(x.shape)}"
    if not is_int(block, 1):
        return (), f"block must be a positive integer, got {block!r}"
    # The fewest trailing axes whose flattened size the block divides.
    for k in range(len(axes) - 1, 0, -1):
        if math.prod(x.shape[a] for a in axes[k:]) % block == 0:
            axes = axes[k:]
            break
    if math.prod(x.shape[a] for a in axes) % block:
        where = f"axis {axes[0]}" if len(axes) == 1 else f"axes {axes} flattened"
        return (), f"block {block} does not divide {where} of shape {tuple(x.shape)}"
    if kind != "int8" and block % 2:
        return (), f"4-bit blocks hold two codes a byte: block must be even, got {block}"
    return axes, _nonfinite(x)


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
    """A GGUF tensor's ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q4_K``, ``Q5_K`` or ``Q6_K`` blocks as a
    `QuantizedWeight`, as they are: each block's float16 scale (and minimum), its codes
    unchanged; a k-quant's sub-block scales (and minimums) as `QuantizedScales`, their
    6- or 8-bit codes times the super-block's float16 factor (see ``lorax_lite.kquants``).

    Args:
        blocks: the raw bytes, ``uint8`` of shape ``(*rows, bytes_per_row)`` (as
            ``gguf.GGUFReader`` gives a quantized tensor's ``data``); the weight is
            ``(*rows, columns)`` in row-major (PyTorch) order, blocked along the columns.
        tensor_type: the block type: a name (``"Q4_1"``) or a ``gguf.GGMLQuantizationType``.
        dtype: the dtype `QuantizedWeight.dequantize` returns.
        path: the tensor's name, for error messages.

    Returns:
        A `QuantizedWeight` blocked along the last axis, 32 entries a block (16 for
        ``Q6_K``); kind ``int4-asym`` for ``Q4_1``/``Q4_K``, ``int5-asym`` for ``Q5_K``,
        ``int6`` for ``Q6_K``. Dequantized, it equals ``gguf.quants.dequantize`` bit for
        bit.

    Raises:
        ValueError: an unsupported block type, or bytes that are not whole blocks.
        TypeError: ``blocks`` that is not a ``uint8`` array (floats would be truncated
            to bytes; a ``bytes`` object has no rows: ``np.frombuffer(data, np.uint8)``
            reshaped to them), or a ``dtype`` that is not floating.
    """
    name = getattr(tensor_type, "name", str(tensor_type))
    if name not in _GGUF and name not in kquants.SIZES:
        raise ValueError(
            f"{path}: GGUF tensor type {name} is not supported as quantized blocks; "
            f"supported: {sorted([*_GGUF, *kquants.SIZES])} (dequantize other types to "
            "float first)"
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
    size = _GGUF[name][0] if name in _GGUF else kquants.SIZES[name]
    raw = np.ascontiguousarray(blocks, np.uint8)
    if raw.ndim < 1 or raw.shape[-1] % size:
        raise ValueError(
            f"{path}: {name} rows must be whole {size}-byte blocks, got shape {raw.shape}"
        )
    raw = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)
    if name in kquants.SIZES:
        return _from_kquants(kquants.decode(raw, name), np.dtype(dtype))
    _, kind, has_min = _GGUF[name]
    half = lambda start: raw[..., start : start + 2].copy().view(np.float16)
    codes = raw[..., 4 if has_min else 2 :]
    data = codes.copy().view(np.int8) if kind == "int8" else codes.copy()
    offsets = jnp.asarray(half(2)) if has_min else None
    return QuantizedWeight(
        jnp.asarray(data), jnp.asarray(half(0)), offsets, kind, 32, -1, np.dtype(dtype)
    )


_KQUANT_KINDS = {4: "int4-asym", 5: "int5-asym", 6: "int6"}


def _from_kquants(k: kquants.Decoded, dtype: np.dtype) -> QuantizedWeight:
    """A `QuantizedWeight` of decoded k-quant super-blocks, blocked by sub-block."""
    rows, subs = k.codes.shape[:-1], kquants.QK // k.block
    codes = jnp.asarray(k.codes.reshape(*rows, -1, k.block))
    groups = (1,) * len(rows) + (subs, 1)

    def scales(codes: np.ndarray, factors: np.ndarray) -> QuantizedScales:
        return QuantizedScales(
            jnp.asarray(codes[..., None]), jnp.asarray(factors[..., None]), None, groups
        )

    # w = d sc q - dmin m; decode gives mins and dmin together (Q6_K: neither)
    offsets = None if k.mins is None or k.dmin is None else scales(k.mins, -k.dmin)
    data = _pack(codes, codes.ndim - 1, k.bits)
    kind = _KQUANT_KINDS[k.bits]
    return QuantizedWeight(data, scales(k.scales, k.d), offsets, kind, k.block, -1, dtype)
