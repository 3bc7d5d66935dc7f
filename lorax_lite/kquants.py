"""GGUF k-quant super-blocks (``Q4_K``, ``Q5_K``, ``Q6_K``) read into codes and scales.

A super-block holds 256 weights of one row in sub-blocks (8 of 32, or 16 of 16 for
``Q6_K``), each with a 6- or 8-bit scale (and for ``Q4_K``/``Q5_K`` a 6-bit minimum)
that a float16 factor per super-block multiplies (llama.cpp's ``ggml-quants.c``):

* ``Q4_K`` (144 bytes): ``d``, ``dmin`` (float16), 12 bytes of 6-bit scales and
  minimums, 128 bytes of nibbles; ``w = d * sc * q - dmin * m``, ``q`` in ``[0, 15]``.
* ``Q5_K`` (176 bytes): as ``Q4_K`` with 32 bytes of fifth bits before the nibbles.
* ``Q6_K`` (210 bytes): 128 bytes of low nibbles, 64 of two high bits, 16 int8 scales,
  ``d``; ``w = d * sc * (q - 32)``, ``q`` in ``[0, 63]``.

`lorax_lite.quant.from_gguf` turns the result into a `QuantizedWeight`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

QK = 256
"""Weights a super-block."""
SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
"""Bytes a super-block."""


class Decoded(NamedTuple):
    """A k-quant tensor's contents, rows as the file has them (``...`` the leading axes).

    Attributes:
        codes: ``uint8`` codes ``(..., n * 256)``, unsigned (``Q6_K``'s ``+ 32``).
        scales: sub-block scale codes ``(..., n * subs)`` (``uint8``, ``int8`` for Q6_K).
        d: the float16 factor of the scales ``(..., n)``.
        mins: sub-block minimum codes ``(..., n * subs)`` or ``None`` (Q6_K).
        dmin: the float16 factor of the minimums ``(..., n)`` or ``None``.
        block: weights a sub-block.
        bits: bits a code.
    """

    codes: np.ndarray
    scales: np.ndarray
    d: np.ndarray
    mins: np.ndarray | None
    dmin: np.ndarray | None
    block: int
    bits: int


def decode(raw: np.ndarray, name: str) -> Decoded:
    """Splits super-blocks ``raw`` (``uint8 (..., n, SIZES[name])``) into codes and scales.

    Args:
        raw: whole super-blocks of one type.
        name: ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.

    Returns:
        `Decoded`, each array flattened over the super-blocks of a row.
    """
    rows = raw.shape[:-2]
    half = lambda x: x.copy().view(np.float16)[..., 0]
    flat = lambda x: x.reshape(*rows, -1)
    if name == "Q6_K":
        ql, qh, sc, d = np.split(raw, [128, 192, 208], axis=-1)
        return Decoded(flat(_q6_codes(ql, qh)), flat(sc.view(np.int8)), half(d), None, None, 16, 6)
    d, dmin, packed, rest = np.split(raw, [2, 4, 16], axis=-1)
    sc, m = _six_bit_pairs(packed)
    if name == "Q4_K":
        codes, bits = _pairs_of_nibbles(rest), 4
    else:
        qh, qs = np.split(rest, [32], axis=-1)
        fifth = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (.., 8, 32)
        codes, bits = _pairs_of_nibbles(qs) | (fifth.reshape(*fifth.shape[:-2], QK) << 4), 5
    return Decoded(flat(codes), flat(sc), half(d), flat(m), half(dmin), 32, bits)


def _six_bit_pairs(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eight 6-bit scales and minimums from 12 bytes: bytes 0-3 hold scales 0-3 (and the
    top two bits of scales 4-7), bytes 4-7 minimums 0-3 (and those of minimums 4-7),
    bytes 8-11 the low four bits of scales 4-7 (low nibble) and minimums 4-7 (high)."""
    first, second, low = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([first & 63, (low & 15) | ((first >> 6) << 4)], axis=-1)
    mins = np.concatenate([second & 63, (low >> 4) | ((second >> 6) << 4)], axis=-1)
    return scales, mins


def _pairs_of_nibbles(qs: np.ndarray) -> np.ndarray:
    """256 codes from 128 bytes: each 32 bytes hold two sub-blocks, low nibbles first."""
    pairs = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    return (pairs & 15).reshape(*qs.shape[:-1], QK)


def _q6_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """256 six-bit codes: each half of 128 has 64 bytes of nibbles (low nibbles: codes
    0-63, high: 64-127) and 32 bytes of high bit pairs (pair ``k``: codes ``32k..32k+31``)."""
    lead = ql.shape[:-1]
    low = (ql.reshape(*lead, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
    high = (qh.reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return (low.reshape(*lead, 2, 128) | (high.reshape(*lead, 2, 128) << 4)).reshape(*lead, QK)
