"""PiSSA, OLoRA and LoftQ: adapters initialised from the weight itself, the base replaced
by a residual, so that ``residual + scale * A @ B`` equals (LoftQ: approximates, with a
quantized residual) the weight at step 0.

* PiSSA (Meng et al. 2024; PEFT ``init_lora_weights="pissa"``): ``A`` and ``B`` are the
  top-``r`` singular vectors of ``W``, each scaled by ``sqrt(S_r / scale)``, so that
  ``scale * A @ B`` is the best rank-``r`` approximation of ``W``. With ``niter`` the
  SVD is randomized (Halko et al. 2011), ``niter`` power iterations, for large weights.
* OLoRA (Büyükakyüz 2024; PEFT ``init_lora_weights="olora"``): from ``W^T = Q R``
  (PyTorch's ``(out, in)`` layout), ``A = R_r^T`` and ``B = Q_r^T``.
* LoftQ (Li et al. 2024; PEFT ``init_lora_weights="loftq"``): alternately quantize
  ``W - s A B`` to ``Q`` and refit ``s A B`` to ``W - Q`` by truncated SVD, so that the
  quantized base plus the adapter is closer to ``W`` than the quantized ``W`` alone.

Weights of more than two axes are decomposed per stacked slice (a scanned layer, an
expert) as the matrix ``(prod(fan_in), prod(fan_out))`` of their layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .quant import fan_in_axis, quantize_array
from .weight import Layout, LoraWeight

RESIDUAL_INITS = ("pissa", "olora", "loftq")
"""The `LoraConfig.init` values that change the base weight."""
OVERSAMPLE = 10  # extra random directions of the randomized SVD (Halko et al.'s default)
HIGHEST = jax.lax.Precision.HIGHEST
"""The matmul precision of every decomposition and of the errors reported on it."""


def residual_init(
    w: jax.Array,
    layout: Layout,
    rank: int,
    scale: float,
    *,
    init: str,
    dtype: Any,
    niter: int | None = None,
    key: jax.Array | None = None,
    quantization: str | Mapping[str, Any] | None = None,
    loftq_iter: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A, B, residual)`` for a weight ``w`` of ``layout``, decomposed in float32.

    Args:
        w: the float weight.
        layout: its stacked, fan-in and fan-out axes.
        rank: the adapter's rank ``r``.
        scale: the adapter's scale ``s``.
        init: ``"pissa"``, ``"olora"`` or ``"loftq"``.
        dtype: the dtype of ``A`` and ``B``.
        niter: PiSSA only: None for the exact SVD, else the power iterations of a
            randomized SVD.
        key: the PRNG key of the randomized SVD.
        quantization: LoftQ only: the base's quantization, as `ll.init` takes it.
        loftq_iter: LoftQ only: alternations of quantizing and refitting.

    Returns:
        ``A``, ``B`` (shaped as `Layout.factor_shapes`) and ``w - s * A @ B`` in
        ``w``'s dtype (the factors as stored in ``dtype`` are subtracted); for LoftQ
        the dequantized ``Q`` instead, which quantizes to itself.

    Raises:
        ValueError: for another ``init``, ``niter`` without a ``key``, or LoftQ
            without ``quantization``.
    """
    if init == "loftq":
        return loftq(w, layout, rank, scale, quantization=quantization, dtype=dtype,
                     iterations=loftq_iter)  # fmt: skip
    matrix = weight_matrices(w, layout)
    if init == "pissa":
        a, b = split_svd(*_svd(matrix, rank, niter=niter, key=key), scale=scale)
    elif init == "olora":
        q, r = jnp.linalg.qr(jnp.swapaxes(matrix, -1, -2))
        a, b = jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)
    else:
        raise ValueError(f"residual_init: init must be one of {RESIDUAL_INITS}, got {init!r}")
    a, b = _as_factors(a, b, w, layout, dtype)
    return a, b, _minus_delta(w, a, b, scale, layout)


