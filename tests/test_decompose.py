"""The SVD helpers PiSSA, LoftQ and ``combine_adapters(method="svd")`` share, against
numpy's float64 SVD."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lorax_lite.decompose import as_matrices, split_svd, truncated_svd


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_split_svd_rebuilds_the_truncated_product_balanced(scale):
    rng = np.random.default_rng(0)
    m = rng.normal(size=(2, 12, 9))
    u, s, vh = truncated_svd(jnp.asarray(m, jnp.float32), 4)
    a, b = split_svd(u, s, vh, scale=scale)
    U, S, Vh = np.linalg.svd(m, full_matrices=False)
    best = (U[..., :4] * S[..., None, :4]) @ Vh[..., :4, :]
    got = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(got, best, atol=1e-5 * np.abs(best).max())
    # Balanced: column k of A and row k of B both have norm sqrt(S_k / scale).
    root = np.sqrt(S[..., :4] / scale)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=-2), root, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(b), axis=-1), root, rtol=1e-5)


def test_as_matrices_keeps_stack_and_flattens_rows_then_columns():
    x = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(as_matrices(x, 1, 2), np.arange(120).reshape(2, 12, 5))
    np.testing.assert_array_equal(as_matrices(x, 0, 1), np.arange(120).reshape(2, 60))
