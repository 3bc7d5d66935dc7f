"""Sphinx extension: the Results pages, generated from ``experiments/results`` at build time.

Each ``experiments/results/<name>.md`` (and ``<folder>/<stem>.md`` one level down) becomes the
page ``results/generated/<name>``: its title, the hand-written reading of it from
``docs/results/notes/<name>.md`` when there is one, the file itself (headings shifted under the
title) and ``<stem>.png`` beside it when there is one. Nothing in a table is copied by hand:
rerunning an experiment and rebuilding the docs updates its page.
"""

from __future__ import annotations

import pathlib
import re

HEADING = re.compile(r"^(#{1,6}) (.*)$", re.M)


def result_files(results: pathlib.Path) -> dict[str, pathlib.Path]:
    """``{page name: results file}``: ``name.md`` -> ``name``, ``folder/x.md`` -> ``folder``."""
    files = {p.stem: p for p in sorted(results.glob("*.md"))}
    for path in sorted(results.glob("*/*.md")):
        files[path.parent.name] = path
    return files


def page_text(name: str, source: pathlib.Path, repo: pathlib.Path) -> str:
    """The generated page of one results file (``repo``: the repository's root).

    The title is the first heading of the note (``docs/results/notes/<name>.md``), else of the
    results file, else ``name``; the file's headings are shifted to start at level 2.
    """
    text = source.read_text().strip()
    note_path = repo / "docs" / "results" / "notes" / f"{name}.md"
    note = note_path.read_text().strip() if note_path.exists() else ""
    levels = [len(m.group(1)) for m in HEADING.finditer(text)]
    if levels:
        top = min(levels)
        text = HEADING.sub(lambda m: "#" * (len(m.group(1)) - top + 2) + " " + m.group(2), text)
    title_match = HEADING.match(note) or HEADING.search(text)
    title = title_match.group(2).strip() if title_match else name
    if note.startswith("# "):
        note = note[title_match.end() :].strip()
    parts = [f"(results-{name})=", f"# {title}", ""]
    if note:
        parts += [note, ""]
    parts += [text, ""]
    plot = source.with_suffix(".png")
    if plot.exists():
        parts += [f"![{title}](../../../{plot.relative_to(repo).as_posix()})", ""]
    relative = source.relative_to(repo).as_posix()
    parts += [f"*Generated from `{relative}` when these docs were built.*", ""]
    return "\n".join(parts)


def generate(app) -> None:
    repo = pathlib.Path(app.srcdir).parent
    results = repo / "experiments" / "results"
    out_dir = repo / "docs" / "results" / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = result_files(results)
    for stale in out_dir.glob("*.md"):
        if stale.stem not in files:
            stale.unlink()
    for name, source in files.items():
        text = page_text(name, source, repo)
        target = out_dir / f"{name}.md"
        if not target.exists() or target.read_text() != text:  # keep unchanged pages cached
            target.write_text(text)


def setup(app):
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
