"""write_gguf: a model written back as GGUF keeps the source's metadata, tokenizer and
untouched tensors byte for byte; the given tensors read back (gguf.GGUFReader) as
gguf's own F16 / Q8_0 / Q4_1 encoding of them. gguf_tensors: adapters merged into a
tiny llama file's tensors equal float64 dense math with llama.cpp's row order written
from its definition."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from helpers import randomize_b

import lorax_lite as ll
from lorax_lite.gguf_export import llama_row_order, write_gguf
from lorax_lite.quant import from_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (make test installs it)")
RNG = np.random.default_rng(0)
TOKENS = ["<s>", "</s>", "hello", "world"]


@pytest.fixture
def source(tmp_path):
    return write_source(tmp_path / "source.gguf")


def write_source(path: pathlib.Path, architecture: str = "llama") -> pathlib.Path:
    """A tiny llama-like GGUF file: metadata, a tokenizer, F32/F16/Q4_1 tensors."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_file_type(3)  # MOSTLY_Q4_1
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0, -1.0, -2.5, -3.0])
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", RNG.normal(size=(4, 64)).astype(np.float32))
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    attn = gguf.quants.quantize(RNG.normal(size=(16, 64)).astype(np.float32), q4_1)
    writer.add_tensor("blk.0.attn_q.weight", attn, raw_dtype=q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.add_tensor("output.weight", RNG.normal(size=(4, 64)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fields(reader):
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0", "Q4_1"])
def test_written_file_keeps_metadata_and_stores_the_merged_tensors(source, tmp_path, tensor_type):
    merged = {
        "blk.0.attn_q.weight": RNG.normal(size=(16, 64)).astype(np.float32),
        "blk.0.attn_norm.weight": RNG.normal(size=64).astype(np.float32),
    }
    out = write_gguf(tmp_path / "tuned.gguf", source, merged, tensor_type=tensor_type)
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(out)
    expected_fields = _fields(before)
    expected_fields["general.file_type"] = {"F16": 1, "Q8_0": 7, "Q4_1": 3}[tensor_type]
    assert _fields(after) == expected_fields
    assert after.fields["tokenizer.ggml.tokens"].contents() == TOKENS
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    assert list(new) == list(old)
    for name in ("token_embd.weight", "output.weight"):  # copied as they are
        assert new[name].tensor_type == old[name].tensor_type
        np.testing.assert_array_equal(new[name].data, old[name].data)
    q = new["blk.0.attn_q.weight"]
    kind = gguf.GGMLQuantizationType[tensor_type]
    assert q.tensor_type == kind
    x = merged["blk.0.attn_q.weight"]
    if tensor_type == "F16":
        np.testing.assert_array_equal(q.data, x.astype(np.float16))
    else:
        expected = gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind)
        np.testing.assert_array_equal(gguf.quants.dequantize(q.data, kind), expected)
        np.testing.assert_array_equal(np.asarray(from_gguf(q.data, kind).dequantize()), expected)
        step = {"Q8_0": 1 / 127, "Q4_1": 1 / 15}[tensor_type]
        assert np.abs(expected - x).max() <= 2 * step * np.abs(x).max()
    norm = new["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(norm.data, merged["blk.0.attn_norm.weight"])


def test_problems_are_listed_and_an_existing_file_is_kept(source, tmp_path):
    bad = {
        "blk.0.attn_k.weight": np.zeros((16, 64), np.float32),
        "blk.0.attn_q.weight": np.zeros((16, 48), np.float32),
        "token_embd.weight": np.full((4, 64), np.nan, np.float32),
    }
    listed = (
        r"(?s)attn_k.weight: not a tensor.*"
        r"attn_q.weight: shape \(16, 48\), the source file has \(16, 64\).*non-finite"
    )
    with pytest.raises(ValueError, match=listed):
        write_gguf(tmp_path / "x.gguf", source, bad)
    with pytest.raises(ValueError, match="tensor_type must be one of"):
        write_gguf(tmp_path / "x.gguf", source, {}, tensor_type="Q4_K")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_gguf(source, source, {})


# ----- gguf_tensors: adapters merged into a llama file's tensors -----------------------------

EXPERIMENT_TESTS = pathlib.Path(__file__).parent / "experiments"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = dict(zip(PROJECTIONS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                               "ffn_up", "ffn_down")))  # fmt: skip


class TinyLlama(NamedTuple):
    """test_llama's tiny SmolLM2-like file, what it stores (float64, (out, in), rows as
    stored) and its model loaded by experiments.models.llama_gguf (float, rows un-permuted)."""

    path: pathlib.Path
    stored: dict
    pretrained: Any
    n_head: int
    n_kv_head: int


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


def tiny_llama(directory: pathlib.Path) -> TinyLlama:
    pytest.importorskip("tokenizers", reason="the tiny file's vocabulary comes from tokenizers")
    from experiments.models import llama_gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENT_TESTS))
        from test_llama import N_HEAD, N_KV, write_tiny_gguf
    path = directory / "tiny.gguf"
    stored = write_tiny_gguf(path)
    return TinyLlama(path, stored, llama_gguf.load(path, quantized=False), N_HEAD, N_KV)


