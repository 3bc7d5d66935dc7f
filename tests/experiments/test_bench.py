"""The benchmark harness (experiments/bench/train_step.py) and experiments/param_arithmetic.py."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_reference

import lorax_lite as ll
from experiments import param_arithmetic
from experiments.bench import train_step, workers
from experiments.models.gpt import (
    GPT,
    causal_lm_loss,
    count_params,
    make_config,
    random_params,
)


def test_small_run_writes_a_sane_table_and_json(tmp_path):
    out = str(tmp_path / "bench")
    argv = ["--small", "--variants", "lora,full", "--steps", "2", "--repeats", "2", "--out", out]
    assert train_step.main(argv) == 0
    result = json.loads(open(out + ".json").read())
    assert {"machine", "commit", "command", "args", "variants", "ratios"} <= set(result)
    assert result["machine"]["jax"] == jax.__version__ and len(result["commit"]) == 40
    lora, full = result["variants"]["lora"], result["variants"]["full"]
    for row in (lora, full):
        assert row["status"] == "ok", row.get("reason")
        assert len(row["step_times_s"]) == 2 and all(len(r) == 2 for r in row["step_times_s"])
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
        assert row["peak_bytes"] > 2**20 and row["first_step_s"] > 0
        assert math.isfinite(row["loss_end"])
    d, layers, rank = 64, 2, 16  # the --small model: every block linear adapted at rank 16
    assert lora["n_trainable"] == layers * rank * (4 * d + 2 * d + 5 * d + 5 * d)
    config = make_config("custom", d_model=d, n_layer=layers, n_head=2, vocab_size=256, max_len=32)
    assert full["n_trainable"] == full["n_total"] == count_params(config)
    assert lora["n_total"] == count_params(config) + lora["n_trainable"]
    # Same initial model (B = 0): same first loss, close to log(vocab) at random init.
    assert lora["loss_start"] == pytest.approx(full["loss_start"], rel=1e-5)
    assert abs(lora["loss_start"] - math.log(256)) < 0.1
    assert result["speedups"]["full/lora"] == result["ratios"]["full/lora"]
    ratio = result["ratios"]["full/lora"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and len(ratio["per_repeat"]) == 2
    table = open(out + ".md").read()
    assert "| lora |" in table and "| full |" in table and "time / lora" in table
    assert (tmp_path / "bench.png").stat().st_size > 0


def _small_lora_tree():
    """The ``--small`` bench GPT's LoRA tree (float32), its model, tokens and flags."""
    args = train_step.parse_args(["--small"])
    config = train_step.model_config(args)
    model, tokens = GPT(config), train_step._tokens(config, args)
    tree = train_step._lora_tree(args, model, random_params(config, 0), tokens)
    return tree, model, tokens, args


# Stored bytes per weight of each base storage at block 64 (float32 scales and minimums).
BYTES_PER_WEIGHT = {"int8": 1 + 4 / 64, "int4": 0.5 + 4 / 64, "nf4": 0.5 + 4 / 64}
BYTES_PER_WEIGHT["int4-asym"] = 0.5 + 8 / 64


@pytest.mark.parametrize("storage", train_step.BASE_STORAGE)
def test_base_bytes_match_the_storage_formula(storage):
    tree, _, _, _ = _small_lora_tree()
    also = ("wte", "wpe", "lm_head")
    stored = train_step.store_base(tree, storage, block=64, also=also)
    counts = ll.count(stored)
    # By hand from the float tree's shapes: quantized weights at BYTES_PER_WEIGHT, the
    # rest of the frozen base (LayerNorms, biases) at 2 bytes (bfloat16).
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    expected = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_lora):
        name = jax.tree_util.keystr(path)
        weight = leaf.w if is_lora(leaf) else leaf
        quantized = storage != "bf16" and (is_lora(leaf) or any(p in name for p in also))
        expected += weight.size * (BYTES_PER_WEIGHT[storage] if quantized else 2)
    assert counts["total_bytes"] - counts["trainable_bytes"] == expected
    assert counts["trainable_bytes"] == 4 * counts["trainable"]  # adapters stay float32
    bf16 = ll.count(train_step.store_base(tree, "bf16"))
    ratio = (counts["total_bytes"] - counts["trainable_bytes"]) / (
        bf16["total_bytes"] - bf16["trainable_bytes"]
    )
    if storage in ("int4", "nf4"):  # ../shared/BENCHMARKS.md target 9: at most 0.3x bf16
        assert 0.28 < ratio < 0.3
    assert storage != "bf16" or ratio == 1


