"""Quantized frozen bases (QLoRA): codes, error bounds, GGUF blocks, and `lora` over them
against a float64 reference."""

import re

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import normal
from jax import lax
from scipy.stats import norm

import lorax_lite as ll
from lorax_lite.quant import KINDS, NF4_CODE, from_gguf, quantize_array

RNG = np.random.default_rng(0)
STACKED = ll.Layout((0,), (1,), (2,))


def heavy_tailed(shape, seed=0):
    """Student-t with 2 degrees of freedom: outliers that stretch a block's scale."""
    return jnp.asarray(np.random.default_rng(seed).standard_t(2, size=shape), jnp.float32)


def test_nf4_code_book_is_the_normal_quantiles_of_qlora():
    """The 16 NormalFloat values, rebuilt from their definition: 8 positive and 7
    negative quantiles of N(0, 1) at evenly spaced probabilities from 1 - delta to
    1/2, an exact zero, scaled to [-1, 1] (QLoRA, delta = (1/(2*15) + 1/(2*16)) / 2)."""
    delta = (1 / 30 + 1 / 32) / 2
    positive = norm.ppf(np.linspace(1 - delta, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(1 - delta, 0.5, 8)[:-1])
    code = np.sort(np.concatenate([positive, [0.0], negative]))
    code /= np.abs(code).max()
    np.testing.assert_allclose(NF4_CODE, code, atol=1e-6)
    assert NF4_CODE[7] == 0.0 and len(set(NF4_CODE.tolist())) == 16


def _bound(x, kind, block, axis):
    """The largest error rounding to the nearest code may make, per entry."""
    blocks = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    blocks = blocks.reshape(*blocks.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    if kind == "int8":
        half_step = absmax / 127 / 2
    elif kind == "int4":
        half_step = absmax / 7 / 2
    elif kind == "int4-asym":
        half_step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15 / 2
    else:
        half_step = absmax * np.diff(NF4_CODE).max() / 2
    bound = np.broadcast_to(half_step, blocks.shape).reshape(*blocks.shape[:-2], -1)
    return np.moveaxis(bound, -1, axis)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", [normal, heavy_tailed], ids=["normal", "heavy-tailed"])
@pytest.mark.parametrize("axis, block", [(-2, 64), (-1, 32)])
def test_dequantized_error_within_half_a_step(kind, make, axis, block):
    x = make((128, 96), seed=3)
    q = quantize_array(x, kind=kind, block=block, axis=axis)
    error = np.abs(np.asarray(q.dequantize(), np.float64) - np.asarray(x, np.float64))
    bound = _bound(x, kind, block, axis)
    assert (error <= bound * (1 + 1e-5) + 1e-7).all(), float((error / bound).max())
    assert q.shape == x.shape and q.dequantize().dtype == x.dtype
    assert error.mean() > 0  # it really is quantized


@pytest.mark.parametrize("kind", KINDS)
def test_storage_bytes(kind):
    """Two 4-bit codes a byte: int4/nf4 with block 64 and a float32 scale a block store
    0.28x of bf16's bytes (int4-asym adds a float32 minimum a block: 0.31x)."""
    x = normal((256, 128))
    q = quantize_array(x, kind=kind, block=64, axis=-2)
    codes = q.data.size * q.data.dtype.itemsize
    assert codes == (x.size if kind == "int8" else x.size // 2)
    ratio = q.nbytes / (x.size * 2)
    assert ratio == {"int8": 0.53125, "int4": 0.28125, "nf4": 0.28125, "int4-asym": 0.3125}[kind]


def test_transpose_moves_codes_without_requantizing():
    q = quantize_array(heavy_tailed((64, 6)), kind="nf4", block=32, axis=0)
    np.testing.assert_array_equal(q.T.dequantize(), q.dequantize().T)
    np.testing.assert_array_equal(q.T.T.data, q.data)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_import_bit_exact(name):
    gguf = pytest.importorskip("gguf", reason="the gguf package (make test installs it)")
    kind = gguf.GGMLQuantizationType[name]
    x = np.asarray(heavy_tailed((6, 128), seed=5))
    raw = gguf.quants.quantize(x, kind)
    q = from_gguf(raw, kind)
    expected = gguf.quants.dequantize(raw, kind)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dequantize())(q)), expected)
    assert q.nbytes == raw.nbytes  # the same bytes, re-arranged


