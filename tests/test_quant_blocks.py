"""Blocks across several fan-in axes, double quantization and GGUF k-quants, against
independent references (numpy float64 NF4, ``gguf.quants.dequantize``), inside `ll.lora`
and a train step."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import normal

import lorax_lite as ll
from lorax_lite.fingerprints import content_hash, storage
from lorax_lite.quant import NF4_CODE, from_gguf, quantize_array
from lorax_lite.scales import SCALE_GROUP


class HeadsOut(nn.Module):
    """An attention output projection: fan-in (heads, head_dim) = (4, 32), 16 outputs."""

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(x))


def _heads_tree(seed=0):
    model, x = HeadsOut(), normal((3, 4, 32), seed=seed + 1)
    params = model.init(jax.random.key(seed), x)
    config = ll.LoraConfig(rank=4, targets="kernel")
    tree = ll.init(params, config, key=jax.random.key(2), fn=model.apply, args=(x,))
    node = tree["params"]["out"]["kernel"]
    b = normal(node.b.shape, seed=5, scale=0.1)  # a non-zero adapter
    tree["params"]["out"]["kernel"] = ll.LoraWeight(node.w, node.a, b, node.scale, node.layout)
    return model, x, tree


def _nf4_reference(w: np.ndarray, block: int) -> np.ndarray:
    """NF4 in float64: blocks of ``block`` consecutive rows of ``w`` (rows, cols), each
    entry the nearest code value times its block's absmax."""
    blocks = w.reshape(-1, block, w.shape[-1])
    absmax = np.abs(blocks).max(1, keepdims=True)
    nearest = np.abs(blocks[..., None] / absmax[..., None] - NF4_CODE).argmin(-1)
    return (NF4_CODE[nearest] * absmax).reshape(w.shape)


def test_block_spans_the_flattened_fan_in_axes():
    """A (4, 32, 16) kernel at block 64 (was: "block 64 does not divide axis 1") is
    blocked along the flattened fan-in 128, as bitsandbytes blocks a flattened tensor."""
    model, x, tree = _heads_tree()
    w = tree["params"]["out"]["kernel"].w
    q = ll.quantize(tree, kind="nf4", block=64)["params"]["out"]["kernel"].w
    assert isinstance(q, ll.QuantizedWeight) and q.shape == w.shape
    assert q.blocked_axes == (0, 1) and q.merged == (4,) and q.data.shape == (2, 32, 16)
    flat = np.asarray(w, np.float64).reshape(128, 16)
    expected = _nf4_reference(flat, 64).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(q.dequantize()), expected, rtol=1e-6, atol=1e-7)
    again = quantize_array(q.dequantize(), **q.options())
    np.testing.assert_array_equal(again.data, q.data)  # its own dequantization is a fixed point


def test_block_spans_only_the_axes_it_needs():
    """Where the block divides the last fan-in axis, blocks stay along it (as before)."""
    w = normal((4, 128, 8))
    q = quantize_array(w, kind="int8", block=64, axis=(0, 1))
    assert q.blocked_axes == (1,) and q.merged == () and q.data.shape == (4, 2, 64, 8)
    with pytest.raises(ValueError, match=r"out: block 48 does not divide axes \(0, 1\) flat"):
        quantize_array(normal((4, 32, 8)), kind="nf4", block=48, axis=(0, 1), path="out")
    with pytest.raises(ValueError, match="not consecutive"):
        quantize_array(w, kind="nf4", block=64, axis=(0, 2))


@pytest.mark.parametrize("double_quant", [False, True])
def test_multi_axis_blocks_in_lora_and_a_train_step(double_quant):
    model, x, tree = _heads_tree()
    q = ll.quantize(tree, kind="nf4", block=64, double_quant=double_quant)
    node = q["params"]["out"]["kernel"]
    assert node.w.merged == (4,) and node.w.double_quant == double_quant
    # Forward against float64 on the dequantized base.
    w = np.asarray(node.w.dequantize(), np.float64)
    delta = node.scale * np.einsum("hdr,ro->hdo", np.asarray(node.a), np.asarray(node.b))
    bias = np.asarray(q["params"]["out"]["bias"], np.float64)
    expected = np.einsum("bhd,hdo->bo", np.tanh(np.asarray(x, np.float64)), w + delta) + bias
    out = jax.jit(ll.lora(model.apply, strict=True))(q, x)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5 * np.abs(expected).max())

    def loss_fn(t, batch, key):
        return jnp.mean((model.apply(t, batch[0]) - batch[1]) ** 2)

    init, step = ll.train_step(ll.lora(loss_fn, strict=True), optax.adam(1e-2))
    state = init(q, jax.random.key(0))
    codes = np.asarray(state.frozen["params"]["out"]["kernel"].w.data).copy()
    losses = []
    for _ in range(4):
        state, metrics = step(state, (x, normal((3, 16), seed=9)))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(state.frozen["params"]["out"]["kernel"].w.data, codes)