def test_failure_line_skips_jax_traceback_filter_note():
    reason = "Traceback ...\nAttributeError: no attribute w\n--------------------\n"
    reason += "For simplicity, JAX has removed its internal frames from the traceback.\n"
    assert workers.failure_line(reason) == "AttributeError: no attribute w"
    assert workers.failure_line("worker exited 1: \n") == "worker exited 1:"


@pytest.mark.parametrize("storage", ["int8", "int4", "nf4"])
def test_lora_over_a_quantized_base_computes_the_dequantized_models_loss(storage):
    tree, model, tokens, _ = _small_lora_tree()
    rng = np.random.default_rng(4)  # non-zero B, so that the adapter path counts
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    with_b = lambda n: dataclasses.replace(
        n, b=jnp.asarray(rng.normal(0, 0.2, n.b.shape), n.b.dtype)
    )
    tree = jax.tree_util.tree_map(lambda n: with_b(n) if is_lora(n) else n, tree, is_leaf=is_lora)
    stored = train_step.store_base(tree, storage, also=("wte", "wpe", "lm_head"))
    trainable, frozen = ll.partition(stored)
    is_quantized = lambda x: isinstance(x, ll.QuantizedWeight)
    assert any(map(is_quantized, jax.tree_util.tree_leaves(frozen, is_leaf=is_quantized)))
    loss = lambda tr, fr: causal_lm_loss(ll.lora(model.apply)(ll.combine(tr, fr), tokens), tokens)
    grad = jax.jit(jax.value_and_grad(loss))
    value, grads = grad(trainable, frozen)
    # Reference 1: the plain model on w + s * A @ B formed in float64 from the dequantized w.
    float_base = ll.combine(trainable, train_step.dequantized(frozen))
    merge = lambda n: jnp.asarray(dense_reference(n), jnp.float32) if is_lora(n) else n
    merged = jax.tree_util.tree_map(merge, float_base, is_leaf=is_lora)
    expected = causal_lm_loss(jax.jit(model.apply)(merged, tokens), tokens)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    # Reference 2: the adapters' gradients over the dequantized float base.
    _, float_grads = grad(trainable, train_step.dequantized(frozen))
    for mine, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(float_grads)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(ref), rtol=1e-4, atol=1e-6)
    # The harness's worker check accepts this loss, and refuses one 1e-3 off.
    train_step.check_first_loss(float(value), float(expected))
    with pytest.raises(ValueError, match="dequantized"):
        train_step.check_first_loss(float(value) + 1e-3, float(expected))


def test_quantized_base_run_writes_the_storage_table(tmp_path):
    out = str(tmp_path / "bench_quant")
    variants = "lora-bf16,lora-nf4"  # two workers: int4's bytes and loss are checked above
    argv = ["--small", "--variants", variants, "--steps", "1", "--repeats", "2", "--out", out]
    assert train_step.main(argv) == 0
    result = json.loads(open(out + ".json").read())
    assert result["machine"]["jax"] == jax.__version__ and result["machine"]["cpu_count"] > 0
    assert result["load_average"]["before"] and len(result["commit"]) == 40
    assert f"--variants {variants}" in result["command"]
    table = result["base_storage"]
    assert list(table) == variants.split(",")
    tree, _, _, _ = _small_lora_tree()  # the workers' bytes are those of the same trees here
    for variant, row in table.items():
        assert result["variants"][variant]["status"] == "ok", result["variants"][variant]
        counts = ll.count(train_step.store_base(tree, variant[5:], also=("wte", "wpe", "lm_head")))
        assert row["base_bytes"] == counts["total_bytes"] - counts["trainable_bytes"]
        assert row["bytes_ratio"] == row["base_bytes"] / table["lora-bf16"]["base_bytes"]
    assert table["lora-bf16"]["time_ratio"] is None and "loss_gap" not in table["lora-bf16"]
    row = table["lora-nf4"]
    assert row["bytes_ratio"] < 0.3 and row["targets"]["bytes_met"] is True
    assert abs(row["loss_gap"]) <= 1e-5  # the timed step computes the right loss
    for key in ("time_ratio", "cpu_time_ratio"):
        ratio = row[key]  # structure only: timings on a shared CPU assert nothing
        assert len(ratio["per_repeat"]) == 2
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert row["targets"]["time_met"] == (row["time_ratio"]["median"] <= 1.25)
    text = open(out + ".md").read()
    assert "### LoRA step by frozen base storage (ratios over lora-bf16)" in text
    assert "| lora-nf4 | nf4, block 64 (LoRA bases + wte,wpe,lm_head; rest bf16) |" in text
    assert (tmp_path / "bench_quant.png").stat().st_size > 0