def test_gguf_errors_name_the_tensor():
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: GGUF tensor type Q2_K"):
        from_gguf(np.zeros((2, 84), np.uint8), "Q2_K", path="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="token_embd.weight: Q8_0 rows must be whole 34-byte"):
        from_gguf(np.zeros((2, 35), np.uint8), "Q8_0", path="token_embd.weight")


@pytest.mark.parametrize(
    "blocks, found",
    [
        (np.ones((2, 18), np.float32), "ndarray of dtype float32"),  # was: silent bytes of 1
        (np.ones((2, 18), np.int8), "ndarray of dtype int8"),
        (bytes(36), "bytes"),  # was: NumPy's "invalid literal for int()"
        ([[0] * 18] * 2, "list"),
    ],
)
def test_gguf_blocks_that_are_not_uint8_arrays_are_refused(blocks, found):
    with pytest.raises(TypeError, match=rf"blk.0: Q4_0 blocks must be a uint8 array .* {found}"):
        from_gguf(blocks, "Q4_0", path="blk.0")
    with pytest.raises(TypeError, match=r"blk.0: dtype must be a floating dtype, got 'int32'"):
        from_gguf(np.zeros((2, 18), np.uint8), "Q4_0", dtype="int32", path="blk.0")


# GGUF blocks written out from the block layout (ggml-common.h: block_q4_0 is a float16
# d then 16 bytes whose low nibbles are entries 0..15 and high nibbles entries 16..31,
# w = d * (q - 8); block_q4_1 has d, then a float16 m, and w = d * q + m; block_q8_0 is
# d then 32 int8 codes, w = d * q). Byte j holds (lo, hi) = (j, 15 - j).
NIBBLES = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
LOW, HIGH = np.arange(16.0), 15.0 - np.arange(16.0)


def test_gguf_q4_blocks_read_by_hand_need_no_package():
    # Q4_0, one row of two blocks: d = 0.5 (f16 0x3800), then d = -1 (f16 0xbc00).
    q4_0 = bytes.fromhex("0038" + NIBBLES + "00bc" + NIBBLES)
    weight = from_gguf(np.frombuffer(q4_0, np.uint8).reshape(1, 36), "Q4_0").dequantize()
    codes = np.concatenate([LOW, HIGH]) - 8
    np.testing.assert_array_equal(np.asarray(weight), [np.concatenate([0.5 * codes, -codes])])
    # Q4_1, two rows of one block: d = 0.25 (0x3400), m = -1 (0xbc00); d = 2, m = 0.5.
    q4_1 = bytes.fromhex("003400bc" + NIBBLES + "00400038" + NIBBLES)
    weight = from_gguf(np.frombuffer(q4_1, np.uint8).reshape(2, 20), "Q4_1").dequantize()
    codes = np.concatenate([LOW, HIGH])
    np.testing.assert_array_equal(np.asarray(weight), [0.25 * codes - 1, 2 * codes + 0.5])
    # Q8_0: d = 0.5, codes -16..15 as int8 bytes.
    q8_0 = bytes.fromhex("0038") + np.arange(-16, 16, dtype=np.int8).tobytes()
    weight = from_gguf(np.frombuffer(q8_0, np.uint8).reshape(1, 34), "Q8_0").dequantize()
    np.testing.assert_array_equal(np.asarray(weight), [0.5 * np.arange(-16.0, 16.0)])


# ----- lora(fn) over a quantized base, against float64 ----------------------------------


def _conv(w, x):
    return lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


def _scan(w, x):
    return lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


# name: (fn, weight shape, layout, args)
CASES = {
    "dense": (lambda w, x: jnp.tanh(x @ w), (64, 16), ll.Layout.dense(), ((3, 64),)),
    "dense-general": (
        lambda w, x: jnp.einsum("bd,dhk->bhk", x, w),
        (64, 2, 8),
        ll.Layout((), (0,), (1, 2)),
        ((3, 64),),
    ),
    "conv": (_conv, (3, 32, 8), ll.Layout((), (0, 1), (2,)), ((2, 9, 32),)),
    "embedding": (lambda w, i: w[i], (64, 16), ll.Layout.dense(), "ids"),
    "scan-stacked": (_scan, (3, 64, 64), STACKED, ((3, 64),)),
    "remat": (
        lambda w, x: jax.checkpoint(lambda w, x: jnp.tanh(x @ w))(w, x),
        (64, 16),
        ll.Layout.dense(),
        ((3, 64),),
    ),
    "vmap": (
        lambda w, x: jax.vmap(lambda xi: jnp.tanh(xi @ w))(x),
        (64, 16),
        ll.Layout.dense(),
        ((4, 3, 64),),
    ),
}


def _args(spec):
    if spec == "ids":
        return (jnp.array([[0, 5, 63], [7, 7, 1]]),)
    return tuple(normal(shape, seed=10 + i) for i, shape in enumerate(spec))


def _lora_node(shape, layout, seed=1):
    a_shape, b_shape = layout.factor_shapes(shape, 4)
    w = heavy_tailed(shape, seed) * 0.2
    return ll.LoraWeight(
        w, normal(a_shape, seed + 1, 0.3), normal(b_shape, seed + 2, 0.3), 0.5, layout
    )


def _reference64(fn, node, args, cot):
    """Output and adapter gradients of ``fn(deq(w) + s A B)`` in float64."""
    w = np.asarray(node.w.dequantize(), np.float64)
    with jax.enable_x64(True):
        as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64 if x.dtype.kind == "f" else x.dtype)

        def run(a, b):
            merged = as64(w) + ll.LoraWeight(w, a, b, node.scale, node.layout).delta(jnp.float64)
            return fn(merged, *(as64(x) for x in args))

        out = run(as64(node.a), as64(node.b))
        grads = jax.grad(lambda a, b: (run(a, b) * as64(cot)).sum(), (0, 1))(
            as64(node.a), as64(node.b)
        )
        return np.asarray(out), [np.asarray(g) for g in grads]


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_lora_over_quantized_base_matches_float64(name, kind):
    fn, shape, layout, arg_spec = CASES[name]
    args = _args(arg_spec)
    node = ll.quantize({"w": _lora_node(shape, layout)}, kind=kind, block=32)["w"]
    assert isinstance(node.w, ll.QuantizedWeight) and node.w.kind == kind
    lora_fn = ll.lora(fn, strict=True)
    out_shape = jax.eval_shape(lambda: lora_fn(node, *args)).shape
    cot = normal(out_shape, seed=99)
    ref_out, ref_grads = _reference64(fn, node, args, cot)

    @jax.jit
    def run(a, b):
        f = lambda a, b: lora_fn(ll.LoraWeight(node.w, a, b, node.scale, node.layout), *args)
        out, vjp = jax.vjp(f, a, b)
        return out, vjp(cot)

    out, grads = run(node.a, node.b)
    _close(out, ref_out, 5e-5)  # float32 through three tanh layers: ~1e-5 on jax 0.11
    for g, r in zip(grads, ref_grads):
        _close(g, r, 1e-4)
    _close(lora_fn(node, *args), ref_out, 5e-5)  # eager too


