"""The alpha/rsLoRA/dropout experiment: its plan, its trees, and its --smoke run end to end."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from published import check_published

import lorax_lite as ll
from experiments import alpha_dropout, demo
from lorax_lite.targets import named_leaves
from lorax_lite.weight import is_lora_node


def test_plan_agrees_at_the_reference_rank_and_runs_each_computation_once():
    args = alpha_dropout.parse_args([])
    runs = alpha_dropout.plan(args)
    scaling = {(r.rank, r.use_rslora): r.scale for r in runs if r.study == "scaling"}
    assert scaling == pytest.approx(
        {(2, False): 8.0, (8, False): 2.0, (32, False): 0.5,
         (2, True): 4.0, (8, True): 2.0, (32, True): 1.0}
    )  # fmt: skip
    dropout = [(r.dropout, r.n_train) for r in runs if r.study == "dropout"]
    assert dropout == [(p, n) for n in (1000, None) for p in (0.0, 0.05, 0.1, 0.3)]
    # rank 8 at s=2: alpha/r, rsLoRA and dropout 0 on the full set are one computation.
    assert len(runs) == 14 and len({r.key() for r in runs}) == 12
    for r in runs:  # the library's own scale for the same settings
        config = ll.LoraConfig(rank=r.rank, alpha=r.alpha, use_rslora=r.use_rslora)
        assert config.scale_for(r.rank, r.alpha) == pytest.approx(r.scale, rel=1e-12)


def test_trees_carry_the_planned_rank_scale_and_dropout(tmp_path):
    args = alpha_dropout.parse_args(["--smoke"])
    params = demo.load_task(_task_args(args, tmp_path)).params
    for run in alpha_dropout.plan(args):
        tree = alpha_dropout.lora_tree(params, run, _task_args(args, tmp_path))
        weights = [
            w for _, w in named_leaves(tree, is_leaf=is_lora_node) if isinstance(w, ll.LoraWeight)
        ]
        assert len(weights) == 2 * demo.SMOKE_BERT.num_layers  # query and value
        for w in weights:
            assert w.a.shape[-1] == run.rank and w.dropout == run.dropout
            assert math.isclose(w.scale, run.scale, rel_tol=1e-6)


def test_bad_dropout_is_rejected():
    with pytest.raises(SystemExit):
        alpha_dropout.parse_args(["--dropouts", "0.1", "1.0"])


def _task_args(args, tmp_path):
    import argparse

    task_args = argparse.Namespace(**vars(args), work_dir=tmp_path, n_train=0)
    task_args.rank = args.ref_rank
    return task_args


def test_smoke_run_trains_every_configuration_and_reports(tmp_path):
    results = alpha_dropout.main(["--smoke", "--out", str(tmp_path)])
    runs = results["runs"]
    assert len(runs) == 8 and sum(r["first_run"] for r in runs) == 6
    h = demo.SMOKE_BERT.hidden_size
    for r in runs:
        curve = r["validation_curve"]
        assert curve["step"] == [0, 4, 8] and len(curve["loss"]) == 3
        assert r["trainable"] == 2 * h + 2 + 2 * r["rank"] * (h + h)
        assert np.isfinite(curve["loss"]).all() and r["train_loss"] > 0

    def find(**fields):
        (match,) = [r for r in runs if all(r[k] == v for k, v in fields.items())]
        return match["validation_curve"]["loss"]

    full = results["n_train_full"]
    # Shared configuration: reported in both places with the same curve.
    assert find(study="scaling", rank=2, use_rslora=True) == find(study="dropout", dropout=0.0,
                                                                  n_train=full)  # fmt: skip
    # Each knob changes the computation.
    assert find(study="scaling", rank=4, use_rslora=True) != find(
        study="scaling", rank=4, use_rslora=False
    )
    assert find(study="dropout", dropout=0.3, n_train=40) != find(
        study="dropout", dropout=0.0, n_train=40
    )
    check_published(
        tmp_path, "alpha_dropout_smoke", results, "runs",
        "| 4 | rsLoRA alpha/sqrt(r) | 11.31 | 5.657 | 578 |", "| 40 | 0.3 |",
    )  # fmt: skip
    assert jax.default_backend() == results["machine"]["backend"]
