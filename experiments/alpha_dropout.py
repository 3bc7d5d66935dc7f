"""Alpha, rsLoRA and dropout in practice, on the demo's task (issue 7, section 4).

all-MiniLM-L6-v2 with LoRA on every ``query`` and ``value`` projection plus a trained
head, on the demo's fixed Rotten Tomatoes split (same seed, same validation set), with
the demo's training loop (`experiments.demo.train`). Two studies:

- **scaling**: ranks 2, 8, 32 at one fixed learning rate, with the adapter scaled by
  ``alpha / r`` (``alpha = 16``) or by ``alpha / sqrt(r)`` (rsLoRA,
  ``LoraConfig(use_rslora=True)``). rsLoRA's alpha is chosen so that both scalings
  agree at the reference rank (8, the demo's): ``alpha_rs = 16 / sqrt(8)`` gives
  ``s = 2`` there, so only how ``s`` moves with the rank differs. Does the learning
  rate tuned at rank 8 transfer to other ranks?
- **dropout**: adapter-input dropout 0, 0.05, 0.1 and 0.3 at rank 8, trained on a
  small (1,000 snippets) and on the full training set.

Runs with the same rank, scale, dropout and training set are the same computation
and run once (rank 8 at ``s = 2`` appears in both studies and under both scalings).
Every run uses the demo's learning rate and batch (and alpha, for alpha/r) and its
number of steps, with 32 tokens per snippet instead of 48 (a third of the snippets
are cut short), so that the whole study runs in about a quarter of an hour on a
2-core CPU.

Results go to ``experiments/results/alpha_dropout.{json,md,png}``; ``--smoke`` runs
the same code on generated snippets and a tiny random BERT in seconds.

Usage:
    python -m experiments.alpha_dropout [--steps 120] [--max-length 32] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import tempfile
from typing import Any, NamedTuple

import lorax_lite as ll
from experiments import demo, runner
from experiments.provenance import run_line


class Run(NamedTuple):
    """One configuration of a study.

    Attributes:
        study: ``"scaling"`` or ``"dropout"``.
        rank: the LoRA rank.
        alpha: the LoRA alpha.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        dropout: the adapter-input dropout rate.
        n_train: training snippets (None: the whole training split).
    """

    study: str
    rank: int
    alpha: float
    use_rslora: bool
    dropout: float
    n_train: int | None

    @property
    def scale(self) -> float:
        """The adapter scale ``s`` of ``W + s A B``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def key(self) -> tuple:
        """What determines the computation: equal keys train the same model."""
        return (self.rank, round(self.scale, 9), self.dropout, self.n_train)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__)
    demo.task_flags(p, max_length=32, study=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32], help="scaling ranks")
    p.add_argument("--ref-rank", type=int, default=8, help="rank where the scalings agree")
    p.add_argument(
        "--dropouts", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.3], help="dropout rates"
    )
    p.add_argument("--n-small", type=int, default=1000, help="snippets of the small set")
    p.add_argument("--eval-every", type=int, default=20, help="steps between validations")
    args = runner.parse(
        p, argv, **demo.SMOKE_FLAGS, steps=8, ranks=[2, 4], ref_rank=2, dropouts=[0.0, 0.3],
        n_small=40, eval_every=4,
    )  # fmt: skip
    if args.ref_rank < 1 or min(args.ranks) < 1:
        p.error("ranks must be positive")
    if not all(0.0 <= p < 1.0 for p in args.dropouts):
        p.error(f"dropout rates must lie in [0, 1); got {args.dropouts}")
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every configuration of both studies, in order (duplicates included)."""
    rs_alpha = args.alpha / math.sqrt(args.ref_rank)  # s = alpha / ref_rank at ref_rank
    scaling = [
        Run("scaling", rank, alpha, rs, 0.0, None)
        for rs, alpha in ((False, args.alpha), (True, rs_alpha))
        for rank in args.ranks
    ]
    dropout = [
        Run("dropout", args.ref_rank, args.alpha, False, p, n)
        for n in (args.n_small, None)
        for p in args.dropouts
    ]
    return scaling + dropout


def lora_tree(params: dict[str, Any], run: Run, args: argparse.Namespace) -> Any:
    """The demo's LoRA tree (query, value + head, same key) at this run's settings."""
    config = dataclasses.replace(
        demo.lora_config(args),
        rank=run.rank,
        alpha=run.alpha,
        use_rslora=run.use_rslora,
        dropout=run.dropout,
    )
    return ll.init(params, config, key=demo.lora_key(args.seed))


def subset(data: demo.Encoded, n: int | None) -> demo.Encoded:
    """The first ``n`` examples (the split is already shuffled); all with None."""
    return demo.Encoded(data.ids[:n], data.mask[:n], data.labels[:n])


def run_all(args: argparse.Namespace, task: demo.Task) -> list[dict[str, Any]]:
    """Trains every distinct configuration once; one result per planned run."""
    runs = plan(args)
    distinct = list(dict.fromkeys(r.key() for r in runs))
    done: dict[tuple, dict[str, Any]] = {}
    for i, key in enumerate(distinct, 1):
        run = next(r for r in runs if r.key() == key)
        tree = lora_tree(task.params, run, args)
        trained = demo.train(
            task.model,
            tree,
            subset(task.train, run.n_train),
            task.validation,
            lr=args.lr,
            steps=args.steps,
            batch=args.batch,
            eval_every=args.eval_every,
            seed=args.seed,
            desc=f"[{i}/{len(distinct)}] {label(run)}",
        )
        done[key] = {
            "trainable": ll.count(tree)["trainable"],
            "validation_curve": trained.curve,
            "train_loss": demo.final_loss(trained.history),
            "train_seconds": trained.train_seconds,
        }
    n_full = len(task.train.labels)
    return [
        {
            **r._asdict(),
            "n_train": r.n_train or n_full,
            "scale": r.scale,
            **done[r.key()],
            "first_run": next(q for q in runs if q.key() == r.key()) == r,
        }
        for r in runs
    ]


def label(run: Run) -> str:
    """A short name: rank, scaling, dropout and training-set size."""
    scaling = "rsLoRA" if run.use_rslora else "alpha/r"
    size = "full" if run.n_train is None else f"n={run.n_train}"
    return f"r={run.rank} {scaling} s={run.scale:.2f} p={run.dropout:g} {size}"


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Final and best validation accuracy, final and lowest validation loss."""
    curve = result["validation_curve"]
    return {
        "final_acc": curve["accuracy"][-1],
        "best_acc": max(curve["accuracy"]),
        "final_loss": curve["loss"][-1],
        "min_loss": min(curve["loss"]),
    }