def test_scan_keeps_the_stack_quantized_inside_the_loop():
    """Scan over layers slices the codes layer by layer: the dequantized weight inside
    the loop is one layer, never the whole float stack."""
    fn, shape, layout, spec = CASES["scan-stacked"]
    node = ll.quantize({"w": _lora_node(shape, layout)}, kind="nf4", block=32)["w"]
    jaxpr = jax.make_jaxpr(ll.lora(fn, strict=True))(node, *_args(spec))

    def float_shapes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield tuple(v.aval.shape), v.aval.dtype
            for sub in jex.jaxprs_in_params(eqn.params):
                yield from float_shapes(sub)

    shapes = list(float_shapes(jaxpr.jaxpr))
    assert ((3, 64, 64), jnp.float32) not in shapes
    assert ((64, 64), jnp.float32) in shapes  # one layer, dequantized in the body


def test_plain_quantized_leaf_through_a_cast():
    """A quantized bf16 table cast to float32 by the model (the cast meets a plain
    dequantized array, not a LoRA weight)."""
    table = quantize_array(normal((64, 8)).astype(jnp.bfloat16), kind="int4", block=32, axis=0)
    fn = lambda p, x: x @ p["w"].astype(jnp.float32)
    x = normal((3, 64))
    _close(ll.lora(fn, strict=True)({"w": table}, x), fn({"w": table.dequantize()}, x), 1e-6)


