"""LoRA variants on the demo task (``make variants``): LoRA, LoRA+, PiSSA, OLoRA, DoRA.

all-MiniLM-L6-v2 on Rotten Tomatoes, as in `experiments.demo`: rank-8 adapters on every
query and value projection plus the head, the same split, batches, AdamW schedule and
seed for every variant. Only the adapters' init (``LoraConfig.init``), the learning
rate of ``B`` (LoRA+, ``ll.optimizer(..., b_lr_ratio=...)``) or the magnitude (DoRA,
``LoraConfig(use_dora=True)``) differ. One seed, a short
run: a sanity check of each variant on a real model, not a comparison of methods.

Results go to ``experiments/results/variants.{json,md,png}``; ``--smoke`` runs the same
code on generated snippets and a tiny random BERT in seconds.

Usage:
    python -m experiments.variants [--steps 120] [--variants lora lora-plus pissa olora dora]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax

import lorax_lite as ll
from experiments import demo, runner

VARIANTS = ("lora", "lora-plus", "pissa", "olora", "dora")
DEMO_TASK = "all-MiniLM-L6-v2 on Rotten Tomatoes"
SMOKE_TASK = "a tiny random BERT on generated snippets (--smoke)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    demo.task_flags(p)
    p.add_argument("--b-lr-ratio", type=float, default=16.0, help="LoRA+ lr_B / lr_A")
    return runner.parse(p, argv, **demo.SMOKE_FLAGS, steps=20)


def variant_config(variant: str, args: argparse.Namespace) -> ll.LoraConfig:
    """The demo's LoRA configuration, with PiSSA's or OLoRA's init or DoRA for those."""
    config = demo.lora_config(args)
    init = variant if variant in ("pissa", "olora") else "kaiming"
    return dataclasses.replace(config, init=init, use_dora=variant == "dora")


def run_variant(variant: str, task: demo.Task, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one variant and returns its final training loss and test metrics."""
    tree = ll.init(task.params, variant_config(variant, args), key=demo.lora_key(args.seed))
    start_logits = demo.predict(demo.logits_fn(task.model), tree, task.test)
    base_logits = demo.predict(jax.jit(task.model.apply), task.params, task.test)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(args.steps // 10, 1), args.steps
    )
    ratio = args.b_lr_ratio if variant == "lora-plus" else None
    tx = ll.optimizer(optax.adamw(schedule), tree, b_lr_ratio=ratio)
    init, step = ll.train_step(demo.loss_fn(task.model), tx)
    state = init(tree, jax.random.key(args.seed))
    batches = demo.train_batches(task.train, batch=args.batch, seed=args.seed)
    start = time.perf_counter()
    state, history = ll.fit(step, state, batches, steps=args.steps, desc=variant)
    seconds = time.perf_counter() - start
    test = demo.evaluate(demo.logits_fn(task.model), state.tree, task.test)
    return {
        "variant": variant,
        "init": variant_config(variant, args).init,
        "b_lr_ratio": ratio,
        "step0_max_abs_logit_change": float(np.abs(start_logits - base_logits).max()),
        "loss_first_10": float(np.mean([h["loss"] for h in history[:10]])),
        "loss_last_10": demo.final_loss(history),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": seconds,
    }


COLUMNS = (
    "variant", "init", "step-0 max abs logit change", "train loss, first 10",
    "train loss, last 10", "test accuracy", "test loss", "train time (s)",
)  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report."""
    a = results["args"]
    rows = [
        (
            r["variant"], r["init"], f"{r['step0_max_abs_logit_change']:.2g}",
            f"{r['loss_first_10']:.4f}", f"{r['loss_last_10']:.4f}", f"{r['test_accuracy']:.3f}",
            f"{r['test_loss']:.4f}", f"{r['train_seconds']:.0f}",
        )
        for r in results["rows"]
    ]  # fmt: skip
    lines = [
        "# LoRA variants on the demo task (one seed, a short run)",
        "",
        f"{SMOKE_TASK if a['smoke'] else DEMO_TASK}; rank {a['rank']}, alpha {a['alpha']:g} "
        f"on every query and value projection plus the head; {a['steps']} steps of batch "
        f"{a['batch']}, "
        f"{a['max_length']} tokens; AdamW peak lr {a['lr']:g} (10% warm-up, cosine decay); "
        f"LoRA+ ratio {a['b_lr_ratio']:g}; seed {a['seed']}. One seed and a short run: "
        "this table ranks no method.",
        "",
        runner.table(COLUMNS, "llrrrrrr", rows),
        "",
        "Step-0 logit change: the largest |logit| difference on the test split between the "
        "initialised LoRA tree and the base model (PiSSA and OLoRA move part of each weight "
        "into the adapter; the model must not change). Train time includes compilation and "
        "was measured on a shared machine: not a speed comparison.",
        "",
        results["run_line"],
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Test accuracy of each variant, as bars."""
    rows = results["rows"]
    with runner.figure(path, size=(6, 3), dpi=100) as (_, ax):
        ax.bar([r["variant"] for r in rows], [r["test_accuracy"] for r in rows])
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.set_title(f"rank {results['args']['rank']}, {results['args']['steps']} steps, one seed")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains every variant on the demo's task and writes the results."""
    args = parse_args(argv)
    clock = runner.Clock("experiments.variants", args.argv)
    with tempfile.TemporaryDirectory() as work_dir:
        args.work_dir = pathlib.Path(work_dir)
        task = demo.load_task(args)
        rows = [run_variant(v, task, args) for v in args.variants]
    shown = {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "argv")}
    stamp = clock.stop()
    results = {"args": shown, "rows": rows, "provenance": stamp.machine, "run_line": stamp.line}
    stem = "variants" + ("_smoke" if args.smoke else "")
    runner.publish(args.out, stem, results, markdown(results), plot, smoke=args.smoke)
    return results


if __name__ == "__main__":
    main()