def markdown_tables(results: list[dict[str, Any]]) -> tuple[str, str]:
    """The scaling table and the dropout table, in Markdown."""
    scaling = [
        (
            r["rank"], "rsLoRA alpha/sqrt(r)" if r["use_rslora"] else "alpha/r",
            f"{r['alpha']:.2f}", f"{r['scale']:.3f}", f"{r['trainable']:,}",
            f"{s['final_acc']:.3f}", f"{s['best_acc']:.3f}", f"{s['final_loss']:.3f}",
            f"{r['train_loss']:.3f}",
        )
        for r, s in ((r, summary(r)) for r in results if r["study"] == "scaling")
    ]  # fmt: skip
    dropout = [
        (
            f"{r['n_train']:,}", f"{r['dropout']:g}", f"{s['final_acc']:.3f}",
            f"{s['best_acc']:.3f}", f"{s['final_loss']:.3f}", f"{s['min_loss']:.3f}",
            f"{r['train_loss']:.3f}", f"{s['final_loss'] - r['train_loss']:+.3f}",
        )
        for r, s in ((r, summary(r)) for r in results if r["study"] == "dropout")
    ]  # fmt: skip
    scaling_columns = (
        "rank", "scaling", "alpha", "scale s", "trainable", "val acc (final)",
        "val acc (best)", "val loss (final)", "train loss",
    )  # fmt: skip
    dropout_columns = (
        "training set", "dropout", "val acc (final)", "val acc (best)", "val loss (final)",
        "val loss (min)", "train loss", "gap (val - train loss)",
    )  # fmt: skip
    return (
        runner.table(scaling_columns, "rlrrrrrrr", scaling),
        runner.table(dropout_columns, "rrrrrrrr", dropout),
    )


