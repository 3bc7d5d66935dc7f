"""Tests for ``experiments/llm.py`` (``make llm``) on the tiny GGUF file of test_llama.py:
answer scores over the shared-prefix cache against full forward passes without one, the
answer-only loss against a direct cross-entropy, the held-out loss, and ``--smoke``."""

from __future__ import annotations

import bz2
import csv

import jax
import numpy as np
import pytest
from helpers import randomize_b
from published import check_published
from scipy.special import log_softmax

import lorax_lite as ll
from experiments import llm
from experiments.data import rotten_tomatoes
from experiments.models import llama_gguf
from experiments.models.llama import forward

pytest.importorskip("gguf", reason="the gguf package writes the tiny GGUF file")
pytest.importorskip("tokenizers", reason="the GGUF tokenizer is built with tokenizers")


@pytest.fixture(scope="module")
def task(gguf_file, tmp_path_factory):
    argv = ["--smoke", "--gguf", str(gguf_file), "--work-dir", str(tmp_path_factory.mktemp("w"))]
    return llm.load_task(llm.parse_args(argv))


@pytest.fixture(scope="module")
def lora_tree(task):
    """Adapters on every linear layer with random B, so that they act."""
    model = llm.Llama(task.pretrained.config)
    config = ll.LoraConfig(rank=4, targets="all-linear")
    tree = ll.init(
        task.pretrained.params,
        config,
        key=jax.random.key(0),
        fn=model.apply,
        args=(np.zeros((1, 4), np.int32),),
    )
    return randomize_b(tree, jax.random.key(1), std=0.05)


def reference_scores(task, tree, prompts):
    """log p(answer | prompt) from one full forward pass per (prompt, answer), no cache."""
    config = task.pretrained.config
    out = np.zeros((len(prompts.suffixes), len(task.answers)))
    for i, suffix in enumerate(prompts.suffixes):
        for j, answer in enumerate(task.answers):
            tokens = np.concatenate([prompts.prefix, suffix, answer])[None]
            logp = log_softmax(np.asarray(forward(config, tree, tokens), np.float64), axis=-1)[0]
            start = len(prompts.prefix) + len(suffix) - 1
            out[i, j] = sum(logp[start + t, a] for t, a in enumerate(answer))
    return out


@pytest.mark.parametrize("adapted", [False, True], ids=["base", "lora"])
def test_answer_scores_equal_full_forward_passes(task, lora_tree, adapted):
    """The cached prefix, right padding, length buckets and the filled last batch change
    no score: each equals the log-probability from a plain forward pass."""
    tree = lora_tree if adapted else task.pretrained.params
    n = 11  # not a multiple of the batch: the last batch is filled with copies
    prompts = task.test._replace(suffixes=task.test.suffixes[:n], labels=task.test.labels[:n])
    scores = llm.answer_scores(task, tree, prompts, batch=4)
    expected = reference_scores(task, tree, prompts)
    np.testing.assert_allclose(scores, expected, atol=2e-4, rtol=1e-5)
    assert llm.accuracy(scores, prompts.labels) == np.mean(
        expected.argmax(1) == prompts.labels
    )  # fmt: skip


def test_training_loss_is_the_cross_entropy_of_the_answer_tokens(task, lora_tree):
    config = task.pretrained.config
    batch = next(llm.training_batches(task, batch=3, length=96, seed=0))
    loss = llm.loss_fn(config, task.train.prefix)(lora_tree, batch, None)
    nll = []
    for row in range(3):
        n = int(batch.weight[row].sum())
        targets = batch.target[row, :n]
        first = int(batch.index[row, 0])
        tokens = np.concatenate([task.train.prefix, batch.suffix[row, : first + n]])[None]
        logp = log_softmax(np.asarray(forward(config, lora_tree, tokens), np.float64), axis=-1)[0]
        at = len(task.train.prefix) + first + np.arange(n)
        assert (batch.suffix[row, first + 1 : first + n] == targets[:-1]).all()
        nll += list(-logp[at, targets])
    assert targets[-1] == task.end_of_turn[-1]  # the answer ends its turn
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def test_prefix_and_suffix_tokenize_as_the_whole_prompt(task):
    tok = task.pretrained.tokenizer
    texts = ["the film is witty", "awful plot #3"]
    whole = [
        llama_gguf.encode(
            tok,
            llama_gguf.chat_prompt(
                tok, [{"role": "system", "content": llm.SYSTEM}, {"role": "user", "content": t}]
            ),
        )
        for t in texts
    ]
    prompts = llm.encode_split(task.pretrained, rotten_tomatoes.Split(texts, np.array([1, 0])))
    for ids, suffix in zip(whole, prompts.suffixes):
        np.testing.assert_array_equal(np.concatenate([prompts.prefix, suffix]), ids)


