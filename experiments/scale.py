"""Scale on paper: LoRA and QLoRA of Llama-3.1 8B and 70B per device, from the compiler.

Nothing is allocated: the weights are ``jax.eval_shape`` shapes, and each training step is
``ll.sharded_train_step(..., base_sharding="fsdp")`` lowered with abstract arguments on a
mesh of fake CPU devices (``--xla_force_host_platform_device_count``, one subprocess per
mesh size, since the flag must be set before JAX starts) and compiled. Per compiled step:

  bytes      XLA's buffer assignment per device (`workers.compiled_sizes`): arguments,
             outputs, aliased (donated), temporaries and their sum, the peak.
  FLOPs      ``cost_analysis()["flops"]`` per token of one device. XLA counts a ``while``
             body once, and the Llama scans its layers, so the raw count holds one layer;
             ``flops_per_token`` adds the other ``n_layer - 1`` layers by formula.
  compile    seconds to lower and compile.
  batch      the largest batch per device whose peak fits each budget, found by compiling
             both sides of the boundary (`memory.largest_batch`).

Variants: ``full`` (every weight trained, float32 master weights, AdamW), ``lora`` (rank
``--rank`` on the seven projections of every layer, bf16 base) and ``qlora`` (the same over
an NF4 base). Compute is bf16 everywhere; the loss takes full logits over every position.
SmolLM2-135M is the anchor: its real step's peak RSS on 1 and 8 fake devices is measured
against the compiled prediction (``--rss-*``).

Example:
    python -m experiments.scale                        # make scale
    python -m experiments.scale --smoke --out /tmp/scale   # tests: tiny model, 1 and 2 devices
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from experiments import runner

VARIANTS = ("full", "lora", "qlora")
MODELS = ("smollm2-135m", "llama-3.1-8b", "llama-3.1-70b")
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__, smoke="tiny model, 1 and 2 devices", full_doc=True)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--devices", default="1,8,64,256", help="mesh sizes (fake CPU devices)")
    p.add_argument("--remat", default="off,on", help="remat settings: off, on")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quant-block", type=int, default=64, help="NF4 block size")
    p.add_argument("--budgets-gb", default="80,16", help="device memories (1e9 bytes)")
    p.add_argument(
        "--search",
        default="llama-3.1-8b,llama-3.1-70b@1,8@on@full,lora,qlora",
        help="models@devices@remat@variants whose largest batch is searched (the rest: batch "
        "1 only)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="per device; the search stops here")
    p.add_argument("--rss-model", default="smollm2-135m")
    p.add_argument("--rss-devices", default="1,8")
    p.add_argument(
        "--anchor",
        default="smollm2-135m@1,8",
        help="model@devices: compile this model on these meshes only (it anchors the RSS check)",
    )
    p.add_argument("--rss-variants", default="lora,qlora")
    p.add_argument("--rss-seq", type=int, default=128)
    p.add_argument("--rss-batch", type=int, default=1, help="per device")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = runner.parse(
        p, argv, models="tiny", devices="1,2", search="tiny@2@on@lora", seq=32, rank=2,
        quant_block=32, max_batch=8, budgets_gb="0.001", remat="on", rss_model="tiny",
        anchor="@", rss_devices="2", rss_variants="lora", rss_seq=16,
    )  # fmt: skip
    split = lambda s: tuple(x for x in s.split(",") if x)
    args.models, args.variants = split(args.models), split(args.variants)
    args.rss_variants = split(args.rss_variants)
    unknown = sorted(set(args.variants + args.rss_variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.devices = tuple(int(n) for n in split(args.devices))
    args.rss_devices = tuple(int(n) for n in split(args.rss_devices))
    args.remat = tuple(r == "on" for r in split(args.remat))
    args.budgets_gb = tuple(float(b) for b in split(args.budgets_gb))
    anchor, devices = args.anchor.split("@")
    args.anchor = dict(model=anchor, devices=[int(n) for n in split(devices)])
    models, devices, remat, variants = (args.search.split("@") + ["", "", "", ""])[:4]
    args.search = dict(
        models=split(models),
        devices=[int(n) for n in split(devices)],
        remat=split(remat),
        variants=split(variants),
    )
    return args


# ----- one process per mesh size ---------------------------------------------------------


def run_child(flag: str, value: str, devices: int, argv: list[str]) -> Any:
    """``python -m experiments.scale ARGV FLAG VALUE`` on ``devices`` fake CPU devices; its
    answer.

    Buffer assignment is decided on HLO, before LLVM: the cheap XLA flags leave every
    byte count as it is (checked on Llama-3.1-8B LoRA, 8 devices) and cut compile time
    by a third, so the compiling workers (never run) take them.
    """
    cheap = flag == "--worker"
    return runner.run_worker(
        "experiments.scale", [*argv, flag, value], cheap=cheap, devices=devices
    )


def main(argv: list[str] | None = None) -> int:
    """Compiles every model, variant and mesh in workers, writes the results."""
    args = parse_args(argv)
    argv = args.argv
    if args.worker is not None or args.rss_worker is not None:
        from experiments import scale_worker

        result = (
            scale_worker.compile_grid(args)
            if args.worker is not None
            else scale_worker.measure_rss(args, args.rss_worker)
        )
        runner.reply(result)
        return 0
    from experiments import scale_report

    clock = runner.Clock("experiments.scale", argv)
    rows = []
    for n in args.devices:
        tick = time.perf_counter()
        rows += run_child("--worker", str(n), n, argv)
        print(f"{n:4d} devices: {time.perf_counter() - tick:.0f} s", flush=True)
    measured = []
    for n in args.rss_devices:
        for variant in args.rss_variants:
            measured.append(run_child("--rss-worker", f"{variant}:{n}", n, argv))
            m = measured[-1]
            print(
                f"RSS {variant} on {n}: {m['step_rss'] / GB:.2f} GB measured, "
                f"{m['predicted'] / GB:.2f} GB predicted",
                flush=True,
            )
    stamp = clock.stop()
    results = dict(
        args={k: v for k, v in vars(args).items() if k not in ("worker", "rss_worker", "argv")},
        rows=rows,
        measured=measured,
        record=stamp.machine,
        run_line=stamp.line,
    )
    text = scale_report.markdown(results)
    runner.publish(args.out, "scale", results, text, scale_report.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
