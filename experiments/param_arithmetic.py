"""Parameter arithmetic of LoRA on the GPT-2 sizes (shapes only, nothing allocated).

For GPT-2 small, medium, large and XL (tied head, as released) and for the targets
``("c_attn", "c_proj")`` at rank 4 and ``"all-linear"`` at ranks 4 to 64, counts the
trainable and total parameters and bytes with ``ll.count`` on an ``ll.init``'ed
tree. The model's parameters come from ``jax.eval_shape(model.init)`` and ``ll.init``
runs inside ``jax.eval_shape`` too, so no weight is ever allocated. ``"c_proj"``
matches both the attention and the MLP output projections, as PEFT's
``target_modules=["c_attn", "c_proj"]`` does on GPT-2.

Example:
    python -m experiments.param_arithmetic            # table + JSON/Markdown/PNG
    python -m experiments.param_arithmetic --smoke    # tiny and small, two ranks
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

import lorax_lite as ll
from experiments import runner
from experiments.models.gpt import GPT, make_config
from experiments.provenance import command, git_commit

SIZES = ("small", "medium", "large", "xl")
RANKS = (4, 8, 16, 32, 64)
ATTENTION_TARGETS = ("c_attn", "c_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated GPT presets")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="all-linear ranks")
    p.add_argument("--out", default="experiments/results/param_arithmetic", help="path stem")
    p.add_argument("--smoke", action="store_true", help="tiny and small, ranks 4 and 8")
    return runner.parse(p, argv, sizes="tiny,small", ranks="4,8")


def abstract_lora_tree(size: str, targets: Any, rank: int) -> Any:
    """``ll.init`` of a GPT-2 preset, evaluated abstractly: leaves are shape structs."""
    model = GPT(make_config(size, tie_head=True))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    config = ll.LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
    init = lambda p: ll.init(p, config, key=jax.random.key(0), fn=model.apply, args=(tokens,))
    return jax.eval_shape(init, params)


def single_layer_example(d: int = 768, rank: int = 4) -> dict[str, int]:
    """One ``d x d`` Dense kernel at ``rank``, counted by the library."""
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)}}
    config = ll.LoraConfig(rank=rank, targets="dense")
    tree = jax.eval_shape(lambda p: ll.init(p, config, key=jax.random.key(0)), params)
    counts = ll.count(tree)
    dense = counts["total"] - counts["trainable"]
    return dict(
        d=d, rank=rank, adapter=counts["trainable"], dense=dense, ratio=dense / counts["trainable"]
    )


def row(size: str, label: str, targets: Any, rank: int) -> dict[str, Any]:
    """Counts of one (model size, targets, rank) setting."""
    counts = ll.count(abstract_lora_tree(size, targets, rank))
    base, base_bytes = counts["total"] - counts["trainable"], counts["total_bytes"]
    base_bytes -= counts["trainable_bytes"]
    return dict(
        size=size,
        targets=label,
        rank=rank,
        base_params=base,
        trainable=counts["trainable"],
        total=counts["total"],
        percent=100.0 * counts["trainable"] / counts["total"],
        adapter_bytes=counts["trainable_bytes"],
        model_bytes=base_bytes,
        model_over_adapter=base_bytes / counts["trainable_bytes"],
    )


def markdown(rows: list[dict[str, Any]], example: dict[str, int], command: str) -> str:
    """The table, the single-layer example and the command, in Markdown."""
    lines = [
        "## LoRA parameter arithmetic on GPT-2 (tied head; shapes only)",
        "",
        f"`{command}`",
        "",
        "| model | base params | targets | rank | trainable | trainable % | adapter (f32) "
        "| model (f32) | model / adapter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| GPT-2 {r['size']} | {r['base_params']:,} | {r['targets']} | {r['rank']} "
            f"| {r['trainable']:,} | {r['percent']:.3f}% | {_mib(r['adapter_bytes'])} "
            f"| {_mib(r['model_bytes'])} | {r['model_over_adapter']:,.0f}x |"
        )
    lines += [
        "",
        f"One {example['d']}x{example['d']} layer at rank {example['rank']}: "
        f"{example['adapter']:,} adapter parameters vs {example['dense']:,} dense "
        f"({example['ratio']:.0f}x fewer).",
        "",
        "trainable % is of all parameters including the adapters (as `ll.summary` and PEFT).",
    ]
    return "\n".join(lines) + "\n"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def plot(results: dict[str, Any], path: str) -> None:
    """Trainable parameters against rank, one line per model size, log scales."""
    rows = results["rows"]
    with runner.figure(path, size=(6, 4)) as (_, ax):
        for size in dict.fromkeys(r["size"] for r in rows):
            mine = [r for r in rows if r["size"] == size and r["targets"] == "all-linear"]
            line = ax.plot([r["rank"] for r in mine], [r["trainable"] for r in mine], "o-")
            attention = [r for r in rows if r["size"] == size and r["targets"] != "all-linear"]
            ax.plot(
                [r["rank"] for r in attention],
                [r["trainable"] for r in attention],
                "x",
                color=line[0].get_color(),
                markersize=9,
            )
            line[0].set_label(f"GPT-2 {size} ({mine[0]['base_params'] / 1e6:,.0f}M)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_ylabel("trainable parameters")
        ax.set_title("LoRA all-linear (o) and c_attn+c_proj (x)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Counts every setting, prints the table, writes JSON, Markdown and PNG."""
    args = parse_args(argv)
    sizes, ranks = args.sizes.split(","), [int(r) for r in args.ranks.split(",")]
    settings = [(s, "c_attn+c_proj", ATTENTION_TARGETS, 4) for s in sizes]
    settings += [(s, "all-linear", "all-linear", r) for s in sizes for r in ranks]
    rows = [row(*setting) for setting in tqdm(settings, desc="param arithmetic")]
    rows.sort(key=lambda r: (sizes.index(r["size"]), r["targets"] != "c_attn+c_proj", r["rank"]))
    example = single_layer_example()
    line = command("experiments.param_arithmetic", argv)
    commit, _ = git_commit()
    results = dict(
        command=line, commit=commit, jax=jax.__version__, rows=rows, single_layer=example
    )
    text = markdown(rows, example, line).rstrip("\n")
    runner.publish(*runner.stem_path(args.out), results, text, plot)
    return rows


if __name__ == "__main__":
    main()
