"""The experiments' shared runner: flags, provenance, result files, plots and workers.

Each experiment keeps its own part (data, model, training, the report's text) and takes
the rest from here:

- `parser` and `parse`: ``--out`` and ``--smoke`` on every command line; ``--smoke``
  switches to small defaults that flags given explicitly still override, and writes to
  a temporary folder unless ``--out`` says where.
- `Clock`: the command line, wall time and machine record of a run, and its run line
  (`experiments.provenance`).
- `publish`: ``STEM.json``, ``STEM.md`` and ``STEM.png`` (`experiments.outputs`), in a
  folder, or where `stem_path` says for the benchmarks' ``--out`` path stems.
- `table` and `size_text`: the reports' Markdown tables and byte sizes.
- `figure`: a matplotlib figure drawn off-screen and saved.
- `run_worker` and `reply`: one part of an experiment in a fresh process (its own peak
  memory, its own device count), answering with one tagged JSON line on stdout;
  `main_in_parts` runs an experiment whose every row is such a part.
- `peak_rss_bytes`: this process's peak resident memory.

Example:
    >>> p = parser(__doc__)
    >>> _ = p.add_argument("--steps", type=int, default=100)
    >>> parse(p, ["--smoke"], steps=3).steps
    3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from experiments import provenance
from experiments.outputs import write_outputs

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SMOKE_RESULTS = pathlib.Path(tempfile.gettempdir()) / "lorax_lite_smoke"
# Smoke runs test code paths: the tiny models' compile time, not their run time, is what
# the test suite waits for, so their workers compile with XLA's cheap settings.
CHEAP_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
REPLY = "EXPERIMENT-REPLY "  # the prefix of a worker's answer on stdout


def parser(
    doc: str, *, smoke: str = "tiny generated data and model", full_doc: bool = False
) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment has: ``--out`` and ``--smoke``.

    Args:
        doc: the experiment's module docstring.
        smoke: the help of ``--smoke``.
        full_doc: describe the command with the whole docstring (raw text) instead of
            its first line.

    Returns:
        The parser; the experiment adds its own flags.
    """
    if full_doc:
        p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    else:
        p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    p.add_argument(
        "--out", help=f"results folder (default {RESULTS.relative_to(REPO)}; with --smoke, "
        f"{SMOKE_RESULTS})",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help=smoke)
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, **smoke: Any) -> Any:
    """Parses ``argv``; with ``--smoke``, from the ``smoke`` defaults (flags given win).

    Without ``--out``, results go to `RESULTS`, or with ``--smoke`` to `SMOKE_RESULTS`.

    Args:
        p: the experiment's parser (from `parser`).
        argv: the command line after the module (None: this process's).
        **smoke: the defaults of a ``--smoke`` run.

    Returns:
        The parsed flags, ``argv`` among them (the command line that `Clock` records).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.smoke and smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
    if args.out is None:
        args.out = str(SMOKE_RESULTS if args.smoke else RESULTS)
    args.argv = argv
    return args


class Stamp(NamedTuple):
    """Where a run came from: its command line, wall time and machine record."""

    command: str
    seconds: float
    machine: dict[str, Any]

    @property
    def line(self) -> str:
        """The run line of the report (`experiments.provenance.run_line`)."""
        return provenance.run_line(self.command, self.seconds, self.machine)


class Clock:
    """Times a run and records its machine from start to end.

    Args:
        module: the experiment's module.
        argv: its command line (None: this process's).
    """

    def __init__(self, module: str, argv: Sequence[str] | None):
        self.command = provenance.command(module, argv)
        self.start = time.perf_counter()
        self.record = provenance.begin()

    def stop(self) -> Stamp:
        """The command line, the seconds since the start and the machine record."""
        seconds = time.perf_counter() - self.start
        return Stamp(self.command, seconds, provenance.end(self.record))


def publish(
    out: str | pathlib.Path,
    stem: str,
    results: dict[str, Any],
    text: str,
    plot: Callable[[dict[str, Any], str], None] | None = None,
    *,
    smoke: bool = False,
) -> dict[str, str]:
    """Writes ``STEM.json``, ``STEM.md`` and (with ``plot``) ``STEM.png``, and prints ``text``.

    A smoke run (the test suite's) draws its plot only where matplotlib is installed;
    the real run needs it.

    Args:
        out: the folder.
        stem: the file names' stem.
        results: the JSON-ready results.
        text: the Markdown report.
        plot: ``plot(results, path)`` draws the figure; None draws none.
        smoke: whether this is a smoke run.

    Returns:
        The paths written, keyed by extension.
    """
    if smoke and importlib.util.find_spec("matplotlib") is None:
        plot = None
    paths = write_outputs(out, stem, results, text, plot)
    print(text)
    return paths


def table(columns: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the header, its rule, one line a row.

    Args:
        columns: the header's cells.
        align: a letter a column: ``l`` left-aligned, ``r`` right-aligned (numbers);
            columns past its end are left-aligned (``""``: all).
        rows: each row's cells (``str`` of each is shown).

    Example:
        >>> print(table(["name", "n"], "lr", [["a", 1]]))
        | name | n |
        |---|---:|
        | a | 1 |
    """
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(columns), "l"))
    return "\n".join([line(columns), rule, *(line(r) for r in rows)])


