"""An experiment's result files: ``STEM.json``, ``STEM.md`` and ``STEM.png`` in one folder."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any


def directory_bytes(path: str | pathlib.Path) -> int:
    """The bytes of every file under ``path`` (an adapter's size on disk)."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def write_outputs(
    out: str | pathlib.Path,
    stem: str,
    results: dict[str, Any],
    markdown: str,
    plot: Callable[[dict[str, Any], str], None] | None = None,
) -> dict[str, str]:
    """Writes the results as JSON, the Markdown report, and the plot if one is given.

    Args:
        out: the folder (created if missing).
        stem: the file names' stem, e.g. ``"demo"``.
        results: the JSON-ready results.
        markdown: the report, written with a final newline.
        plot: ``plot(results, path)`` draws ``STEM.png``; None writes no plot.

    Returns:
        The paths written, keyed by extension (``"json"``, ``"md"``, ``"png"``).
    """
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: str(folder / f"{stem}.{ext}") for ext in ("json", "md", "png")}
    pathlib.Path(paths["json"]).write_text(json.dumps(results, indent=1) + "\n")
    pathlib.Path(paths["md"]).write_text(markdown + "\n")
    if plot is None:
        del paths["png"]
    else:
        plot(results, paths["png"])
    return paths
