"""Benchmark workers: one process per variant, driven over a line protocol, timed in turns.

A worker builds its variant (a `Runner`), runs the first step and the warm-up, reports
``status`` with its facts, then answers ``run N`` with N synchronized step times and
``stop`` with its peak memory. The parent keeps several workers alive and lets them take
turns, so that load from other programs hits every variant alike; ratios are then taken
within each round (`paired_ratios`). Used by ``train_step.py`` and ``peers.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from experiments.runner import REPO, peak_rss_bytes

PROTOCOL = "@@"  # prefix of the worker's protocol lines on stdout
PEERS = ("torch", "transformers", "peft", "qwix")  # versions recorded when installed


class Runner(NamedTuple):
    """A compiled step: ``step(state) -> (state, loss)``, its first state, and facts."""

    step: Callable[[Any], tuple[Any, Any]]
    state: Any
    info: dict[str, Any]
    sync: Callable[[Any], Any]


def emit(**message: Any) -> None:
    """Sends one protocol message to the parent."""
    print(PROTOCOL + json.dumps(message), flush=True)


def timed_steps(runner: Runner, state: Any, n: int) -> tuple[Any, Any, list[float], list[float]]:
    """Runs ``n`` synchronized steps; their wall-clock and process CPU times."""
    walls, cpus, loss = [], [], None
    for _ in range(n):
        wall, cpu = time.perf_counter(), time.process_time()
        state, loss = runner.step(state)
        runner.sync((state, loss))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return state, loss, walls, cpus


def peak_memory(torch_row: bool) -> tuple[int, str]:
    """Peak bytes of this process: the accelerator allocator's peak, else peak RSS."""
    if torch_row:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    elif "jax" in sys.modules:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "peak_bytes_in_use"
    return peak_rss_bytes(), "peak RSS"


def compiled_sizes(compiled: Any) -> dict[str, int]:
    """XLA's buffer sizes of a compiled function (``jit(f).lower(...).compile()``); ``peak`` =
    arguments + outputs - aliased + temporaries (every buffer live at once: an upper bound)."""
    analysis = compiled.memory_analysis()
    sizes = dict(
        arguments=int(analysis.argument_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
    )
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return sizes


def machine_facts() -> dict[str, Any]:
    """Backend, device, versions and host of this process (imports JAX and starts its backend)."""
    from importlib import metadata

    import flax
    import jax
    import jaxlib
    import optax

    import lorax_lite

    device = jax.devices()[0]
    facts = dict(
        backend=jax.default_backend(),
        device=device.device_kind,
        n_devices=jax.device_count(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        optax=optax.__version__,
        lorax_lite=lorax_lite.__version__,
    )
    for package in PEERS:
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = None
    facts.update(
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
    )
    return facts


def serve(
    build: Callable[[], Runner],
    *,
    warmup: int,
    check: Callable[[float, dict[str, Any]], None] = lambda loss, info: None,
    torch_row: bool = False,
    finish: Callable[[Any], dict[str, Any]] = lambda state: {},
) -> int:
    """The worker's side of the protocol, on stdin/stdout.

    Args:
        build: makes the `Runner` (an ImportError reports the variant ``skipped``).
        warmup: untimed steps after the first.
        check: ``check(first_loss, info)`` raises if the first step computed something
            else than it should (the variant then reports ``failed``).
        torch_row: whether the variant runs in torch (for `peak_memory`).
        finish: ``finish(state)`` adds facts to the ``stop`` reply (after the timed steps).

    Returns:
        The process's exit status.
    """
    try:
        runner = build()
        state, loss, first, _ = timed_steps(runner, runner.state, 1)
        loss_start = float(loss)
        check(loss_start, runner.info)
        state, loss, _, _ = timed_steps(runner, state, warmup)
    except ImportError as error:
        emit(status="skipped", reason=f"{type(error).__name__}: {error}")
        return 0
    except Exception:
        emit(status="failed", reason=traceback.format_exc(limit=4))
        return 1
    compile_s = runner.info.get("compile_s") or 0.0
    emit(
        status="ok",
        **runner.info,
        first_step_s=compile_s + first[0],
        loss_start=loss_start,
        rss_built=peak_rss_bytes(),
        machine=machine_facts(),
    )
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "run":
            state, loss, walls, cpus = timed_steps(runner, state, int(rest[0]))
            emit(times=walls, cpu_times=cpus)
        elif command == "stop":
            peak, source = peak_memory(torch_row)
            try:
                extra = finish(state)
            except Exception:
                extra = dict(finish_failed=traceback.format_exc(limit=4))
            emit(peak_bytes=peak, memory_source=source, rss_peak=peak_rss_bytes(),
                 loss_end=float(loss), **extra)  # fmt: skip
            return 0
    return 0


# ----- the parent ---------------------------------------------------------------------


class Worker(NamedTuple):
    """A running worker process and the file collecting its stderr."""

    variant: str
    proc: subprocess.Popen
    stderr: Any


def start(variant: str, argv: Sequence[str], env: dict[str, str]) -> Worker:
    """Starts the worker ``argv`` (from the repository root) for ``variant``."""
    stderr = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=REPO,
        env=env,
    )
    return Worker(variant, proc, stderr)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment with the repository on ``PYTHONPATH``, plus ``extra``."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path) | extra


def read(worker: Worker) -> dict[str, Any]:
    """The worker's next protocol message; a ``failed`` one if it died."""
    for line in worker.proc.stdout:
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL) :])
    worker.proc.wait()
    worker.stderr.seek(0)
    tail = worker.stderr.read()[-2000:]
    return dict(status="failed", reason=f"worker exited {worker.proc.returncode}: {tail}")


def request(worker: Worker, command: str) -> dict[str, Any]:
    """Sends ``command`` and returns the reply."""
    try:
        worker.proc.stdin.write(command + "\n")
        worker.proc.stdin.flush()
    except BrokenPipeError:
        pass
    return read(worker)


def paired_ratios(
    rows: dict[str, dict[str, Any]], reference: str, key: str = "repeat_medians_s"
) -> dict[str, dict[str, Any]]:
    """``step time of X / step time of reference``, per repeat; median and range.

    ``key`` picks the per-repeat medians: wall clock (default) or ``cpu_repeat_medians_s``.
    """
    ref = rows.get(reference, {}).get(key)
    out = {}
    for variant, row in rows.items():
        mine = row.get(key)
        if variant == reference or not ref or not mine or len(mine) != len(ref):
            continue
        per_repeat = [m / r for m, r in zip(mine, ref)]
        out[f"{variant}/{reference}"] = dict(
            median=statistics.median(per_repeat), min=min(per_repeat), max=max(per_repeat),
            per_repeat=per_repeat,
        )  # fmt: skip
    return out


def failure_line(reason: str) -> str:
    """The last line of a worker's traceback that says something (not JAX's filter note)."""
    lines = [line for line in reason.strip().splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("For simplicity, JAX", "-----"))]
    return (said or lines or ["no reason given"])[-1]