def lora_tree(tiny: TinyLlama, **options) -> Any:
    """Scan-stacked adapters (B random) on the seven projections of the tiny model."""
    from experiments.models.llama import Llama

    config = ll.LoraConfig(rank=4, alpha=8, targets=PROJECTIONS, **options)
    tree = ll.init(
        tiny.pretrained.params,
        config,
        key=jax.random.key(0),
        fn=Llama(tiny.pretrained.config).apply,
        args=(np.zeros((1, 4), np.int32),),
    )
    return randomize_b(tree, jax.random.key(1), std=0.2)


def to_file_rows(hf: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order, from its definition: within each head of ``hd`` rows, the
    file's row ``2i + j`` is Hugging Face's row ``j * hd / 2 + i``."""
    hd = len(hf) // n_head
    out = np.empty_like(hf)
    for h in range(n_head):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + 2 * i + j] = hf[h * hd + j * hd // 2 + i]
    return out


def expected_tensors(tiny: TinyLlama, tree: Any) -> dict[str, np.ndarray]:
    """The file's stored tensors plus each adapter, in float64 dense math: ``W + s A B``
    in the model's (in, out) layout (DoRA: times ``m / ||W + s A B||`` per output unit),
    transposed and rows permuted as the file stores them."""
    heads = {"attn_q": tiny.n_head, "attn_k": tiny.n_kv_head}
    layers = tree["params"]["layers"]
    out = {}
    for block, modules in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
        for module in modules:
            node = layers[block][module]["kernel"]
            a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
            kind = KINDS[module]
            for i in range(len(a)):
                name = f"blk.{i}.{kind}.weight"
                w = tiny.stored[name]
                if kind in heads:  # back to the model's rows: the inverse of to_file_rows
                    w = w[np.argsort(to_file_rows(np.arange(len(w)), heads[kind]))]
                v = w.T + node.scale * a[i] @ b[i]
                if node.m is not None:
                    v = v * np.asarray(node.m[i], np.float64) / np.linalg.norm(v, axis=0)
                out[name] = to_file_rows(v.T, heads[kind]) if kind in heads else v.T
    return out


@pytest.mark.parametrize(
    "options", [{}, {"use_dora": True, "use_rslora": True}], ids=["lora", "dora-rslora"]
)
def test_merged_tensors_match_float64_dense_math(tiny, options):
    tree = lora_tree(tiny, **options)
    expected = expected_tensors(tiny, tree)
    adapter_alone, _ = ll.partition(tree)  # LoraWeight(None, a, b): the base is the file's
    for given in (tree, adapter_alone):
        got = ll.gguf_tensors(given, tiny.path)
        assert set(got) == set(expected)
        for name, x in got.items():
            assert x.dtype == np.float32 and x.flags.c_contiguous
            np.testing.assert_allclose(x, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
            assert np.abs(x - tiny.stored[name]).max() > 1e-2, name  # the adapter shows


def test_layer_paths_and_torch_layouts_give_the_stacked_tensors(tiny):
    """Per-layer leaves named ``layers_0`` / ``layers.1``, one in PyTorch's (out, in)
    layout (the q_proj kernel is square: only the layout tells in from out), and a user
    name map for a path the default does not know."""
    stacked = lora_tree(tiny)
    q = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    up = stacked["params"]["layers"]["mlp"]["up_proj"]["kernel"]
    layer = lambda node, i, layout: ll.LoraWeight(None, node.a[i], node.b[i], node.scale, layout)
    torch_layout = ll.Layout((), (1,), (0,))
    tree = {
        "model": {
            "layers_0": {"self_attn": {"q_proj": {"kernel": layer(q, 0, ll.Layout.dense())}}},
            "layers.1": {"self_attn": {"q_proj": {"weight": layer(q, 1, torch_layout)}}},
        },
        "ffn": {"w_up": layer(up, 1, ll.Layout.dense())},
    }
    got = ll.gguf_tensors(tree, tiny.path, name_map={"ffn/w_up": "blk.1.ffn_up.weight"})
    everything = ll.gguf_tensors(stacked, tiny.path)
    assert set(got) == {"blk.1.ffn_up.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    for name, x in got.items():
        np.testing.assert_array_equal(x, everything[name], err_msg=name)
    # The same factors on a (in, out, layer) leaf and on a DenseGeneral (in, heads, head_dim)
    # kernel: rows flattened head-major, as Hugging Face's q_proj.
    late = ll.LoraWeight(None, q.a, q.b, q.scale, ll.Layout((2,), (0,), (1,)))
    b = q.b[0].reshape(q.b.shape[1], tiny.n_head, -1)
    heads = ll.LoraWeight(None, q.a[0], b, q.scale, ll.Layout((), (0,), (1, 2)))
    names = {"late": "blk.{layer}.attn_q.weight", "heads": "blk.0.attn_q.weight"}
    got = ll.gguf_tensors({"late": late}, tiny.path, name_map=names)
    assert set(got) == {"blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    for name, x in got.items():
        np.testing.assert_array_equal(x, everything[name], err_msg=name)
    got = ll.gguf_tensors({"heads": heads}, tiny.path, name_map=names)
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], everything["blk.0.attn_q.weight"])
    with pytest.raises(ValueError, match="the tree holds no adapter"):
        ll.gguf_tensors({"w": np.ones(3)}, tiny.path)


def test_llama_row_order_is_llama_cpps_permutation():
    for rows, n_head in ((16, 1), (24, 3), (64, 4)):
        order = llama_row_order(rows, n_head)
        np.testing.assert_array_equal(order[np.argsort(order)], np.arange(rows))
        np.testing.assert_array_equal(to_file_rows(np.arange(rows), n_head), np.argsort(order))
    with pytest.raises(ValueError, match=r"rows a multiple of 2 \* n_head = 6, got 8 rows"):
        llama_row_order(8, 3)


def test_every_problem_is_listed_naming_the_leaf(tiny):
    stacked = lora_tree(tiny)
    q = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    one = lambda i, **changes: dataclasses.replace(
        ll.LoraWeight(None, q.a[i], q.b[i], q.scale), **changes
    )
    tree = {
        "encoder": {"dense": {"kernel": one(0)}},
        "layers_7": {"q_proj": {"kernel": one(0)}},
        "layers_0": {
            "up_proj": {"kernel": one(0)},
            "k_proj": {"kernel": one(0, residual_init="pissa")},
        },
        "head": ll.Trainable(np.zeros((4, 4), np.float32)),
        "stack": {"w": q},
        "layers_1": {"o_proj": {"kernel": one(1, b=np.full_like(q.b[1], np.inf))}},
    }
    tree["again"] = one(1)  # named blk.1.attn_output.weight, as layers_1/o_proj
    name_map = {"stack/w": "blk.0.attn_q.weight", "again": "blk.1.attn_output.weight"}
    listed = (
        r"(?s)gguf_tensors\(.*tiny.gguf\):\n"
        r"  encoder/dense/kernel: no GGUF tensor name.*"
        r"  head: trained in full.*"
        r"  layers_0/k_proj/kernel: initialized with init='pissa'.*"
        r"  layers_0/up_proj/kernel: blk.0.ffn_up.weight is \(96, 64\) \(out, in\); the "
        r"adapter's weight \(64, 64\) needs \(64, 64\).*"
        r"  layers_1/o_proj/kernel: blk.1.attn_output.weight: also the name of again.*"
        r"  layers_1/o_proj/kernel: non-finite merged values \(NaN or inf\) in "
        r"blk.1.attn_output.weight.*"
        r"  layers_7/q_proj/kernel: blk.7.attn_q.weight is not a tensor of the file.*"
        r"  stack/w: stacked along a layer axis: the GGUF name 'blk.0.attn_q.weight' needs a "
        r"\{layer\} template"
    )
    with pytest.raises(ValueError, match=listed):
        ll.gguf_tensors(tree, tiny.path, name_map=name_map)


def test_other_architectures_are_refused_naming_it(tmp_path):
    path = write_source(tmp_path / "qwen.gguf", architecture="qwen2")
    tree = {"layers_0": {"q_proj": {"kernel": ll.LoraWeight(None, np.ones((64, 2)),
                                                            np.ones((2, 16)), 1.0)}}}  # fmt: skip
    with pytest.raises(ValueError, match="holds a 'qwen2' model; only 'llama' files"):
        ll.gguf_tensors(tree, path)