def test_plain_quantized_leaf_and_merge():
    """``also=`` quantizes a frozen plain leaf (an embedding table); merge dequantizes."""
    tree = {"embed": heavy_tailed((64, 32)), "proj": _lora_node((32, 16), ll.Layout.dense())}
    q = ll.quantize(tree, kind="int8", block=32, also="embed")
    assert isinstance(q["embed"], ll.QuantizedWeight) and q["embed"].axis == -1
    fn = lambda p, ids: p["embed"][ids] @ p["proj"]
    ids = jnp.array([1, 2, 63])
    out = ll.lora(fn, strict=True)(q, ids)
    merged = ll.merge(q)
    assert merged["embed"].dtype == jnp.float32 and merged["proj"].shape == (32, 16)
    _close(out, fn(merged, ids), 1e-5)


def test_train_steps_leave_the_quantized_base_bit_identical_with_no_state():
    node = _lora_node((64, 16), ll.Layout.dense())
    tree = ll.quantize({"w": node, "head": ll.Trainable(normal((16, 2)))}, kind="nf4")
    x, y = normal((8, 64), 4), normal((8, 2), 5)

    def loss_fn(t, batch, key):
        return jnp.mean((jnp.tanh(batch[0] @ t["w"]) @ t["head"] - batch[1]) ** 2)

    init, step = ll.train_step(ll.lora(loss_fn, strict=True), optax.adam(1e-2))
    state = init(tree, jax.random.key(0))
    codes = np.asarray(state.frozen["w"].w.data).copy()
    moments = [x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim]
    assert sum(moments) == 2 * ll.count(tree)["trainable"]  # Adam's mu and nu, nothing more
    losses = []
    for _ in range(5):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(state.frozen["w"].w.data, codes)
    assert state.frozen["w"].w.data.dtype == jnp.uint8


def test_count_reports_stored_bytes():
    tree = {"w": _lora_node((256, 64), ll.Layout.dense())}
    before, after = ll.count(tree), ll.count(ll.quantize(tree, kind="int4", block=64))
    assert after["total"] == before["total"] and after["trainable"] == before["trainable"]
    base_bytes = lambda c: c["total_bytes"] - c["trainable_bytes"]
    assert base_bytes(after) == 256 * 64 // 2 + 4 * 64 * 4  # codes + one f32 scale a block
    assert base_bytes(before) == 256 * 64 * 4


def test_init_quantizes_in_one_call():
    params = {"dense": {"kernel": heavy_tailed((64, 8)), "bias": jnp.zeros(8)}}
    config = ll.LoraConfig(rank=2, targets="dense")
    tree = ll.init(params, config, key=jax.random.key(0), quantization=dict(kind="int8", block=16))
    w = tree["dense"]["kernel"].w
    assert isinstance(w, ll.QuantizedWeight) and (w.kind, w.block, w.axis) == ("int8", 16, -2)


def _scanned_model(p, x):
    """A scan over a stacked (layers, in, out) kernel after a quantized embedding."""
    h = p["embed"][x]
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["kernel"])[0]


@pytest.mark.parametrize("targets", ["all-linear", "kernel"])
def test_init_on_a_quantized_tree_equals_init_with_quantize(targets):
    """A tree that already holds `QuantizedWeight` leaves (a GGUF file's blocks): each is
    one weight, adapted with factors of its logical shape, its usage traced through a
    stand-in; the result equals quantizing the float tree in `init` itself."""
    params = {"embed": heavy_tailed((16, 64)), "layers": {"kernel": heavy_tailed((3, 64, 64))}}
    quantized = {
        "embed": quantize_array(params["embed"], kind="nf4", block=32, axis=-1),
        "layers": {
            "kernel": quantize_array(params["layers"]["kernel"], kind="nf4", block=32, axis=-2)
        },
    }
    config = ll.LoraConfig(rank=2, targets=targets)
    ids = jnp.array([[1, 5, 9]])
    kwargs = dict(key=jax.random.key(0), fn=_scanned_model, args=(ids,))
    expected = ll.init(params, config, quantization=dict(kind="nf4", block=32), **kwargs)
    tree = ll.init(quantized, config, **kwargs)
    expected["embed"] = quantized["embed"]  # `quantization=` leaves plain leaves as they are
    equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(equal, tree, expected)
    node = tree["layers"]["kernel"]
    assert node.layout == STACKED and node.a.shape == (3, 64, 2) and node.b.shape == (3, 2, 64)
    out = ll.lora(_scanned_model, strict=True)(tree, ids)
    _close(out, _scanned_model(ll.merge(tree), ids), 1e-6)


