"""What the experiments' smoke tests check of the files a run publishes."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any


def check_published(
    folder: pathlib.Path, stem: str, results: dict[str, Any], key: str, *phrases: str
) -> None:
    """Asserts that ``STEM.json`` holds ``results[key]``, that ``STEM.md`` says every
    phrase, and that ``STEM.png`` was drawn exactly where matplotlib is installed."""
    saved = json.loads((folder / f"{stem}.json").read_text())
    assert saved[key] == json.loads(json.dumps(results[key]))
    text = (folder / f"{stem}.md").read_text()
    for phrase in phrases:
        assert phrase in text, phrase
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (folder / f"{stem}.png").exists() == has_matplotlib
