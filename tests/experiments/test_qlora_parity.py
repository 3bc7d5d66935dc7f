"""Tests for ``experiments/qlora_parity.py`` (``make qlora-parity``) on the tiny GGUF file of
test_llama.py: the merged tensors written back as GGUF read back as the same model, the
reconstruction error against a direct float64 computation, and ``--smoke`` (transformers
reading the written files)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import randomize_b
from published import check_published

import lorax_lite as ll
from experiments import qlora_parity
from experiments.models import llama_gguf
from lorax_lite.gguf_export import llama_row_order

pytest.importorskip("gguf", reason="the gguf package writes the tiny GGUF file")
pytest.importorskip("tokenizers", reason="the GGUF tokenizer is built with tokenizers")
from test_llama import llama_cpp_permute  # noqa: E402  (needs gguf)


def test_permute_rows_is_llama_cpps_order_and_undoes_the_loader():
    w = np.random.default_rng(0).normal(size=(24, 5))
    for n_head in (1, 2, 3):
        permuted = w[np.argsort(llama_row_order(len(w), n_head))]
        np.testing.assert_array_equal(permuted, llama_cpp_permute(w, n_head))
        np.testing.assert_array_equal(llama_gguf.unpermute_rows(permuted, n_head), w)


def test_merged_tensors_written_as_f32_load_back_as_the_merged_model(gguf_file, tmp_path):
    pretrained = llama_gguf.load(gguf_file, quantized=False)
    args = qlora_parity.parse_args(["--smoke", "--gguf", str(gguf_file)])
    tree = randomize_b(qlora_parity.init_tree(pretrained, args), jax.random.key(1), std=0.1)
    merged = ll.merge(tree)
    tensors = ll.gguf_tensors(tree, gguf_file)
    assert len(tensors) == 7 * pretrained.config.n_layer
    path = ll.write_gguf(tmp_path / "m.gguf", gguf_file, tensors, tensor_type="F32")
    again = llama_gguf.load(path, quantized=False).params
    flat = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
    for key, x in jax.tree_util.tree_flatten_with_path(again)[0]:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat[key]), err_msg=str(key))
    base = pretrained.params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(again["params"]["layers"]["self_attn"]["q_proj"]["kernel"], base)


def test_relative_errors_match_float64():
    rng = np.random.default_rng(2)
    w, q = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 6, 4))
    a, b = rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 4))
    layout = ll.Layout((0,), (1,), (2,))
    node = ll.LoraWeight(np.float32(q), np.float32(a), np.float32(b), 0.5, layout)
    got = qlora_parity.relative_errors(np.float32(w), node)
    expected = [np.linalg.norm(w[i] - q[i] - 0.5 * a[i] @ b[i]) / np.linalg.norm(w[i])
                for i in range(3)]  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_smoke(gguf_file, tmp_path):
    pytest.importorskip("transformers", reason="transformers reads the written GGUF files")
    pytest.importorskip("accelerate", reason="transformers needs accelerate for GGUF files")
    results = qlora_parity.main(["--smoke", "--gguf", str(gguf_file), "--out", str(tmp_path)])
    files = {r["tensor_type"]: r for r in results["gguf"]["files"]}
    assert list(files) == ["F16", "Q8_0", "Q4_1"]
    assert files["F16"]["max_rel_diff"] < 2e-3
    assert files["F16"]["argmax_agreement"] == 1.0
    assert files["F16"]["max_rel_diff"] < files["Q8_0"]["max_rel_diff"]
    assert files["Q8_0"]["max_rel_diff"] < files["Q4_1"]["max_rel_diff"]
    assert files["Q4_1"]["bytes"] < files["Q8_0"]["bytes"] < files["F16"]["bytes"]
    assert results["train_loss"][-1] < results["train_loss"][0]
    summary = results["loftq"]["summary"]
    assert summary["loftq-1"]["mean"] < summary["qlora"]["mean"]
    assert summary["loftq-3"]["mean"] <= summary["loftq-1"]["mean"]
    rows = results["merge"]["rows"]
    assert rows["float merge"]["max_rel_diff"] < 1e-4
    assert rows["requantized"]["max_rel_diff"] > rows["float merge"]["max_rel_diff"]
    assert results["merge"]["requantized_bytes"] < results["merge"]["unmerged_bytes"]
    check_published(
        tmp_path, "qlora_parity_smoke", results, "gguf", "## 1. Back to GGUF", "## 2. LoftQ"
    )