def test_init_refuses_to_train_a_quantized_weight_in_full():
    params = {"embed": quantize_array(heavy_tailed((16, 64)), kind="int8", block=32)}
    params["dense"] = {"kernel": heavy_tailed((64, 8))}
    config = ll.LoraConfig(rank=2, targets="dense", train=("embed",))
    with pytest.raises(ValueError, match="embed: a QuantizedWeight cannot be trained in full"):
        ll.init(params, config, key=jax.random.key(0))


def test_bad_input_names_every_leaf():
    tree = {
        "ok": _lora_node((64, 8), ll.Layout.dense()),
        "odd": _lora_node((48, 8), ll.Layout.dense()),
        "ids": jnp.zeros((64, 4), jnp.int32),
    }
    with pytest.raises(ValueError) as info:
        ll.quantize(tree, kind="nf4", block=32, also=("ids", "missing_table"))
    message = str(info.value)
    assert "odd: block 32 does not divide axis 0 of shape (48, 8)" in message
    assert "ids: only float weights are quantized, got dtype int32" in message
    assert "also 'missing_table' matches no frozen leaf" in message
    assert "ok" not in message.replace("closest", "")
    with pytest.raises(ValueError, match="unknown quantization kind 'int3'"):
        ll.quantize(tree, kind="int3")
    once = ll.quantize({"ok": tree["ok"]}, kind="int8", block=32)
    with pytest.raises(ValueError, match=r"ok: already quantized \(int8, block 32\)"):
        ll.quantize(once, kind="int8", block=32)
    with pytest.raises(ValueError, match="block must be even"):
        quantize_array(normal((9, 2)), kind="int4", block=3, axis=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_weights_are_refused_naming_the_leaf_and_index(kind, bad):
    """Silently, a NaN or inf took its block's scale with it (int4 turned +inf to -inf)."""
    node = _lora_node((64, 8), ll.Layout.dense())
    hurt = ll.LoraWeight(node.w.at[3, 5].set(bad), node.a, node.b, node.scale, node.layout)
    table = jnp.ones((4, 32)).at[1, 2].set(bad)
    tree = {"ok": node, "layer": {"kernel": hurt}, "embed": table}
    with pytest.raises(ValueError) as info:
        ll.quantize(tree, kind=kind, block=32, also=("embed",))
    message = str(info.value)
    value = "nan" if np.isnan(bad) else str(bad)
    assert f"layer/kernel: 1 non-finite entries, the first {value} at index (3, 5)" in message
    assert f"embed: 1 non-finite entries, the first {value} at index (1, 2)" in message
    assert "ok:" not in message
    with pytest.raises(ValueError, match=r"^w: 1 non-finite entries, the first .* \(3, 5\)"):
        quantize_array(hurt.w, kind=kind, block=32, axis=0, path="w")


def test_a_merged_weight_that_is_not_finite_is_not_requantized():
    node = ll.quantize({"k": _lora_node((64, 8), ll.Layout.dense())}, kind="nf4", block=32)["k"]
    node = ll.LoraWeight(node.w, node.a, node.b.at[0, 0].set(jnp.nan), node.scale, node.layout)
    with pytest.raises(ValueError, match=r"^k: 64 non-finite entries, the first nan at index \(0,"):
        ll.merge({"k": node}, requantize=True)


@pytest.mark.parametrize("integer", [np.int64(32), np.int32(32), np.uint8(32)])
def test_numpy_integer_options_are_integers(integer):
    """``block=np.int64(32)`` was refused with "block 32 does not divide axis 0"."""
    tree = {"k": _lora_node((64, 8), ll.Layout.dense())}
    q = ll.quantize(tree, kind="int4", block=integer, axis=np.int64(-2))["k"].w
    assert (q.block, q.axis) == (32, -2) and type(q.block) is int and type(q.axis) is int
    expected = ll.quantize(tree, kind="int4", block=32, axis=-2)["k"].w
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(expected.dequantize()))
    for block, shown in [(32.0, "32.0"), (True, "True"), ("32", "'32'"), (0, "0")]:
        with pytest.raises(ValueError, match=f"k: block must be a positive integer, got {shown}"):
            ll.quantize(tree, kind="int4", block=block)
    with pytest.raises(ValueError, match=r"k: axis 1.0 out of range"):
        ll.quantize(tree, kind="int4", block=32, axis=1.0)