def _relative_error(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("shape, axis", [((1024, 512), -2), ((3, 512, 96), -2), ((96, 4096), -1)])
def test_double_quant_scales_within_half_a_step_and_same_codes(shape, axis):
    """The codes are single quantization's; each block's scale (its absmax, in float64
    here) is recovered to within half its group's factor, the factor at most the
    group's largest distance from the mean over 127."""
    w = normal(shape, seed=4)
    single = quantize_array(w, kind="nf4", block=64, axis=axis)
    double = quantize_array(w, kind="nf4", block=64, axis=axis, double_quant=True)
    np.testing.assert_array_equal(double.data, single.data)
    pos = w.ndim + axis
    blocks = np.moveaxis(np.asarray(w, np.float64), pos, -1).reshape(*np.moveaxis(
        np.asarray(w), pos, -1).shape[:-1], -1, 64)  # fmt: skip
    absmax = np.moveaxis(np.abs(blocks).max(-1), -1, pos)  # (..., n_blocks, ...)
    s = double.scales
    value = np.squeeze(np.asarray(s.value(), np.float64), pos + 1)
    factors = np.squeeze(np.asarray(s._expand(s.factors), np.float64), pos + 1)
    assert np.prod(s.groups) <= SCALE_GROUP and s.codes.dtype == jnp.int8
    assert (np.abs(value - absmax) <= factors / 2 * (1 + 1e-5) + 1e-7).all()
    # Double quantization adds little error to the weight (a measurement: printed).
    e1, e2 = _relative_error(single.dequantize(), w), _relative_error(double.dequantize(), w)
    print(f"nf4 block 64 {shape}: relative error single {e1:.5f}, double {e2:.5f}")
    assert e2 <= e1 * 1.01


def test_double_quant_nf4_stores_4_127_bits_a_weight():
    """QLoRA section 3: 4 + 8/64 + 32/(64*256) bits, <= 0.26x bf16's bytes."""
    w = normal((4096, 1024), seed=1)
    q = quantize_array(w, kind="nf4", block=64, axis=-2, double_quant=True)
    bits = q.nbytes * 8 / w.size
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4, bits
    assert q.nbytes / (w.size * 2) <= 0.26
    assert ll.count({"w": q})["total_bytes"] == q.nbytes


def test_double_quant_through_a_scan_and_a_transpose():
    """Stacked layers keep their own scale offsets (the scan slices them); ``.T``
    moves the scale codes and factors with the codes."""
    stacked = quantize_array(normal((3, 256, 32)), kind="nf4", block=64, axis=-2,
                             double_quant=True)  # fmt: skip
    assert stacked.scales.offsets.shape[0] == 3
    per_layer = jax.lax.map(lambda q: q.dequantize(), stacked)
    np.testing.assert_allclose(per_layer, stacked.dequantize(), rtol=1e-6)  # XLA may fuse
    q = quantize_array(normal((256, 48)), kind="nf4", block=64, axis=0, double_quant=True)
    np.testing.assert_array_equal(q.T.dequantize(), q.dequantize().T)


def test_storage_and_hash_tell_double_quant_and_spanned_blocks_apart():
    """A base quantized with or without double quantization, or blocked across the
    fan-in or not, is stored differently: the fingerprint says how, and hashes the
    scale codes and factors."""
    w = normal((4, 32, 16))
    single = quantize_array(w, kind="nf4", block=64, axis=(0, 1))
    double = quantize_array(w, kind="nf4", block=64, axis=(0, 1), double_quant=True)
    along = quantize_array(w, kind="nf4", block=32, axis=1)
    assert storage(single) == "nf4 (block 64, axes (-3, -2))"
    assert storage(double) == "nf4 (block 64, axes (-3, -2), double quant)"
    assert storage(along) == "nf4 (block 32, axis -2)"
    assert len({content_hash(single), content_hash(double), content_hash(along)}) == 3
    factors = double.scales.factors
    changed = dataclasses.replace(
        double, scales=dataclasses.replace(double.scales, factors=factors.at[0].mul(2))
    )
    assert content_hash(changed) != content_hash(double)


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_requantizes_as_the_base_was_quantized(double_quant):
    """merge(requantize=True) keeps the base's blocks across the fan-in (block 64 does
    not divide head_dim 32 alone) and its double quantization."""
    _, _, tree = _heads_tree()
    tree = ll.quantize(tree, kind="nf4", block=64, double_quant=double_quant)
    before = tree["params"]["out"]["kernel"]
    after = ll.merge(tree, requantize=True)["params"]["out"]["kernel"]
    assert before.w.blocked_axes == (0, 1)
    assert after.options() == before.w.options()
    assert after.double_quant == double_quant
    exact = np.asarray(before.materialize(), np.float64)
    error = np.abs(np.asarray(after.dequantize(), np.float64) - exact).max()
    # Half NF4's widest step, plus half a step of an int8 scale code, of the largest entry.
    assert error <= (np.diff(NF4_CODE).max() / 2 + 1 / 254) * np.abs(exact).max()


def test_scan_over_a_stack_blocked_across_its_layers():
    """Blocks that span the stacked axis (block 64 over layers of 32 rows) cannot be
    sliced per layer: the scan dequantizes the stack first, for a LoRA weight and a
    plain quantized one, and matches float64."""
    w = normal((2, 32, 32), seed=4)
    q = quantize_array(w, kind="int8", block=64, axis=(0, 1))
    assert q.blocked_axes == (0, 1)
    x = normal((3, 32), seed=6)
    scan = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
    layout = ll.Layout((0,), (1,), (2,))
    a, b = normal((2, 32, 4), seed=7, scale=0.3), normal((2, 4, 32), seed=8, scale=0.3)
    node = ll.LoraWeight(q, a, b, 0.5, layout)
    deq = np.asarray(q.dequantize(), np.float64)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        delta = np.asarray(node.delta(jnp.float32), np.float64)
        expected = {"lora": scan(deq + delta, x64), "plain": scan(jnp.asarray(deq), x64)}
    actual = {"lora": ll.lora(scan, strict=True)(node, x), "plain": ll.lora(scan)(q, x)}
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-5, err_msg=name)


