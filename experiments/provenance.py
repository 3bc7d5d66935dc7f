"""Where a result came from: the commit, the files that differ from it, the machine's load.

Every experiment records these next to its figures, so a number can be traced to
the code that produced it and read against how busy the machine was.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

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
