"""LoftQ initialisation: the quantized base plus the adapter is closer to W than the
quantized W alone, checked in float64; the first iteration's factors are the float64
best rank-r fit of the quantization error (numpy's SVD). PEFT's own loftq_init needs
bitsandbytes on CUDA, so it is not run here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MLP, normal

import lorax_lite as ll
from lorax_lite.decompose import loftq
from lorax_lite.quant import quantize_array


def low_rank_plus_noise(shape, rank=6, seed=0):
    """A weight with a few large directions (where LoftQ's adapter helps) and noise."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(shape[0], rank)), rng.normal(size=(rank, shape[1]))
    return jnp.asarray(u @ v / np.sqrt(rank) + 0.3 * rng.normal(size=shape), jnp.float32)


def _error(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


def _dense(a, b, scale, q):
    return np.asarray(q, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8"])
def test_first_iteration_is_the_best_rank_r_fit_of_the_quantization_error(kind):
    w = low_rank_plus_noise((256, 96))
    scale, rank = 2.0, 8
    a, b, q = loftq(w, ll.Layout.dense(), rank, scale, quantization=dict(kind=kind, block=64))
    plain = quantize_array(w, kind=kind, block=64, axis=-2).dequantize()
    np.testing.assert_array_equal(q, plain)  # Q = quantize(W) at the first iteration
    residual = np.asarray(w, np.float64) - np.asarray(plain, np.float64)
    u, s, vh = np.linalg.svd(residual, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    fitted = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(fitted, best, atol=5e-5 * np.abs(best).max())  # float32 SVD
    assert _error(_dense(a, b, scale, q), w) < _error(plain, w)


def test_more_iterations_and_the_errors_they_reach():
    """Alternating moves Q and the factors together; the error stays below the
    quantized W's (printed: the measurement)."""
    w = low_rank_plus_noise((512, 128), seed=1)
    plain = _error(quantize_array(w, kind="nf4", block=64, axis=-2).dequantize(), w)
    errors = {}
    for n in (1, 2, 5):
        a, b, q = loftq(w, ll.Layout.dense(), 16, 1.0, quantization="nf4", iterations=n)
        errors[n] = _error(_dense(a, b, 1.0, q), w)
        again = quantize_array(q, kind="nf4", block=64, axis=-2)
        np.testing.assert_array_equal(again.dequantize(), q)  # Q quantizes to itself
    print(f"nf4 relative error: quantized W {plain:.4f}, LoftQ {errors}")
    assert max(errors.values()) < plain
    assert errors[5] <= errors[1] * 1.001


def test_init_loftq_quantizes_the_base_and_starts_closer_than_qlora():
    model = MLP((64, 32), ("up", "down"))
    x = normal((4, 128), seed=2)
    params = model.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.sign(p), params)  # heavier
    config = ll.LoraConfig(rank=8, alpha=16.0, targets=("up", "down"), init="loftq")
    tree = ll.init(params, config, key=jax.random.key(1), quantization="nf4")
    qlora = ll.init(params, ll.LoraConfig(rank=8, alpha=16.0, targets=("up", "down")),
                    key=jax.random.key(1), quantization="nf4")  # fmt: skip
    for name in ("up", "down"):
        node, w = tree["params"][name]["kernel"], params["params"][name]["kernel"]
        assert isinstance(node.w, ll.QuantizedWeight) and node.w.kind == "nf4"
        loftq_error = _error(_dense(node.a, node.b, node.scale, node.w.dequantize()), w)
        plain_error = _error(qlora["params"][name]["kernel"].w.dequantize(), w)
        assert loftq_error < plain_error
    exact = np.asarray(model.apply(params, x), np.float64)
    ours = ll.lora(model.apply)(tree, x)
    plain = ll.lora(model.apply)(qlora, x)
    assert _error(ours, exact) < _error(plain, exact)


def test_loftq_needs_the_quantization_and_spans_fan_in_axes():
    with pytest.raises(ValueError, match="needs the base's quantization"):
        loftq(normal((64, 8)), ll.Layout.dense(), 2, 1.0, quantization=None)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        loftq(normal((64, 8)), ll.Layout.dense(), 2, 1.0, quantization="nf4", iterations=0)
    # A DenseGeneral kernel, fan-in (4, 32): blocks of 64 span both axes, as ll.quantize.
    w, layout = normal((4, 32, 16), seed=3), ll.Layout((), (0, 1), (2,))
    a, b, q = loftq(w, layout, 4, 1.0, quantization="nf4")
    assert a.shape == (4, 32, 4) and b.shape == (4, 16)
    delta = np.einsum("hdr,ro->hdo", np.asarray(a, np.float64), np.asarray(b, np.float64))
    plain = quantize_array(w, kind="nf4", block=64, axis=(0, 1)).dequantize()
    assert _error(np.asarray(q, np.float64) + delta, w) < _error(plain, w)


def test_config_loftq_iter_reaches_decompose_and_more_alternations_fit_closer(tmp_path):
    """``LoraConfig(loftq_iter=n)`` through `ll.init` gives `loftq(..., iterations=n)`'s
    factors and base; the float64 error ||W - (Q + s A B)|| of 2 alternations is below 1's;
    the saved adapter's metadata keeps the field."""
    w = low_rank_plus_noise((256, 64), seed=4)
    params = {"dense": {"kernel": w}}
    errors = {}
    for n in (1, 2):
        config = ll.LoraConfig(rank=8, alpha=16.0, targets="dense", init="loftq", loftq_iter=n)
        tree = ll.init(params, config, key=jax.random.key(0), quantization="nf4")
        node = tree["dense"]["kernel"]
        a, b, q = loftq(w, ll.Layout.dense(), 8, node.scale, quantization="nf4", iterations=n)
        np.testing.assert_array_equal(node.a, a)
        np.testing.assert_array_equal(node.b, b)
        np.testing.assert_array_equal(node.w.dequantize(), q)
        dense = np.asarray(w, np.float64) - _dense(node.a, node.b, node.scale, node.w.dequantize())
        errors[n] = np.linalg.norm(dense)
    assert errors[2] < errors[1]
    ll.save_adapter(tmp_path / "adapter", tree, config)
    assert ll.LoraConfig.from_dict(ll.adapter_metadata(tmp_path / "adapter")["config"]) == config
