"""Writes that never lose the previous version: written beside the target, renamed into place.

`replace_file` does it for one file (the command line's merged output).
A directory (an adapter checkpoint) is written to a hidden sibling and swapped in by
`swap_in`: the old one is moved aside, the new one renamed in, and only then is the old
one deleted, so a failure or a kill at any point leaves the old directory or the new
one; `recover` undoes what an interrupted swap left, and `current` finds the directory
in between the two renames. `replace_files` uses the same swap to replace several files
of a directory together (the PEFT export's pair), keeping the directory's other entries.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

# Hidden siblings of a directory ``name`` during a swap: the new directory is written to
# the first, the old one is moved to the second while the new one is renamed in, then to
# the third to be deleted.
NEW, OLD, TRASH = "lorax-lite-new", "lorax-lite-old", "lorax-lite-trash"


def replace_file(path: pathlib.Path, write: Callable[[pathlib.Path], Any]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, syncs it to disk and renames it
    to ``path``, so a failed or killed write leaves the previous file whole (and a failed
    one no temporary file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_files(directory: pathlib.Path, names: tuple[str, ...], write: Callable) -> None:
    """Replaces the files ``names`` of ``directory`` together: ``write`` fills a fresh hidden
    sibling directory, which also gets the directory's other entries (hard links, or copies
    where links fail), and `swap_in` renames it into place. A failure or a kill at any point
    leaves the old files or the new ones, never a mix (`recover` undoes a killed swap)."""
    if os.path.lexists(directory) and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    new = sibling(directory, NEW)
    try:
        if directory.is_dir():
            ours = lambda folder, entries: names if pathlib.Path(folder) == directory else []
            shutil.copytree(directory, new, symlinks=True, ignore=ours, copy_function=_link)
        else:
            new.mkdir()
        write(new)
        for name in names:
            with open(new / name, "rb") as f:
                os.fsync(f.fileno())
        cwd = os.getcwd()
        swap_in(new, directory)
        if pathlib.Path(cwd).is_relative_to(directory):  # it was in the old one, now deleted
            os.chdir(cwd)
    except BaseException:
        recover(directory)
        raise


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links, or a file we may not link
        shutil.copy2(source, target)


def sibling(path: pathlib.Path, role: str) -> pathlib.Path:
    """The hidden sibling of ``path`` for ``role`` (`NEW`, `OLD` or `TRASH`)."""
    return path.with_name(f".{path.name}.{role}")


def swap_in(new: pathlib.Path, path: pathlib.Path) -> None:
    """Renames ``new`` to ``path``, replacing and then deleting what was there."""
    old = sibling(path, OLD)
    replacing = os.path.lexists(path)
    if replacing:
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if replacing:
            os.rename(old, path)
        raise
    if replacing:  # renamed before deleting: a half-deleted directory is never read
        os.rename(old, sibling(path, TRASH))
        remove(sibling(path, TRASH))


def recover(path: pathlib.Path, *, settle: bool = False) -> None:
    """Undoes an interrupted or failed swap into ``path``: puts the old directory back if
    it is aside and nothing replaced it, and removes the other leftovers (a partial new
    directory, temporary directories named after it, an old one already replaced)."""
    old = sibling(path, OLD)
    if os.path.lexists(old) and not os.path.lexists(path):
        os.rename(old, path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}.lorax-lite-"
    for leftover in path.parent.iterdir():
        if leftover.name.startswith(prefix):
            remove(leftover, settle=settle)


def remove(path: pathlib.Path, *, settle: bool = False) -> None:
    """Deletes the file or directory ``path``; with ``settle``, until it stays deleted
    (after a failed write, a writer's threads may still create directories for a moment)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for _ in range(20 if settle else 0):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)
        if not os.path.lexists(path):
            return
    shutil.rmtree(path)


def current(path: pathlib.Path) -> pathlib.Path:
    """Where the directory ``path`` is: ``path``, or the old one set aside by a swap killed
    between its two renames (it is complete then)."""
    old = sibling(path, OLD)
    return old if not os.path.lexists(path) and old.is_dir() else path
