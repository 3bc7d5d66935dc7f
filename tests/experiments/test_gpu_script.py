"""experiments/bench/gpu.py: the one GPU command, rehearsed on the CPU."""

from __future__ import annotations

import json

import pytest

from experiments.bench import gpu


def test_small_rehearsal_runs_and_summarizes(tmp_path):
    assert gpu.main(["--small", "--only", "routing", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["name"] == "routing" and run["status"] == "ok" and run["rc"] == 0
    assert "--smoke" in run["command"] and summary["jax"] and summary["commit"]
    routing = json.loads((tmp_path / "routing.json").read_text())
    # The bench's own result, written there (routed vs solo runs: float32 rounding; exactly
    # 0 on jax 0.12.0, 7e-8 on 0.12.1).
    assert routing["routing_max_abs_diff"] < 1e-5 < routing["adapter_effect_max_abs"]
    table = (tmp_path / "summary.md").read_text()
    assert "| routing | ok |" in table and "--small rehearsal" in table


def test_a_run_past_its_limit_is_killed_and_recorded(tmp_path):
    slow = gpu.Run("slow", "experiments.bench.routing", (), ("--repeats", "10000"), 3)
    args = gpu.parse_args(["--small", "--out-dir", str(tmp_path)])
    result = gpu.run_one(slow, args, tmp_path)
    assert result["status"] == "timed out" and result["rc"] is None
    assert 3 <= result["seconds"] < 30  # killed, workers included, not waited for


def test_unknown_run_names_are_refused(capsys):
    with pytest.raises(SystemExit, match="2"):
        gpu.parse_args(["--only", "small,huge"])
    assert "unknown runs ['huge']" in capsys.readouterr().err


def test_peers_rehearsal_runs_on_random_weights_without_the_gguf_wheel(tmp_path):
    assert gpu.main(["--small", "--only", "peers", "--out-dir", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert run["status"] == "ok" and "--preset tiny" in run["command"]
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert rows["lorax"]["status"] == rows["full"]["status"] == "ok"
    assert rows["full"]["loss_start"] == pytest.approx(rows["lorax"]["loss_start"], rel=1e-5)
    for name in ("qwix", "peft-eager"):  # ok where installed, skipped (not failed) elsewhere
        assert rows[name]["status"] in ("ok", "skipped"), rows[name].get("reason")
    if rows["peft-eager"]["status"] == "ok":  # the same random weights, copied into torch
        assert rows["peft-eager"]["loss_start"] == pytest.approx(
            rows["lorax"]["loss_start"], rel=1e-5
        )