def size_text(n: float) -> str:
    """Bytes as KiB below a MiB, else MiB: ``"12 KiB"``, ``"1.5 MiB"``."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def stem_path(path: str | pathlib.Path) -> tuple[str, str]:
    """``(folder, stem)`` of a benchmark's ``--out``, a path without extension
    (``experiments/results/bench_cpu`` for ``bench_cpu.json``, ``.md`` and ``.png``)."""
    folder, stem = os.path.split(os.path.abspath(path))
    return folder, stem


@contextlib.contextmanager
def figure(
    path: str, *shape: int, size: tuple[float, float], dpi: int = 120, **subplots: Any
) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of ``plt.subplots(*shape)``, drawn off-screen, saved to ``path``.

    Args:
        path: the PNG file.
        *shape: rows and columns of the axes, as ``plt.subplots`` takes them.
        size: the figure's size in inches.
        dpi: the resolution.
        **subplots: more ``plt.subplots`` keywords (``squeeze``).

    Example:
        >>> with figure("loss.png", 1, 2, size=(10, 4)) as (fig, (left, right)):  # doctest: +SKIP
        ...     left.plot([0, 1], [2.0, 1.0])
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*shape, figsize=size, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def reply(result: dict[str, Any]) -> None:
    """A worker's answer to `run_worker`: one tagged JSON line on stdout."""
    print(REPLY + json.dumps(result), flush=True)


def run_worker(
    module: str,
    argv: Sequence[str],
    *,
    cheap: bool = False,
    devices: int | None = None,
) -> dict[str, Any]:
    """Runs ``python -m module argv`` in a fresh process and returns what it `reply`-ed.

    Its other output passes through (stderr as it comes: progress bars, errors).

    Args:
        module: the experiment's module.
        argv: its command line, the worker's own flags included.
        cheap: compile with `CHEAP_XLA_FLAGS` (smoke runs; buffers and results alike).
        devices: run JAX on this many fake CPU devices.

    Returns:
        The worker's answer.

    Raises:
        RuntimeError: naming the command, if the worker fails or does not answer.
    """
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", "")]
    if cheap:
        flags += CHEAP_XLA_FLAGS
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags).strip()
    cmd = [sys.executable, "-m", module, *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=False)
    answers = [line for line in done.stdout.splitlines() if line.startswith(REPLY)]
    other = "".join(line + "\n" for line in done.stdout.splitlines() if not line.startswith(REPLY))
    print(other, end="", flush=True)
    if done.returncode or not answers:
        raise RuntimeError(
            f"the worker `{' '.join(cmd[2:])}` failed (exit {done.returncode}, "
            f"{len(answers)} answers); its errors are printed above"
        )
    return json.loads(answers[-1][len(REPLY) :])


