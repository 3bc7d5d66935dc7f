"""Where a result came from: the commit, the files that differ from it, the machine's load.

Every experiment records these next to its figures, so a number can be traced to
the code that produced it and read against how busy the machine was.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def git_commit() -> tuple[str | None, list[str] | None]:
    """HEAD's full hash and the tracked files that differ from it; ``(None, None)``
    outside a git checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, [line[3:] for line in status]


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages; None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that runs ``module`` with ``argv`` (None: this process's arguments)."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def begin() -> dict[str, Any]:
    """The record of a run, taken as it starts: the commit and the tracked files that
    differ from it, CPU count, JAX version and backend, and the load averages."""
    import jax  # here, so that git_commit and loadavg work without JAX

    commit, dirty = git_commit()
    return {
        "commit": commit,
        "dirty": dirty,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "loadavg_start": loadavg(),
    }


def end(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (from `begin`) with the load averages at the end of the run."""
    return {**record, "loadavg_end": loadavg()}


def run_line(command: str, seconds: float, record: dict[str, Any]) -> str:
    """The command, commit, wall time and machine load of a run, as one Markdown line.

    Args:
        command: the command line that produced the results.
        seconds: the run's wall time.
        record: what `end` returned.
    """
    commit = (record["commit"] or "unknown")[:12]
    if record["dirty"]:
        commit += f" (with local changes to {', '.join(record['dirty'])})"
    return (
        f"Command: `{command.strip()}` at commit {commit}; total wall time {seconds:.0f} s on "
        f"{record['cpus']} CPU cores; load averages {record['loadavg_start']} at start, "
        f"{record['loadavg_end']} at end."
    )