def test_merge_requantized_reports_the_error_it_adds(caplog):
    tree = ll.quantize({"w": _lora_node((64, 16), ll.Layout.dense())}, kind="int8", block=32)
    dense = ll.merge(tree)["w"]
    with caplog.at_level("INFO", logger="lorax_lite"):
        again = ll.merge(tree, requantize=True)["w"]
    assert isinstance(again, ll.QuantizedWeight) and (again.kind, again.block) == ("int8", 32)
    error = np.abs(np.asarray(again.dequantize()) - np.asarray(dense)).max()
    assert 0 < error <= _bound(dense, "int8", 32, -2).max() * (1 + 1e-5)
    reported = float(re.search(r"largest added error ([0-9.e-]+)", caplog.text).group(1))
    np.testing.assert_allclose(reported, error / np.abs(np.asarray(dense)).max(), rtol=1e-2)


def test_summary_shows_stored_and_dequantized_base_bytes():
    tree = {"w": _lora_node((64, 16), ll.Layout.dense()), "table": normal((8, 64))}
    text = ll.summary(ll.quantize(tree, kind="nf4", block=64, also="table"))
    # codes: 64*16/2 + 8*64/2 bytes, scales: (16 + 8) float32
    assert "quantized base: 2 weights (nf4), 864 B stored, 6.0 KiB dequantized" in text


def test_peft_export_does_not_depend_on_the_base_storage(tmp_path):
    """to_peft writes the same files over a quantized and a float base; from_peft reads
    them onto the quantized base, which stays quantized."""
    params = {"layer": {"query": {"kernel": heavy_tailed((64, 32))}}}
    config = ll.LoraConfig(rank=4, targets="query")
    tree = ll.init(params, config, key=jax.random.key(0))
    tree["layer"]["query"]["kernel"] = _lora_node((64, 32), ll.Layout.dense())
    quantized = ll.quantize(tree, kind="nf4", block=32)
    names = lambda path: path.rsplit("/", 1)[0].replace("/", ".")
    ll.to_peft(tmp_path / "q", quantized, config, names)
    ll.to_peft(tmp_path / "f", tree, config, names)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()
    base = {"layer": {"query": {"kernel": quantized["layer"]["query"]["kernel"].w}}}
    back = ll.from_peft(tmp_path / "q", base, names)["layer"]["query"]["kernel"]
    original = quantized["layer"]["query"]["kernel"]
    assert isinstance(back.w, ll.QuantizedWeight)
    np.testing.assert_array_equal(back.w.data, original.w.data)
    x = normal((3, 64), 7)
    _close(ll.lora(jnp.dot)(x, back), ll.lora(jnp.dot)(x, original), 1e-6)


def test_adapter_fingerprint_covers_the_quantized_base(tmp_path):
    """An adapter saved over an nf4 base loads back onto it (still quantized), and is
    refused, naming the storage, on an int8 or a float version of the same weights, and
    on an nf4 base of other weights; check_base=False loads it anyway."""
    config = ll.LoraConfig(rank=4, targets="kernel")
    tree = {"kernel": _lora_node((64, 16), ll.Layout.dense())}
    nf4 = ll.quantize(tree, kind="nf4", block=32)
    ll.save_adapter(tmp_path / "a", nf4, config)
    back = ll.load_adapter(tmp_path / "a", nf4)["kernel"]
    assert isinstance(back.w, ll.QuantizedWeight)
    np.testing.assert_array_equal(back.a, nf4["kernel"].a)
    cases = {
        "int8": (ll.quantize(tree, kind="int8", block=32), "stored nf4 .*stored int8"),
        "float": (tree, r"stored nf4 \(block 32, axis -2\), this base is stored float"),
        "other weights": (
            ll.quantize({"kernel": _lora_node((64, 16), ll.Layout.dense(), seed=9)}, kind="nf4",
                        block=32),
            "content fingerprint mismatch",
        ),
    }  # fmt: skip
    for base, message in cases.values():
        with pytest.raises(ValueError, match=message):
            ll.load_adapter(tmp_path / "a", base)
        loaded = ll.load_adapter(tmp_path / "a", base, check_base=False)["kernel"]
        np.testing.assert_array_equal(loaded.b, nf4["kernel"].b)