def part_flags(p: argparse.ArgumentParser, flag: str, parts: Sequence[str]) -> None:
    """Adds the hidden flags of `main_in_parts`'s workers to ``p``.

    Args:
        p: the experiment's parser.
        flag: the flag naming one part (``"variant"`` adds ``--variant``).
        parts: the parts it may name.
    """
    p.add_argument(f"--{flag}", choices=parts, help=argparse.SUPPRESS)
    p.add_argument("--reload-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=pathlib.Path, help=argparse.SUPPRESS)


class Parts(NamedTuple):
    """An experiment whose parts each run in their own process (`main_in_parts`).

    Attributes:
        module: the experiment's module, e.g. ``"experiments.demo"``.
        flag: the hidden flag naming a part (added by `part_flags`).
        parts: the parts, run in this order; then the reload check.
        task: what the real run does, in a few words.
        smoke_task: what the smoke run does.
        kept: the flags recorded in the results' ``"args"``.
        run_part: ``run_part(args)``: one part's results, in the worker.
        reload_check: ``reload_check(args)``: in a worker after the parts, whether the
            saved adapter reproduces the trained one (``"same_predictions"``).
        gather: ``gather(parts, check)``: the parts' results under the experiment's
            keys (the runner adds the task, command, flags, check, time and machine).
        report: ``report(results)``: the Markdown.
        plot: ``plot(results, path)``.
        requirements: exits with a clear message when the real run lacks a package.
        mismatch: the error when the reloaded adapter does not reproduce the trained one.
    """

    module: str
    flag: str
    parts: tuple[str, ...]
    task: str
    smoke_task: str
    kept: tuple[str, ...]
    run_part: Callable[[Any], dict[str, Any]]
    reload_check: Callable[[Any], dict[str, Any]]
    gather: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]
    report: Callable[[dict[str, Any]], str]
    plot: Callable[[dict[str, Any], str], None]
    requirements: Callable[[], None]
    mismatch: str


def main_in_parts(experiment: Parts, args: Any) -> dict[str, Any] | None:
    """Runs every part and the reload check in fresh processes, reports, checks the reload.

    With the hidden part flag or ``--reload-check`` (the workers' command line), runs
    that one part and `reply`-es its results instead.

    Args:
        experiment: what the experiment does.
        args: its flags (from `parse`, with `part_flags`).

    Returns:
        The results; None in a worker.

    Raises:
        SystemExit: if the real run lacks a package, or if the reloaded adapter does not
            reproduce the trained predictions.
    """
    part = getattr(args, experiment.flag)
    if part or args.reload_check:
        reply(experiment.run_part(args) if part else experiment.reload_check(args))
        return None
    if not args.smoke:
        experiment.requirements()
    clock = Clock(experiment.module, args.argv)
    name = experiment.module.rsplit(".", 1)[-1]
    with tempfile.TemporaryDirectory(prefix=f"lorax_{name}_") as tmp:
        common = [*args.argv, "--work-dir", tmp]
        run = lambda extra: run_worker(experiment.module, [*common, *extra], cheap=args.smoke)
        parts = [run([f"--{experiment.flag}", p]) for p in experiment.parts]
        check = run(["--reload-check"])
    stamp = clock.stop()
    results = {
        "task": experiment.smoke_task if args.smoke else experiment.task,
        "command": stamp.command,
        "args": {k: v for k, v in vars(args).items() if k in experiment.kept},
        **experiment.gather(parts, check),
        "reload_check": check,
        "wall_seconds": stamp.seconds,
        "machine": stamp.machine,
    }
    stem = f"{name}_smoke" if args.smoke else name
    publish(args.out, stem, results, experiment.report(results), experiment.plot, smoke=args.smoke)
    if not check["same_predictions"]:
        raise SystemExit(experiment.mismatch)
    return results


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
