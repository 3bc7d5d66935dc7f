"""experiments/serve.py (`make serve`), run --smoke through the GPU script's CPU rehearsal
(one run checks both: the serve run the GPU script makes, and serve's own results)."""

from __future__ import annotations

import json

import pytest

from experiments import serve
from experiments.bench import gpu


def test_smoke_serves_mixed_batches_swaps_without_compiling_and_matches_solo_runs(tmp_path):
    assert gpu.main(["--small", "--only", "serve", "--out-dir", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert run["status"] == "ok" and "--smoke" in run["command"]
    results = json.loads((tmp_path / "serve" / "serve.json").read_text())
    rows = results["rows"]
    assert set(rows) == set(serve.ROWS)
    batch = results["args"]["batch"]
    assert [rows[r]["distinct_adapters"] for r in ("route-1", "route-4", "route-16")] == [
        1, 4, min(batch, results["capacity"])
    ]  # fmt: skip
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in rows.values())
    # every sequence of the mixed batch decodes what it decodes alone, merged
    assert results["solo"] == {"sequences": batch, "equal": batch, "all_equal": True}
    swap = results["hot_swap"]
    assert swap["compiles"] == 0 and len(swap["ms"]) == results["args"]["swaps"]
    assert swap["bytes_written"] * (results["capacity"] + 1) == swap["set_bytes"]
    model = results["bytes_model"]
    reference = rows["route-1"]["decode_tokens_per_s"]
    assert model["predicted_tokens_per_s"]["route-1"] == pytest.approx(reference)
    shared = model["base_bytes"] + model["cache_bytes"]
    predicted_16 = reference * (shared + model["adapter_bytes"])
    predicted_16 /= shared + rows["route-16"]["distinct_adapters"] * model["adapter_bytes"]
    assert model["predicted_tokens_per_s"]["route-16"] == pytest.approx(predicted_16)
    # rank-2 random adapters in rank-4 slots: twice their own factor elements
    assert sorted(set(model["padding"]["padded_over_own"].values())) == pytest.approx([1.0, 2.0])
    assert all(
        len(t["losses"]) == results["args"]["train_steps"] for t in results["train"].values()
    )
    text = (tmp_path / "serve" / "serve.md").read_text()
    assert "| route-16 |" in text and "0 XLA compiles" in text and "Command:" in text