def test_paired_ratios_are_per_repeat_medians_over_the_reference():
    rows = {
        "lora": {"repeat_medians_s": [1.0, 2.0, 4.0]},
        "full": {"repeat_medians_s": [1.5, 2.0, 8.0]},
        "peft": {"status": "skipped"},
    }
    ratios = train_step.paired_ratios(rows, "lora")
    assert set(ratios) == {"full/lora"}
    assert ratios["full/lora"] == dict(median=1.5, min=1.0, max=2.0, per_repeat=[1.5, 1.0, 2.0])


def test_speedups_are_baseline_over_lora_time_per_repeat():
    rows = {
        "lora": {"repeat_medians_s": [1.0, 2.0], "cpu_repeat_medians_s": [1.0, 1.0]},
        "inline": {"repeat_medians_s": [0.5, 1.0], "cpu_repeat_medians_s": [2.0, 2.0]},
        "full": {"repeat_medians_s": [1.5, 2.0], "cpu_repeat_medians_s": [3.0, 4.0]},
    }
    out = train_step.speedups(rows)
    assert set(out) == {"full/lora", "full/lora cpu", "full/inline", "full/inline cpu"}
    assert out["full/lora"]["per_repeat"] == [1.5, 1.0]
    assert out["full/inline"]["per_repeat"] == [3.0, 2.0]
    assert out["full/lora cpu"]["median"] == 3.5


def test_flops_per_token_by_hand():
    config = make_config("custom", d_model=8, n_layer=2, n_head=2, vocab_size=10)
    n = 2 * 12 * 64 + 8 * 10  # block linears + lm_head
    attention = 4 * 2 * 5 * 8  # 4 L T d at T = 5
    adapters = 2 * 3 * 2 * (32 + 16 + 40 + 40)  # 2 r L sum(d_in + d_out) at r = 3
    flops = lambda variant, mode: train_step.flops_per_token(config, 5, 3, variant, mode)
    assert flops("full", "train") == 6 * n + 3 * attention
    assert flops("lora", "train") == 4 * n + 3 * attention + 3 * adapters
    assert flops("base", "inference") == 2 * n + attention
    assert flops("unmerged", "inference") == 2 * n + attention + adapters


def test_inline_yardstick_computes_what_lorax_lite_computes():
    config = make_config("custom", d_model=32, n_layer=2, n_head=2, vocab_size=64, max_len=16)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    model = GPT(config)
    params = random_params(config, 1)
    lora_config = ll.LoraConfig(rank=4, alpha=8, targets=train_step.LORA_TARGETS)
    tree = ll.init(params, lora_config, key=jax.random.key(2), fn=model.apply, args=(tokens,))
    rng = np.random.default_rng(3)  # non-zero B (numpy: no eager JAX op to compile)
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    with_b = lambda n: dataclasses.replace(
        n, b=jnp.asarray(rng.normal(0, 0.2, n.b.shape), n.b.dtype)
    )
    tree = jax.tree_util.tree_map(lambda n: with_b(n) if is_lora(n) else n, tree, is_leaf=is_lora)
    # The reference: the plain model on w + s * A @ B formed in float64 numpy.
    merge = lambda n: jnp.asarray(dense_reference(n), jnp.float32) if is_lora(n) else n
    merged = jax.tree_util.tree_map(merge, tree, is_leaf=is_lora)
    apply = jax.jit(model.apply)
    expected = np.asarray(apply(merged, tokens))
    inline = GPT(dataclasses.replace(config, lora_rank=4, lora_alpha=8.0))
    actual = jax.jit(inline.apply)(train_step.inline_from_lora(tree), tokens)
    lorax = jax.jit(ll.lora(model.apply))(tree, tokens)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lorax), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - np.asarray(apply(params, tokens))).max() > 1e-2