def test_adapter_saved_over_a_double_quantized_base_loads_back(tmp_path):
    config = ll.LoraConfig(rank=4, targets="kernel")
    node = ll.LoraWeight(normal((128, 16)), normal((128, 4), 2), normal((4, 16), 3))
    tree = ll.quantize({"kernel": node}, kind="nf4", double_quant=True)
    ll.save_adapter(tmp_path / "a", tree, config)
    back = ll.load_adapter(tmp_path / "a", tree)["kernel"]
    assert back.w.double_quant
    np.testing.assert_array_equal(back.b, tree["kernel"].b)


# k-quant super-blocks: bytes a super-block, and where its float16 factors sit.
KQUANTS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _random_superblocks(name, rows, n, seed=0):
    """Random bytes (every code and scale pattern is valid) with finite float16 factors."""
    size, starts = KQUANTS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(*rows, n, size), dtype=np.uint8)
    for start in starts:
        factor = (rng.normal(size=(*rows, n)) * 0.01).astype(np.float16)
        raw[..., start : start + 2] = factor[..., None].view(np.uint8)
    return raw.reshape(*rows, n * size)


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_blocks_import_bit_exact(name):
    gguf = pytest.importorskip("gguf", reason="the gguf package (make test installs it)")
    kind = gguf.GGMLQuantizationType[name]
    raw = _random_superblocks(name, (2, 3), 2)
    q = from_gguf(raw, kind)
    expected = gguf.quants.dequantize(raw, kind)
    assert q.shape == expected.shape == (2, 3, 512)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dequantize())(q)), expected)
    flat = from_gguf(raw.reshape(6, -1), kind)
    np.testing.assert_array_equal(np.asarray(flat.T.dequantize()), expected.reshape(6, -1).T)
    # As they are: the same bytes, but Q4_K/Q5_K's 6-bit scale and minimum pairs take a
    # byte each (12 bytes -> 16 a super-block).
    extra = 0 if name == "Q6_K" else 4 * raw.size // KQUANTS[name][0]
    assert q.nbytes == raw.nbytes + extra


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_base_stays_quantized_in_lora_and_trains(name):
    """A Q*_K tensor of PyTorch layout (out, in) as an (in, out) kernel under LoRA:
    the forward equals float64 on gguf's dequantized weight, and a step trains."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (make test installs it)")
    raw = _random_superblocks(name, (6,), 2, seed=3)
    w = from_gguf(raw, name).T  # (512, 6)
    dense = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).T.astype(np.float64)
    node = ll.LoraWeight(w, normal((512, 2), 1, 0.05), normal((2, 6), 2, 0.05), 0.5)
    x = normal((5, 512), 4)
    expected = np.asarray(x, np.float64) @ (dense + 0.5 * np.asarray(node.a) @ np.asarray(node.b))
    out = jax.jit(ll.lora(jnp.dot, strict=True))(x, node)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5 * np.abs(expected).max())

    def loss_fn(t, batch, key):
        return jnp.mean((batch @ t["w"]) ** 2)

    init, step = ll.train_step(ll.lora(loss_fn, strict=True), optax.adam(1e-2))
    state = init({"w": node}, jax.random.key(0))
    state, metrics = step(state, x)  # the state is donated
    first = float(metrics["loss"])
    for _ in range(3):
        state, metrics = step(state, x)
    assert float(metrics["loss"]) < first
    assert isinstance(state.frozen["w"].w, ll.QuantizedWeight)
