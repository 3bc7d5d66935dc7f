"""PiSSA and OLoRA: adapters initialised from the weight itself, the base replaced by
the residual, so that ``residual + scale * A @ B`` equals the weight at step 0.

* PiSSA (Meng et al. 2024; PEFT ``init_lora_weights="pissa"``): ``A`` and ``B`` are the
  top-``r`` singular vectors of ``W``, each scaled by ``sqrt(S_r / scale)``, so that
  ``scale * A @ B`` is the best rank-``r`` approximation of ``W``. With ``niter`` the
  SVD is randomized (Halko et al. 2011), ``niter`` power iterations, for large weights.
* OLoRA (Büyükakyüz 2024; PEFT ``init_lora_weights="olora"``): from ``W^T = Q R``
  (PyTorch's ``(out, in)`` layout), ``A = R_r^T`` and ``B = Q_r^T``.

Weights of more than two axes are decomposed per stacked slice (a scanned layer, an
expert) as the matrix ``(prod(fan_in), prod(fan_out))`` of their layout.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .weight import Layout, LoraWeight

RESIDUAL_INITS = ("pissa", "olora")
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A, B, residual)`` for a weight ``w`` of ``layout``, decomposed in float32.

    Args:
        w: the float weight.
        layout: its stacked, fan-in and fan-out axes.
        rank: the adapter's rank ``r``.
        scale: the adapter's scale ``s``.
        init: ``"pissa"`` or ``"olora"``.
        dtype: the dtype of ``A`` and ``B``.
        niter: PiSSA only: None for the exact SVD, else the power iterations of a
            randomized SVD.
        key: the PRNG key of the randomized SVD.

    Returns:
        ``A``, ``B`` (shaped as `Layout.factor_shapes`) and ``w - s * A @ B`` in
        ``w``'s dtype (the factors as stored in ``dtype`` are subtracted).

    Raises:
        ValueError: for another ``init``, or ``niter`` without a ``key``.
    """
    matrix = weight_matrices(w, layout)
    if init == "pissa":
        a, b = split_svd(*_svd(matrix, rank, niter=niter, key=key), scale=scale)
    elif init == "olora":
        q, r = jnp.linalg.qr(jnp.swapaxes(matrix, -1, -2))
        a, b = jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)
    else:
        raise ValueError(f"residual_init: init must be one of {RESIDUAL_INITS}, got {init!r}")
    a_shape, b_shape = layout.factor_shapes(w.shape, rank)
    a, b = a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)
    delta = LoraWeight(w, a, b, scale, layout).delta(jnp.float32)
    return a, b, (w.astype(jnp.float32) - delta).astype(w.dtype)


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
