"""The LoRA variants experiment: its configurations and its --smoke run end to end."""

from __future__ import annotations

import json

from experiments import variants


def test_each_variant_differs_from_lora_only_where_it_should():
    args = variants.parse_args([])
    configs = {v: variants.variant_config(v, args) for v in variants.VARIANTS}
    assert {v: c.init for v, c in configs.items()} == {
        "lora": "kaiming", "lora-plus": "kaiming", "pissa": "pissa", "olora": "olora",
        "dora": "kaiming",
    }  # fmt: skip
    assert [v for v, c in configs.items() if c.use_dora] == ["dora"]
    for config in configs.values():
        assert (config.rank, config.alpha, config.targets) == (8, 16.0, ("query", "value"))


def test_smoke_run_keeps_the_model_at_step_zero_and_reports(tmp_path):
    argv = ["--smoke", "--steps", "3", "--variants", "lora", "pissa", "dora"]
    argv += ["--out", str(tmp_path)]
    results = variants.main(argv)
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["lora"]["step0_max_abs_logit_change"] == 0.0  # B starts at zero
    assert 0 < rows["pissa"]["step0_max_abs_logit_change"] < 1e-5  # residual + adapter == W
    assert rows["dora"]["step0_max_abs_logit_change"] < 1e-5  # m = ||W|| at the start
    saved = json.loads((tmp_path / "variants_smoke.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["lora", "pissa", "dora"]
    assert "one seed" in (tmp_path / "variants_smoke.md").read_text().lower()
