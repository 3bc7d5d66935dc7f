"""write_gguf: a model written back as GGUF keeps the source's metadata, tokenizer and
untouched tensors byte for byte; the given tensors read back (gguf.GGUFReader) as
gguf's own F16 / Q8_0 / Q4_1 encoding of them."""

from __future__ import annotations

import numpy as np
import pytest

from lorax_lite.gguf_export import write_gguf
from lorax_lite.quant import from_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (make test installs it)")
RNG = np.random.default_rng(0)
TOKENS = ["<s>", "</s>", "hello", "world"]


@pytest.fixture
def source(tmp_path):
    """A tiny llama-like GGUF file: metadata, a tokenizer, F32/F16/Q4_1 tensors."""
    path = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(path, "llama")
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