def test_answer_groups_share_rows_for_one_token_answers():
    one, two, three = np.array([5]), np.array([6, 7]), np.array([8, 9, 10])
    assert llm.answer_groups((two, one)) == [(0, [0, 1])]  # SmolLM2: rotten 2, fresh 1
    assert llm.answer_groups((one, one)) == [(0, [0, 1])]
    assert llm.answer_groups((two, three, one)) == [(0, [0, 2]), (1, [1])]


def test_heldout_loss_is_the_masked_mean_next_token_loss(task):
    config, tree = task.pretrained.config, task.pretrained.params
    mask = task.heldout_mask.copy()
    mask[0, 20:] = False  # a shorter text: its padding does not count
    logp = log_softmax(np.asarray(forward(config, tree, task.heldout), np.float64), axis=-1)
    nll = -np.take_along_axis(logp[:, :-1], task.heldout[:, 1:, None], axis=2)[..., 0]
    expected = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    actual = llm.heldout_loss(task._replace(heldout_mask=mask), tree)
    assert actual == pytest.approx(expected, rel=1e-5)
    assert actual != pytest.approx(nll.mean(), rel=1e-4)


def test_read_plots_keeps_unique_plot_summaries_in_order(tmp_path):
    path = tmp_path / "corpus.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        for row in [("plot", "B"), ("fresh", "x"), ("plot", "A"), ("plot", "B")]:
            writer.writerow([*row, "m", "True"])
    assert rotten_tomatoes.read_plots(path) == ["B", "A"]
    empty = tmp_path / "empty.csv.bz2"
    with bz2.open(empty, "wt", encoding="utf-8", newline="") as file:
        file.write("category,text\nfresh,x\n")
    with pytest.raises(ValueError, match="empty.csv.bz2: no plot summaries"):
        rotten_tomatoes.read_plots(empty)


def test_smoke_llm_trains_saves_reloads_and_reports(gguf_file, tmp_path):
    argv = ["--smoke", "--gguf", str(gguf_file), "--out", str(tmp_path), "--full-steps", "2"]
    results = llm.main(argv)
    rows, check = {r["row"]: r for r in results["rows"]}, results["reload_check"]
    assert list(rows) == list(llm.ROWS)
    config = llama_gguf.load(gguf_file).config
    d, f, kv, r = config.d_model, config.d_ff, config.n_kv_head * config.head_dim, 8
    q = config.n_head * config.head_dim
    per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    for name in ("lora", "qlora-gguf", "qlora-nf4", "qlora-nf4-loftq"):
        row = rows[name]
        assert row["trainable"] == config.n_layer * per_layer
        assert row["losses"]["loss"][-1] < row["losses"]["loss"][0]  # the answers are learned
        assert row["curve"]["step"] == [0, 2, 4] and 0 <= row["test_accuracy"] <= 1
        assert 4 * row["trainable"] < row["adapter_bytes"] and row["step_seconds"] > 0
    assert rows["qlora-gguf"]["base_bytes"] < rows["lora"]["base_bytes"] / 3
    assert rows["qlora-nf4"]["base_bytes"] < rows["lora"]["base_bytes"] / 3
    # LoftQ: the same NF4 base bytes; its adapter changes the model before training.
    plain, loftq = rows["qlora-nf4"], rows["qlora-nf4-loftq"]
    assert loftq["base_bytes"] == plain["base_bytes"] and results["args"]["loftq_iter"] == 1
    assert np.isfinite([plain["init_heldout_loss"], loftq["init_heldout_loss"]]).all()
    assert loftq["init_heldout_loss"] != pytest.approx(plain["init_heldout_loss"], rel=1e-6)
    merge = plain["requantized_merge"]
    n = check["examples"]
    assert np.isfinite([merge[k] for k in ("test_accuracy", "heldout_loss")]).all()
    # Re-quantizing moves the scores (the smoke's adapters, lr 1e-2 on a tiny random model,
    # are large against its weights: several nats), and only as far as the flips allow.
    assert 0 < merge["mean_abs_diff_scores"] <= merge["max_abs_diff_scores"] < np.inf
    assert 0 <= merge["flipped"] <= n
    assert abs(merge["test_accuracy"] - plain["test_accuracy"]) <= merge["flipped"] / n + 1e-9
    assert rows["zero-shot"]["trainable"] == 0 and "test_accuracy" not in rows["full"]
    assert rows["full"]["trainable"] == rows["zero-shot"]["total"] and rows["full"]["steps"] == 2
    assert check["same_predictions"] and check["max_abs_diff_scores"] < 1e-5
    assert check["test_accuracy"] == rows["lora"]["test_accuracy"]
    check_published(
        tmp_path, "llm_smoke", results, "rows", "timed over 2 steps only", "same predictions: True",
        "LoftQ init", "Merged into the quantized base",
    )  # fmt: skip


def test_smoke_needs_a_gguf_file():
    with pytest.raises(SystemExit):
        llm.parse_args(["--smoke"])
