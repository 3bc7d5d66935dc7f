"""Double quantization (QLoRA, section 3): block scales stored as 8-bit codes.

`QuantizedScales` holds scales as ``codes * factor + offset``, one float factor per group
of scales. `quantize_scales` makes them from float32 block scales (QLoRA's double
quantization); GGUF k-quants' sub-block scales are stored the same way
(`lorax_lite.quant.from_gguf`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedScales:
    """Block scales (or minimums) stored as 8-bit codes: ``codes * factor + offset``.

    Each factor serves a group of ``groups[i]`` consecutive codes along each axis ``i``,
    counted from the end: slicing leading axes (a scan over stacked layers, whose groups
    are 1) keeps the scales valid.

    Attributes:
        codes: ``int8`` or ``uint8``, shaped like the scales they stand for.
        factors: one float factor per group: ``codes``' shape with axis ``i`` divided
            by ``groups[i]``.
        offsets: added after the product, broadcastable to ``codes`` once expanded
            like ``factors`` (size 1 or the factors' size along each axis), or ``None``.
        groups: codes per factor along each axis.
    """

    codes: jax.Array
    factors: jax.Array
    offsets: jax.Array | None
    groups: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the scales."""
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        """The bytes stored (codes, factors and offsets)."""
        return stored_bytes(self.codes, self.factors, self.offsets)

    def value(self) -> jax.Array:
        """The scales in float32."""
        out = self.codes.astype(jnp.float32) * self._expand(self.factors)
        return out if self.offsets is None else out + self._expand(self.offsets)

    def _expand(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for axis, g in zip(range(-1, -x.ndim - 1, -1), reversed(self.groups)):
            if g > 1 and x.shape[axis] > 1:
                x = jnp.repeat(x, g, axis=axis)
        return x

    def moveaxis(self, src: int, dst: int) -> QuantizedScales:
        """The same scales with axis ``src`` moved to ``dst`` (as ``jnp.moveaxis``)."""
        groups = list(self.groups)
        groups.insert(dst % len(groups), groups.pop(src))
        offsets = None if self.offsets is None else jnp.moveaxis(self.offsets, src, dst)
        return QuantizedScales(
            jnp.moveaxis(self.codes, src, dst),
            jnp.moveaxis(self.factors, src, dst),
            offsets,
            tuple(groups),
        )


SCALE_GROUP = 256
"""Block scales per float32 factor under double quantization (QLoRA's blocks of 256)."""


def quantize_scales(scales: jax.Array, blocks_axis: int) -> QuantizedScales:
    """Double quantization: float32 block scales as int8 codes of ``scale - mean``, with
    a float32 factor (``max |scale - mean| / 127``) per group of up to ``SCALE_GROUP``.

    A group is the largest divisor of the number of blocks up to ``SCALE_GROUP``, times
    (if that is fewer) a divisor of the last axis, when it follows the blocks. The mean
    is taken per slice of the axes before ``blocks_axis`` (a stacked layer keeps its own).

    Args:
        scales: the float32 scales, shaped like the codes with the in-block axis 1.
        blocks_axis: the axis of ``scales`` that counts blocks.

    Returns:
        `QuantizedScales` whose `QuantizedScales.value` is within half a step
        (``factor / 2``) of each scale.
    """
    groups = [1] * scales.ndim
    groups[blocks_axis] = _divisor(scales.shape[blocks_axis], SCALE_GROUP)
    if blocks_axis + 2 < scales.ndim:
        groups[-1] = _divisor(scales.shape[-1], SCALE_GROUP // groups[blocks_axis])
    mean = scales.mean(tuple(range(blocks_axis, scales.ndim)), keepdims=True)
    centred = scales - mean
    grouped = centred.reshape([n for size, g in zip(scales.shape, groups) for n in (size // g, g)])
    inner = tuple(range(1, grouped.ndim, 2))
    factors = jnp.abs(grouped).max(inner) / 127
    expanded = jnp.expand_dims(factors, inner)
    codes = jnp.clip(jnp.round(grouped / nonzero(expanded)), -127, 127)
    return QuantizedScales(
        codes.astype(jnp.int8).reshape(scales.shape), factors, mean, tuple(groups)
    )


def _divisor(n: int, most: int) -> int:
    """The largest divisor of ``n`` that is at most ``most``."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def nonzero(scale: jax.Array) -> jax.Array:
    """``scale`` with zeros replaced by 1 (a block of zeros divides by it)."""
    return jnp.where(scale == 0, 1.0, scale)


def stored_bytes(*parts: Any) -> int:
    """Bytes of arrays and `QuantizedScales` as stored (``None`` counts nothing)."""
    total = 0
    for x in parts:
        if isinstance(x, QuantizedScales):
            total += x.nbytes
        elif x is not None:
            total += math.prod(x.shape) * x.dtype.itemsize
    return total
