"""experiments/scale.py: its smoke run (a tiny Llama compiled for 1 and 2 fake devices)."""

import json

from experiments import scale


def test_smoke_run_compiles_every_cell_and_finds_the_batch_boundary(tmp_path):
    out = tmp_path / "out"
    assert scale.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "scale.json").read_text())
    rows = {(r["variant"], r["devices"]): r for r in results["rows"]}
    assert set(rows) == {(v, n) for v in scale.VARIANTS for n in (1, 2)}
    peak = {key: r["batch1"]["peak"] for key, r in rows.items()}
    arguments = {key: r["batch1"]["arguments"] for key, r in rows.items()}
    # LoRA trains and keeps optimizer state for the adapters only; NF4 stores less than bf16.
    assert peak[("lora", 2)] < peak[("full", 2)]
    assert arguments[("qlora", 2)] < arguments[("lora", 2)]
    # FSDP: each device holds half the frozen base on 2 devices; full fine-tuning's trained
    # weights and AdamW state are replicated (sharded_train_step replicates what trains).
    for variant in ("lora", "qlora"):
        assert arguments[(variant, 2)] < arguments[(variant, 1)]
        assert peak[(variant, 2)] < peak[(variant, 1)]
    assert arguments[("full", 2)] == arguments[("full", 1)]
    for r in rows.values():
        c = r["batch1"]
        assert c["peak"] == c["arguments"] + c["outputs"] - c["aliased"] + c["temporaries"]
        # XLA counts the scanned layer once; the formula adds the other layer back.
        assert c["flops_per_token"] > c["xla_flops_per_token"] > 0
    found = rows[("lora", 2)]["largest"]["0.001"]
    assert 1 <= found["batch"] < results["args"]["max_batch"]
    assert found["peak"] <= 0.001e9 < found["next_peak"]
    (measured,) = results["measured"]
    assert measured["devices"] == 2 and measured["step_rss"] > measured["predicted"] > 0
    assert all(loss > 0 for loss in measured["losses"])
    assert (out / "scale.md").read_text().count("| tiny |") == len(rows)
    assert (out / "scale.png").stat().st_size > 0
