"""The lorax-lite command line on a tiny adapter: inspect, merge, export-peft."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, dense_reference, randomize_b
from safetensors.numpy import load_file, save_file

import lorax_lite as ll
from lorax_lite.cli import main
from lorax_lite.targets import named_leaves, unflatten

CONFIG = ll.LoraConfig(rank=2, alpha=4, targets=("query", "value"), train=("head",))


def base_params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    return {
        "params": {
            "attn": {"query": {"kernel": normal(8, 6)}, "value": {"kernel": normal(8, 4)}},
            "head": {"kernel": normal(6, 2), "bias": normal(2)},
        }
    }


@pytest.fixture
def files(tmp_path):
    tree = randomize_b(ll.init(base_params(), CONFIG, key=jax.random.key(0)), jax.random.key(1))
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG, metadata={"run": "cli"})
    save_file(dict(named_leaves(base_params())), tmp_path / "base.safetensors")
    return tmp_path, tree


def test_inspect_prints_config_paths_ranks_and_sizes(files, capsys):
    tmp_path, _ = files
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert '"rank": 2' in out and '"run": "cli"' in out
    lines = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("params/")
    }
    assert lines["params/attn/query/kernel"][1:4] == ["(8,", "6)", "float32"]
    assert lines["params/attn/query/kernel"][4:6] == ["2", "2"]  # rank 2, scale 4/2
    assert lines["params/attn/query/kernel"][-1] == f"{8 * 2 + 2 * 6}"
    assert lines["params/head/kernel"][4] == "full"
    # adapters (8+6)*2 + (8+4)*2 = 52, head 6*2 + 2 = 14; base 48 + 32 + 12 + 2 = 94
    assert "66 parameters (70.2% of the base's 94 in 4 leaves)" in out


def test_merge_writes_the_merged_weights(files, capsys):
    tmp_path, tree = files
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(tmp_path / "base.safetensors")]
    assert main([*args, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    merged = load_file(out)
    query = tree["params"]["attn"]["query"]["kernel"]
    np.testing.assert_allclose(
        merged["params/attn/query/kernel"], dense_reference(query), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(
        merged["params/head/bias"], np.asarray(tree["params"]["head"]["bias"].value)
    )
    assert_trees_equal(unflatten(merged), ll.merge(tree))


def test_merge_refuses_another_base_unless_told(files, capsys):
    tmp_path, _ = files
    save_file(dict(named_leaves(base_params(seed=1))), tmp_path / "other.safetensors")
    args = ["merge", "--base", str(tmp_path / "other.safetensors")]
    args += ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m.safetensors")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "params/attn/query/kernel: the base weights differ" in err
    assert not (tmp_path / "m.safetensors").exists()
    assert main([*args, "--no-check-base"]) == 0


def test_export_peft_with_a_name_map_and_inspect_it(files, capsys):
    tmp_path, tree = files
    names = {
        "params/attn/query": "encoder.q",
        "params/attn/value": "encoder.v",
        "params/head": "classifier",
    }
    (tmp_path / "names.json").write_text(json.dumps(names))
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]
    assert main([*args, "--name-map", str(tmp_path / "names.json")]) == 0
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.encoder.q.lora_A.weight"].shape == (2, 8)
    assert tensors["base_model.model.encoder.v.lora_B.weight"].shape == (4, 2)
    jax_base = jax.tree_util.tree_map(jnp.asarray, base_params())
    assert_trees_equal(ll.from_peft(tmp_path / "peft", jax_base, names), tree)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "peft_type='LORA', r=2, lora_alpha=4" in out
    assert "base_model.model.encoder.q.lora_A.weight  (2, 8)" in out


def test_export_peft_default_name_map(files):
    tmp_path, _ = files
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.query", "attn.value"]
    assert config["modules_to_save"] == ["head"]


def test_errors_exit_1_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "lorax-lite inspect: error: No adapter checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--base", "b"])  # argparse: missing required arguments
