"""experiments/bench/gemm.py: one interleaved round, where torch is installed."""

import pytest

from experiments.bench import gemm


def test_one_round_times_every_shape_in_both_libraries(tmp_path):
    pytest.importorskip("torch")
    assert gemm.main(["--repeats", "1", "--out", str(tmp_path / "gemm")]) == 0
    text = (tmp_path / "gemm.md").read_text()
    for name, (m, k, n) in gemm.SHAPES.items():
        assert f"| {name} ({m} x {k} x {n}) |" in text
    rows = gemm.measure(1)
    assert set(rows) == set(gemm.SHAPES)
    assert all(row["xla_gflops"] > 0 and row["torch_gflops"] > 0 for row in rows.values())
