"""experiments/bench/peers.py: the JAX rows' smoke run on a tiny GGUF file (qwix included)."""

import importlib.util
import json

import pytest
from test_llama import write_tiny_gguf

from experiments.bench import peers

QWIX = importlib.util.find_spec("qwix") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("peers")
    write_tiny_gguf(folder / "tiny.gguf")
    out = folder / "out" / "peers"
    argv = ["--smoke", "--gguf", str(folder / "tiny.gguf"), "--out", str(out)]
    assert peers.main(argv) == 0
    return json.loads(out.with_suffix(".json").read_text()), out


def test_every_jax_row_runs_and_starts_from_the_same_weights(smoke):
    result, _ = smoke
    rows = result["rows"]
    assert set(rows) == set(peers.JAX_ROWS)
    for name, row in rows.items():
        if name.startswith(("qwix", "nnx-qwix")) and not QWIX:
            assert row["status"] == "skipped" and "qwix" in row["reason"]
            continue
        assert row["status"] == "ok", (name, row.get("reason"))
        assert row["compiled"]["peak"] > 0 and row["rss_peak"] > 0
        assert name == "lorax" or len(row["ratio"]["per_round"]) == result["args"]["rounds"]
    checks = result["first_loss_checks"]
    expected = {"full vs lorax", "nnx-lorax vs lorax", "nnx-lora vs lorax"}
    if QWIX:
        expected |= {"qwix vs lorax", "nnx-qwix vs lorax", "qwix-bf16 vs lorax-bf16"}
        expected |= {"qwix-nf4 vs lorax-nf4"}
    assert set(checks) == expected
    assert all(check["equal"] for check in checks.values()), checks


def test_quantized_rows_compute_their_dequantized_bases_loss_and_lora_sizes_agree(smoke):
    rows = smoke[0]["rows"]
    for name in ("lorax-nf4", "lorax-int4") + (("qwix-nf4", "qwix-int4") if QWIX else ()):
        row = rows[name]
        assert row["loss_start"] == pytest.approx(row["loss_dequantized"], rel=1e-5), name
    lora_rows = [n for n in peers.JAX_ROWS if n != "full" and rows[n]["status"] == "ok"]
    assert len({rows[n]["n_trainable"] for n in lora_rows}) == 1  # rank 2 on the same weights
    assert rows["full"]["n_trainable"] == rows["full"]["n_total"] > rows["lorax"]["n_trainable"]
    # 4-bit projections (the embedding stays float32 here) and a bf16 base store less.
    assert rows["lorax-nf4"]["base_bytes"] < rows["lorax"]["base_bytes"] / 2
    assert rows["lorax-bf16"]["base_bytes"] < 0.6 * rows["lorax"]["base_bytes"]


def test_smoke_writes_the_table_and_plot(smoke):
    result, out = smoke
    text = out.with_suffix(".md").read_text()
    assert "| lorax_lite LoRA | 1 |" in text and "NNX model: lorax_lite on nnx.split" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert result["commit"] and result["machine"]["jax"]
    assert result["rows"]["lorax"]["adapter_bytes"] > 0