def plot(results: dict[str, Any], path: str) -> None:
    """Validation curves: scaling (accuracy, loss), dropout on the small and full sets (loss)."""
    runs = results["runs"]
    with runner.figure(path, 2, 2, size=(11, 8), dpi=110) as (fig, axes):
        scaling = [r for r in runs if r["study"] == "scaling"]
        colors = {rank: f"C{i}" for i, rank in enumerate(sorted({r["rank"] for r in scaling}))}
        for r in scaling:
            name = "rsLoRA" if r["use_rslora"] else "alpha/r"
            style = dict(
                color=colors[r["rank"]],
                ls="--" if r["use_rslora"] else "-",
                label=f"r={r['rank']} {name} s={r['scale']:.2f}",
            )
            curve = r["validation_curve"]
            axes[0, 0].plot(curve["step"], curve["accuracy"], **style)
            axes[0, 1].plot(curve["step"], curve["loss"], **style)
        axes[0, 0].set(title="alpha/r vs rsLoRA: validation accuracy", ylabel="accuracy")
        axes[0, 1].set(title="alpha/r vs rsLoRA: validation loss", ylabel="loss")
        dropout = [r for r in runs if r["study"] == "dropout"]
        sizes = sorted({r["n_train"] for r in dropout})
        for ax, n in zip(axes[1], sizes):
            for i, r in enumerate(r for r in dropout if r["n_train"] == n):
                curve = r["validation_curve"]
                ax.plot(
                    curve["step"], curve["loss"], color=f"C{i}", label=f"dropout {r['dropout']:g}"
                )
            ax.set(title=f"dropout, {n:,} training snippets: validation loss", ylabel="loss")
        for ax in axes.flat:
            ax.set(xlabel="step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(results["task"], fontsize=10)


def report(results: dict[str, Any]) -> str:
    """The Markdown report."""
    scaling, dropout = markdown_tables(results["runs"])
    a = results["args"]
    distinct = sum(r["first_run"] for r in results["runs"])
    return "\n\n".join(
        [
            f"# {results['task']}",
            f"LoRA on query and value + a trained head; {a['steps']} AdamW steps of batch "
            f"{a['batch']} at peak learning rate {a['lr']:g} for every run (10% warm-up, cosine "
            f"decay), {a['max_length']} tokens per snippet; {a['n_validation']} validation "
            f"snippets evaluated every {a['eval_every']} steps. {distinct} distinct runs "
            f"(identical configurations run once and are listed in each place).",
            f"## alpha/r vs rsLoRA at one learning rate\n\nalpha/r: alpha = {a['alpha']:g}; "
            f"rsLoRA: alpha = {a['alpha']:g}/sqrt({a['ref_rank']}), so both give "
            f"s = {a['alpha'] / a['ref_rank']:g} at rank {a['ref_rank']}.\n\n{scaling}",
            f"## Dropout on a small and the full training set (rank {a['ref_rank']}, "
            f"alpha/r)\n\nTrain loss: mean training loss (with dropout) over the last "
            f"recorded steps.\n\n{dropout}",
            run_line(results["command"], results["wall_seconds"], results["machine"]),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both studies and writes the results."""
    args = parse_args(argv)
    if not args.smoke:
        demo.check_packages()
    clock = runner.Clock("experiments.alpha_dropout", args.argv)
    with tempfile.TemporaryDirectory(prefix="lorax_alpha_") as tmp:
        task_args = argparse.Namespace(**vars(args), work_dir=pathlib.Path(tmp), n_train=0)
        task_args.rank = args.ref_rank
        task = demo.load_task(task_args)
        runs = run_all(task_args, task)
    stamp = clock.stop()
    results = {
        "task": "all-MiniLM-L6-v2 on Rotten Tomatoes: alpha/r vs rsLoRA, and dropout"
        if not args.smoke
        else "smoke: generated snippets, tiny random BERT",
        "command": stamp.command,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "smoke", "argv")},
        "n_train_full": len(task.train.labels),
        "runs": runs,
        "wall_seconds": stamp.seconds,
        "machine": stamp.machine,
    }
    stem = "alpha_dropout_smoke" if args.smoke else "alpha_dropout"
    runner.publish(args.out, stem, results, report(results), plot, smoke=args.smoke)
    return results


if __name__ == "__main__":
    main()
