"""The matrix products of one SmolLM2-135M step, alone: XLA:CPU against torch, interleaved.

A LoRA step of SmolLM2 is mostly these products (the projections and the tied head); their
speed on a machine bounds what any LoRA library's step can reach there. Each shape's two
products alternate ``--repeats`` times; the table gives the median time and GFLOP/s of each.

Example:
    python -m experiments.bench.gemm                 # experiments/results/gemm_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from experiments import runner

# (rows = batch 4 x 128 tokens, fan-in, fan-out) of SmolLM2-135M's products.
SHAPES = {
    "q_proj, o_proj": (512, 576, 576),
    "gate_proj, up_proj": (512, 576, 1536),
    "down_proj": (512, 1536, 576),
    "tied head": (512, 576, 49152),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="experiments/results/gemm_cpu", help="output path stem")
    return p.parse_args(argv)


def _seconds(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds and GFLOP/s of each shape's product in torch and in XLA."""
    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    product = jax.jit(lambda x, w: x @ w)
    rows = {}
    for name, (m, k, n) in SHAPES.items():
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        jx, jw = jax.numpy.asarray(x), jax.numpy.asarray(w)
        runs = {
            "torch": lambda tx=tx, tw=tw: tx @ tw,
            "xla": lambda jx=jx, jw=jw: product(jx, jw).block_until_ready(),
        }
        for run in runs.values():
            run()  # compile, warm up
        times = {lib: [] for lib in runs}
        for _ in range(repeats):  # interleaved
            for lib, run in runs.items():
                times[lib].append(_seconds(run))
        flops = 2 * m * k * n
        rows[name] = {}
        for lib, seconds in times.items():
            median = statistics.median(seconds)
            rows[name] |= {f"{lib}_s": median, f"{lib}_gflops": flops / median / 1e9}
        rows[name]["xla_over_torch"] = rows[name]["xla_s"] / rows[name]["torch_s"]
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## The GEMMs of one SmolLM2-135M step (512 tokens), float32: XLA:CPU and torch",
        "",
        result["run_line"],
        f"jax {result['jax']}, torch {result['torch']}; median of {result['repeats']} "
        "interleaved runs each.",
        "",
        "| product (m x k x n) | XLA GFLOP/s | torch GFLOP/s | XLA time / torch time |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        m, k, n = SHAPES[name]
        lines.append(
            f"| {name} ({m} x {k} x {n}) | {row['xla_gflops']:.0f} | {row['torch_gflops']:.0f} "
            f"| {row['xla_over_torch']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import jax
    import torch

    args = parse_args(argv)
    clock = runner.Clock("experiments.bench.gemm", argv)
    rows = measure(args.repeats)
    stamp = clock.stop()
    result = dict(stamp.machine, command=stamp.command, jax=jax.__version__,
                  torch=torch.__version__, repeats=args.repeats, rows=rows,
                  run_line=stamp.line)  # fmt: skip
    runner.publish(*runner.stem_path(args.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
