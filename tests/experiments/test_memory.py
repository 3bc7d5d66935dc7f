"""experiments/memory.py: its smoke run on a tiny GGUF file, and the batch search."""

import json

import pytest
from test_llama import write_tiny_gguf

from experiments import memory


def test_largest_batch_finds_the_boundary():
    asked = []

    def peak(b):  # affine, then a jump the line through batches 1 and 2 cannot foresee
        asked.append(b)
        return 100 + 10 * b + (800 if b > 30 else 0)

    assert memory.largest_batch(peak, 1000, 512) == 30
    assert {30, 31} <= set(asked) and len(set(asked)) < 12  # both sides, bisected
    assert memory.largest_batch(lambda b: 10 * b, 1000, 64) == 64
    assert memory.largest_batch(lambda b: 10 * b, 5, 64) == 0
    assert memory.largest_batch(lambda b: 10 * b, 10, 64) == 1


def test_smoke_run_writes_consistent_results(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "out"
    assert memory.main(["--smoke", "--gguf", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "memory.json").read_text())
    rows = {(r["variant"], r["remat"]): r for r in results["compiled"]}
    assert set(rows) == {(v, remat) for v in memory.VARIANTS for remat in (False,)}
    assert all(r["largest_batch"] == 2 for r in rows.values())  # the tiny model fits --max-batch
    full, lora = rows[("full", False)]["bytes"], rows[("lora", False)]["bytes"]
    # Full fine-tuning trains every parameter; AdamW keeps two moments per trained value.
    assert full["base"] == 0 and full["gradients"] == full["trainable"]
    assert full["optimizer"] >= 2 * full["trainable"]
    assert lora["trainable"] < full["trainable"] and lora["base"] > 0
    # The stored base shrinks with its storage: bf16 half of float32, 4-bit blocks less.
    base = {v: rows[(v, False)]["bytes"]["base"] for v in memory.VARIANTS[1:]}
    assert base["lora-bf16"] < base["lora"] and base["qlora-nf4"] < base["lora-bf16"]
    for row in results["compiled"]:
        assert row["largest_batch_peak"] <= 8 * 2**30
        peaks = [row["compiled"][b]["peak"] for b in ("1", "2")]
        assert peaks[0] < peaks[1]  # the activations grow with the batch
    measured = {m["variant"]: m for m in results["measured"]}
    assert set(measured) == set(memory.VARIANTS)
    for m in measured.values():
        assert m["rss_peak"] >= m["rss_loaded"] > 0 and all(x > 0 for x in m["losses"])
    assert (out / "memory.md").read_text().count("| full |") == 3
    assert (out / "memory.png").stat().st_size > 0
