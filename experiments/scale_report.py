"""The table and plot of `experiments.scale`: bytes per device against devices, per variant."""

from __future__ import annotations

from typing import Any

from experiments import runner

GB = 1e9


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:,.2f}"


def largest_cell(row: dict[str, Any], budget: str, max_batch: int) -> str:
    """``batch (peak / next batch's peak)`` of a searched row; ``-`` where not searched."""
    found = row["largest"].get(budget)
    if found is None:
        return "-"
    batch = f">= {found['batch']}" if found["batch"] == max_batch else str(found["batch"])
    return f"{batch} ({gb(found['peak'])} / {gb(found['next_peak'])})"


COLUMNS = [
    "model", "variant", "remat", "devices", "arguments", "outputs", "temporaries", "peak",
    "GFLOP/token (XLA raw)", "compile s",
]  # fmt: skip
MEASURED_COLUMNS = [
    "variant", "devices", "predicted peak (all devices)", "of which arguments",
    "measured peak RSS - start", "RSS with the state built - start", "measured / predicted",
]  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report."""
    a = results["args"]
    budgets = [str(b) for b in a["budgets_gb"]]
    columns = COLUMNS + [f"largest batch, {b} GB" for b in budgets]
    rows = []
    for r in results["rows"]:
        c = r["batch1"]
        flops = f"{c['flops_per_token'] / 1e9:,.1f} ({c['xla_flops_per_token'] / 1e9:,.2f})"
        rows.append(
            [r["model"], r["variant"], "on" if r["remat"] else "off", r["devices"],
             gb(c["arguments"]), gb(c["outputs"]), gb(c["temporaries"]), gb(c["peak"]), flops,
             f"{c['compile_s']:.1f}", *(largest_cell(r, b, a["max_batch"]) for b in budgets)]
        )  # fmt: skip
    lines = [
        "# Scale on paper: fine-tuning a Llama per device, from the compiler",
        "",
        f'`ll.sharded_train_step(..., base_sharding="fsdp")` with AdamW, sequence {a["seq"]}, '
        f"full logits; LoRA rank {a['rank']} on the seven projections; QLoRA: the same over an "
        f"NF4 base (block {a['quant_block']}); full: float32 master weights. bf16 compute. "
        "Abstract weights, compiled for fake CPU devices; bytes per device in GB (1e9), from "
        "XLA's buffer assignment at batch 1 per device: peak = arguments + outputs - aliased + "
        "temporaries. FLOPs per token per device: XLA's count (one scanned layer) plus the "
        "other layers by formula. Largest batch per device within each budget: `batch (its "
        "peak / the next batch's peak)`, both compiled; `-` where not searched.",
        "",
        runner.table(columns, "", rows),
    ]
    if results["measured"]:
        lines += [
            "",
            f"## The method against reality: {a['rss_model']}, a real step "
            f"({a['rss_batch']} x {a['rss_seq']} tokens per device, remat off)",
            "",
            "Fake devices share the host's memory, so the prediction is the per-device peak "
            "times the devices. Measured: peak RSS of the process minus its RSS once JAX had "
            "started (`ru_maxrss`; it also holds the compilers' memory and the freshly "
            "initialized weights before they are placed).",
            "",
            runner.table(MEASURED_COLUMNS, "", [
                [m["variant"], m["devices"], gb(m["predicted"]), gb(m["predicted_arguments"]),
                 gb(m["step_rss"]), gb(m["state_rss"] - m["start_rss"]),
                 f"{m['step_rss'] / m['predicted']:.2f}"]
                for m in results["measured"]
            ]),
        ]  # fmt: skip
    lines += ["", results["run_line"]]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Peak bytes per device against devices, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    size = (5 * len(models), 4)
    with runner.figure(path, 1, len(models), size=size, dpi=110, squeeze=False) as (fig, axes):
        for ax, model in zip(axes[0], models):
            rows = [r for r in results["rows"] if r["model"] == model]
            for variant in dict.fromkeys(r["variant"] for r in rows):
                for remat in sorted({r["remat"] for r in rows}):
                    sel = sorted(
                        (r for r in rows if r["variant"] == variant and r["remat"] == remat),
                        key=lambda r: r["devices"],
                    )
                    ax.plot(
                        [r["devices"] for r in sel],
                        [r["batch1"]["peak"] / GB for r in sel],
                        marker="o",
                        linestyle="-" if remat else "--",
                        label=f"{variant}, remat {'on' if remat else 'off'}",
                    )
            for budget in results["args"]["budgets_gb"]:
                ax.axhline(budget, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("devices (FSDP base)")
            ax.set_ylabel("peak GB per device, batch 1 per device")
            ax.set_title(model)
            ax.legend(fontsize=7)
        fig.suptitle(f"Compiled peak per device, sequence {results['args']['seq']}")