def test_param_arithmetic_smoke_matches_the_formulas(tmp_path):
    out = str(tmp_path / "pa")
    rows = param_arithmetic.main(["--smoke", "--out", out])
    assert {(r["size"], r["targets"], r["rank"]) for r in rows} == {
        (s, t, r)
        for s in ("tiny", "small")
        for t, r in [("c_attn+c_proj", 4), ("all-linear", 4), ("all-linear", 8)]
    }
    for r in rows:
        config = make_config(r["size"], tie_head=True)
        d, layers = config.d_model, config.n_layer
        # Per layer: c_attn (d + 3d), attn c_proj (d + d), c_fc (d + 4d), mlp c_proj (4d + d).
        per_rank = 11 * d if r["targets"] == "c_attn+c_proj" else 16 * d
        assert r["trainable"] == layers * r["rank"] * per_rank
        assert r["base_params"] == count_params(config)
        assert r["adapter_bytes"] == 4 * r["trainable"] and r["model_bytes"] == 4 * count_params(
            config
        )
        assert r["percent"] == pytest.approx(
            100 * r["trainable"] / (r["trainable"] + count_params(config))
        )
    small = [r for r in rows if r["size"] == "small"]
    assert small[0]["base_params"] == 124_439_808  # GPT-2 small as released
    saved = json.loads(open(out + ".json").read())
    assert saved["single_layer"] == dict(d=768, rank=4, adapter=6144, dense=589_824, ratio=96.0)
    assert "6,144 adapter parameters vs 589,824 dense (96x fewer)" in open(out + ".md").read()
    assert (tmp_path / "pa.png").stat().st_size > 0


@pytest.mark.parametrize(
    "size, released",
    [
        ("small", 124_439_808),
        ("medium", 354_823_168),
        ("large", 774_030_080),
        ("xl", 1_557_611_200),
    ],
)
def test_param_arithmetic_rows_match_hand_formulas_at_every_gpt2_size(size, released):
    config = make_config(size, tie_head=True)
    d, layers = config.d_model, config.n_layer
    r = param_arithmetic.row(size, "all-linear", "all-linear", 4)
    # all-linear: c_attn d x 3d, attn c_proj d x d, c_fc d x 4d, mlp c_proj 4d x d, rank 4.
    assert r["trainable"] == layers * 4 * (4 * d + 2 * d + 5 * d + 5 * d)
    assert r["base_params"] == count_params(config) == released
    assert r["model_bytes"] == 4 * released and r["adapter_bytes"] == 4 * r["trainable"]


def test_abstract_lora_tree_allocates_no_weights():
    tree = param_arithmetic.abstract_lora_tree("xl", "all-linear", 4)
    leaves = jax.tree_util.tree_leaves(tree)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    kernel = tree["params"]["h"]["attn"]["c_attn"]["kernel"]
    assert kernel.a.shape == (48, 1600, 4) and kernel.b.shape == (48, 4, 4800)
    assert kernel.w.dtype == jnp.float32


def test_dora_variants_start_at_the_lora_loss_and_agree_with_each_other():
    """``dora`` (factored norm) and ``dora-materialized`` (dense m V / ||V||) compute the
    same loss and gradients; at init (B = 0, m = ||w||) both equal plain LoRA's loss."""
    args = train_step.parse_args(["--small"])
    config = train_step.model_config(args)
    parts = {v: train_step._train_parts(v, args) for v in ("lora", "dora", "dora-materialized")}
    tokens = train_step._tokens(config, args)
    losses, grads = {}, {}
    for variant, (loss, trainable, frozen, _) in parts.items():
        if variant != "lora":  # non-zero B, so that the norm moves off ||w||
            bump = lambda n: dataclasses.replace(n, b=n.b + 0.05) if n.m is not None else n
            trainable = jax.tree_util.tree_map(
                bump, trainable, is_leaf=lambda n: isinstance(n, ll.LoraWeight)
            )
            losses[variant], grads[variant] = jax.jit(jax.value_and_grad(loss))(
                trainable, frozen, tokens
            )
        losses[variant + " at init"] = float(jax.jit(loss)(*parts[variant][1:3], tokens))
    assert losses["dora at init"] == pytest.approx(losses["lora at init"], rel=1e-6)
    assert float(losses["dora"]) == pytest.approx(float(losses["dora-materialized"]), rel=1e-5)
    assert abs(float(losses["dora"]) - losses["dora at init"]) > 1e-3
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
    got, expected = flat(grads["dora"]), flat(grads["dora-materialized"])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