def loftq(
    w: jax.Array,
    layout: Layout,
    rank: int,
    scale: float,
    *,
    quantization: str | Mapping[str, Any] | None,
    dtype: Any = jnp.float32,
    iterations: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LoftQ: factors that make the quantized base plus the adapter close to ``w``.

    Starting from ``Q = quantize(W)``, each iteration fits ``s A B`` to ``W - Q`` (the
    truncated SVD, split as in PiSSA) and quantizes ``W - s A B`` again (PEFT's
    ``loftq_init``, whose last ``Q`` is the one the adapter was fitted to).

    Args:
        w: the float weight ``W``.
        layout: its stacked, fan-in and fan-out axes.
        rank: the adapter's rank ``r``.
        scale: the adapter's scale ``s``.
        quantization: a kind such as ``"nf4"`` or the keywords of `ll.quantize`
            (``kind``, ``block``, ``axis``, ``double_quant``); by default blocks along
            the fan-in axes, as `ll.quantize` places them.
        dtype: the dtype of ``A`` and ``B``.
        iterations: alternations (PEFT's ``loftq_iter``, default 1).

    Returns:
        ``A``, ``B`` and the dequantized base ``Q`` in ``w``'s dtype; quantized again
        with the same options, ``Q`` gives the same codes.

    Raises:
        ValueError: without ``quantization``, or ``iterations < 1``.
    """
    if quantization is None:
        raise ValueError("loftq: init='loftq' needs the base's quantization (quantization=)")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"loftq: iterations must be an int >= 1, got {iterations!r}")
    spec: dict[str, Any] = (
        {"kind": quantization} if isinstance(quantization, str) else dict(quantization)
    )
    spec.pop("also", None)  # plain leaves: not this weight's business
    spec.setdefault("axis", fan_in_axis(layout.fan_in, w.ndim))
    target, base = w.astype(jnp.float32), w
    for _ in range(iterations):
        q = quantize_array(base, **spec).dequantize()
        residual = weight_matrices(target - q.astype(jnp.float32), layout)
        a, b = split_svd(*truncated_svd(residual, rank), scale=scale)
        a, b = _as_factors(a, b, w, layout, dtype)
        base = _minus_delta(w, a, b, scale, layout)
    return a, b, q


def _as_factors(
    a: jax.Array, b: jax.Array, w: jax.Array, layout: Layout, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Matrices ``(stack..., d_in, r)`` and ``(stack..., r, d_out)`` as the layout's
    factors, in ``dtype``."""
    a_shape, b_shape = layout.factor_shapes(w.shape, a.shape[-1])
    return a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)


def _minus_delta(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: Layout):
    """``w - s A B`` in ``w``'s dtype, computed in float32."""
    delta = LoraWeight(w, a, b, scale, layout).delta(jnp.float32)
    return (w.astype(jnp.float32) - delta).astype(w.dtype)


def weight_matrices(w: jax.Array, layout: Layout) -> jax.Array:
    """``w`` in float32 as matrices ``(stack..., prod(fan_in), prod(fan_out))``, each group
    of axes in the layout's order (the order of the factors' axes)."""
    w = jnp.transpose(w.astype(jnp.float32), layout.stack + layout.fan_in + layout.fan_out)
    return as_matrices(w, len(layout.stack), len(layout.fan_in))


def as_matrices(x: jax.Array, n_stack: int, n_rows: int) -> jax.Array:
    """``x`` reshaped to ``(stack..., rows, columns)``: its first ``n_stack`` axes kept, the
    next ``n_rows`` flattened into the rows, the rest into the columns.

    ``A`` of a layout is ``as_matrices(a, n_stack, n_fan_in)`` (``(stack..., d_in, r)``),
    ``B`` is ``as_matrices(b, n_stack, 1)`` (``(stack..., r, d_out)``).
    """
    stack = x.shape[:n_stack]
    return x.reshape(*stack, math.prod(x.shape[n_stack : n_stack + n_rows]), -1)


def split_svd(
    u: jax.Array, s: jax.Array, vh: jax.Array, *, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` with ``scale * A @ B == U diag(S) Vh``: ``sqrt(S / scale)`` on each side.

    Args:
        u: left singular vectors ``(..., m, r)``.
        s: singular values ``(..., r)``.
        vh: right singular vectors ``(..., r, n)``.
        scale: the adapter's scale ``s``.

    Returns:
        ``A (..., m, r)`` and ``B (..., r, n)``, balanced (equal column and row norms).
    """
    root = jnp.sqrt(s / scale)
    return u * root[..., None, :], root[..., :, None] * vh


def truncated_svd(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``rank`` ``(U, S, Vh)`` of each matrix in ``m`` by the exact SVD."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _svd(
    m: jax.Array, rank: int, *, niter: int | None, key: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``rank`` ``(U, S, Vh)`` of each matrix in ``m``, exact or randomized."""
    if niter is None:
        return truncated_svd(m, rank)
    if key is None:
        raise ValueError("residual_init: a randomized SVD (niter) needs a key")
    return randomized_svd(m, rank, niter=niter, key=key)


def randomized_svd(
    m: jax.Array, rank: int, *, niter: int, key: jax.Array, oversample: int = OVERSAMPLE
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``rank`` singular triplets of each matrix in ``m`` (batched over leading
    axes), by a randomized range finder with ``niter`` power iterations.

    A Gaussian sketch of ``rank + oversample`` columns is re-orthonormalized (QR) after
    every product with ``m`` or ``m^T``; the SVD of the small projection ``Q^T m`` gives
    the triplets. Each power iteration squares the decay of the singular values the
    sketch sees, so a few make the result close to the exact SVD's.

    Args:
        m: matrices ``(..., d_in, d_out)``.
        rank: how many triplets.
        niter: power iterations (0 is the plain range finder).
        key: PRNG key of the sketch.
        oversample: extra sketch columns (PEFT, through ``torch.svd_lowrank``, uses none).

    Returns:
        ``U (..., d_in, rank)``, ``S (..., rank)``, ``Vh (..., rank, d_out)``.
    """
    d_in, d_out = m.shape[-2:]
    width = min(rank + oversample, d_in, d_out)
    sketch = jax.random.normal(key, (*m.shape[:-2], d_out, width), m.dtype)
    mt = jnp.swapaxes(m, -1, -2)
    q, _ = jnp.linalg.qr(jnp.matmul(m, sketch, precision=HIGHEST))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(jnp.matmul(mt, q, precision=HIGHEST))
        q, _ = jnp.linalg.qr(jnp.matmul(m, q, precision=HIGHEST))
    projected = jnp.matmul(jnp.swapaxes(q, -1, -2), m, precision=HIGHEST)
    u, s, vh = jnp.linalg.svd(projected, full_matrices=False)
    return jnp.matmul(q, u[..., :rank], precision=HIGHEST), s[..., :rank], vh[..., :rank, :]
