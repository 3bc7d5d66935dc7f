"""The lorax-lite command line on a tiny adapter: inspect, merge, export-peft; export-gguf
on a tiny llama GGUF file."""

import dataclasses
import json
import os
import pathlib
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_reference, randomize_b
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
    chex.assert_trees_all_equal(unflatten(merged), ll.merge(tree), strict=True)


def test_merge_of_an_adapter_holding_nan_writes_nothing_and_exits_2(tmp_path, capsys):
    tree = randomize_b(ll.init(base_params(), CONFIG, key=jax.random.key(0)), jax.random.key(1))
    value = tree["params"]["attn"]["value"]["kernel"]
    nan_b = value.b.at[0, 1].set(jnp.nan)
    tree["params"]["attn"]["value"]["kernel"] = dataclasses.replace(value, b=nan_b)
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG)
    save_file(dict(named_leaves(base_params())), tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(_merge_args(tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorax-lite: error: ") and err.count("\n") == 1
    assert "non-finite" in err and "params/attn/value/kernel" in err
    assert "params/attn/query/kernel" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.safetensors"]


def test_merge_refuses_another_base_unless_told(files, capsys):
    tmp_path, _ = files
    save_file(dict(named_leaves(base_params(seed=1))), tmp_path / "other.safetensors")
    args = ["merge", "--base", str(tmp_path / "other.safetensors")]
    args += ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m.safetensors")]
    assert main(args) == 2
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
    chex.assert_trees_all_equal(ll.from_peft(tmp_path / "peft", jax_base, names), tree, strict=True)
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


def test_export_peft_of_an_adapter_saved_without_a_config(files):
    """The config is derived from the adapters: the same export as with the one recorded."""
    tmp_path, tree = files
    ll.save_adapter(tmp_path / "bare", tree)
    for name in ("adapter", "bare"):
        out = str(tmp_path / f"{name}_peft")
        assert main(["export-peft", "--adapter", str(tmp_path / name), "--out", out]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        expected = (tmp_path / "adapter_peft" / name).read_bytes()
        assert (tmp_path / "bare_peft" / name).read_bytes() == expected


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("lorax-lite: error: No adapter checkpoint")
    with pytest.raises(SystemExit):
        main(["merge", "--base", "b"])  # argparse: missing required arguments


# No output over an input; outputs written atomically.


def _merge_args(tmp_path, out, base=None):
    base = tmp_path / "base.safetensors" if base is None else base
    return ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]


def _snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("alias", ["same path", "relative detour", "symlink", "hard link"])
def test_merge_never_writes_over_its_base(files, capsys, alias):
    tmp_path, _ = files
    base = tmp_path / "base.safetensors"
    out = {"same path": base, "relative detour": tmp_path / "adapter" / ".." / base.name}.get(alias)
    if alias == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(base)
    elif alias == "hard link":
        out = tmp_path / "hard.safetensors"
        os.link(base, out)
    before = _snapshot(tmp_path)
    assert main(_merge_args(tmp_path, out)) == 2
    err = capsys.readouterr().err
    expected = f"the output {out} would overwrite the input --base {base}; write it elsewhere"
    assert err == f"lorax-lite: error: {expected}\n"
    assert _snapshot(tmp_path) == before


def test_merge_never_writes_into_its_adapter(files, capsys):
    tmp_path, tree = files
    before = _snapshot(tmp_path)
    assert main(_merge_args(tmp_path, tmp_path / "adapter" / "merged.safetensors")) == 2
    assert "would overwrite the input --adapter" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    chex.assert_trees_all_equal(
        ll.load_adapter(tmp_path / "adapter", base_params()), tree, strict=True
    )


@pytest.mark.parametrize("out", ["adapter", "adapter/adapter", "names"])
def test_export_never_writes_over_its_inputs(files, capsys, out):
    tmp_path, _ = files
    names = tmp_path / ("names" if out != "names" else "names/adapter_config.json")
    names.parent.mkdir(exist_ok=True)
    names.write_text(json.dumps({"params/attn/query": "q"})) if out == "names" else None
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / out)]
    args += ["--name-map", str(names)] if out == "names" else []
    before = _snapshot(tmp_path)
    assert main(args) == 2
    assert "would overwrite the input --" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_an_interrupted_merge_keeps_the_old_output(files, capsys, monkeypatch):
    tmp_path, _ = files
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the previous merge")

    def write_half_then_fail(tensors, filename):
        pathlib.Path(filename).write_bytes(b"half a merge")
        raise OSError("No space left on device")

    monkeypatch.setattr("lorax_lite.cli.save_file", write_half_then_fail)
    assert main(_merge_args(tmp_path, out)) == 2
    assert capsys.readouterr().err == "lorax-lite: error: No space left on device\n"
    assert out.read_bytes() == b"the previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.safetensors", out.name]


def test_an_interrupted_export_keeps_the_old_export(files, capsys, monkeypatch):
    tmp_path, _ = files
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    before = _snapshot(tmp_path / "p")

    def write_then_fail(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"half an export")
        raise OSError("No space left on device")

    monkeypatch.setattr("lorax_lite.peft.write.save_file", write_then_fail)
    assert main(args) == 2
    assert capsys.readouterr().err == "lorax-lite: error: No space left on device\n"
    assert _snapshot(tmp_path / "p") == before
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors"]
    )


# Every bad input: one line on stderr, exit status 2, never a traceback.


def _garbage(path):
    path.write_bytes(b"\xff\xfe not what it should be " * 4)


def _corrupt_metadata_field(path):
    meta = path / "metadata" / "metadata"
    info = json.loads(meta.read_text())
    info["adapters"][0]["rank"] = "two"
    meta.write_text(json.dumps(info))


def _truncate_arrays(path):
    for f in (path / "adapter").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[:10])


def _peft_dir(tmp_path):
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    return tmp_path / "p"


def _conflicting_base(path):
    flat = dict(named_leaves(base_params()))
    save_file({**flat, "params/attn": np.zeros(2, np.float32)}, path)


BAD_INPUTS = {
    # command: [(what is broken, how to break it, expected message)]
    "inspect": [
        ("missing", lambda t: None, "No adapter checkpoint at"),
        ("a file", lambda t: _garbage(t / "target"), "is not a lorax_lite adapter checkpoint"),
        ("metadata not JSON", lambda t: _garbage(t / "adapter/metadata/metadata"), "Cannot read"),
        ("metadata field", lambda t: _corrupt_metadata_field(t / "adapter"), "adapters[0].rank"),
        ("PEFT config not JSON", lambda t: _garbage(_peft_dir(t) / "adapter_config.json"), ""),
        (
            "PEFT config a list",
            lambda t: (_peft_dir(t) / "adapter_config.json").write_text("[]"),
            "",
        ),
        (
            "PEFT weights garbage",
            lambda t: _garbage(_peft_dir(t) / "adapter_model.safetensors"),
            "",
        ),
        (
            "PEFT weights missing",
            lambda t: (_peft_dir(t) / "adapter_model.safetensors").unlink(),
            "",
        ),
    ],
    "merge": [
        ("base garbage", lambda t: _garbage(t / "base.safetensors"), "as a safetensors file"),
        ("base empty", lambda t: (t / "base.safetensors").write_bytes(b""), "as a safetensors"),
        ("base missing", lambda t: (t / "base.safetensors").unlink(), "as a safetensors file"),
        (
            "base a directory",
            lambda t: ((t / "base.safetensors").unlink(), (t / "base.safetensors").mkdir()),
            "",
        ),
        (
            "base conflicting names",
            lambda t: _conflicting_base(t / "base.safetensors"),
            "'params/attn' is a leaf",
        ),
        ("adapter arrays truncated", lambda t: _truncate_arrays(t / "adapter"), "truncated"),
        (
            "adapter metadata field",
            lambda t: _corrupt_metadata_field(t / "adapter"),
            "adapters[0].rank",
        ),
        ("out a directory", lambda t: (t / "merged.safetensors").mkdir(), "is a directory"),
    ],
    "export-peft": [
        ("adapter missing", lambda t: shutil.rmtree(t / "adapter"), "No adapter checkpoint"),
        (
            "adapter metadata field",
            lambda t: _corrupt_metadata_field(t / "adapter"),
            "adapters[0].rank",
        ),
        ("name map not JSON", lambda t: _garbage(t / "names.json"), "as a name map"),
        ("name map a list", lambda t: (t / "names.json").write_text("[1]"), "found a JSON list"),
        (
            "name map numbers",
            lambda t: (t / "names.json").write_text('{"params/attn/query": 1}'),
            "",
        ),
        ("name map missing", lambda t: None, "as a name map"),
        ("out a file", lambda t: _garbage(t / "peft"), "is a file; name a directory"),
    ],
}


@pytest.mark.parametrize(
    "command, broken, message",
    [(c, b, m) for c, cases in BAD_INPUTS.items() for b, _, m in cases],
    ids=[f"{c}: {b}" for c, cases in BAD_INPUTS.items() for b, _, _ in cases],
)
def test_bad_inputs_give_one_line_and_exit_2(files, capsys, command, broken, message):
    tmp_path, _ = files
    dict((b, f) for b, f, _ in BAD_INPUTS[command])[broken](tmp_path)
    capsys.readouterr()
    if command == "inspect":
        target = {"missing": "nowhere", "a file": "target"}.get(broken, "adapter")
        args = ["inspect", str(tmp_path / ("p" if broken.startswith("PEFT") else target))]
    elif command == "merge":
        args = _merge_args(tmp_path, tmp_path / "merged.safetensors")
    else:
        args = ["export-peft", "--adapter", str(tmp_path / "adapter")]
        args += ["--out", str(tmp_path / "peft"), "--name-map", str(tmp_path / "names.json")]
        if not (tmp_path / "names.json").exists() and broken != "name map missing":
            names = {"params/attn/query": "q", "params/attn/value": "v", "params/head": "head"}
            (tmp_path / "names.json").write_text(json.dumps(names))
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lorax-lite: error: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert message in captured.err


# ----- export-gguf ---------------------------------------------------------------------------


@pytest.fixture
def gguf_files(tmp_path):
    """test_gguf_export's tiny llama file and a saved adapter on its model (scan-stacked)."""
    pytest.importorskip("gguf", reason="export-gguf reads and writes GGUF files")
    from test_gguf_export import expected_tensors, lora_tree, tiny_llama

    (tmp_path / "gguf").mkdir()
    tiny = tiny_llama(tmp_path / "gguf")
    tree = lora_tree(tiny)
    ll.save_adapter(tiny.path.parent / "adapter", tree)
    return tiny, expected_tensors(tiny, tree)


def _export_gguf_args(tiny, out):
    source, adapter = tiny.path, tiny.path.parent / "adapter"
    return ["export-gguf", "--source", str(source), "--adapter", str(adapter), "--out", str(out)]


def test_export_gguf_writes_the_merged_model_and_copies_the_rest(gguf_files, capsys):
    import gguf

    tiny, expected = gguf_files
    out = tiny.path.parent / "tuned" / "tuned.gguf"
    assert main(_export_gguf_args(tiny, out)) == 0
    assert f"wrote {out}: {len(expected)} merged tensors stored F16" in capsys.readouterr().out
    before, after = gguf.GGUFReader(tiny.path), gguf.GGUFReader(out)
    fields = lambda r: {f.name: f.contents() for f in r.fields.values()
                        if not f.name.startswith("GGUF.")}  # fmt: skip
    assert fields(after) == fields(before)  # tokenizer, chat template, hyper-parameters
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    assert list(new) == list(old) and len(expected) == 7 * 2
    for name, t in new.items():
        if name in expected:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            x = gguf.quants.dequantize(t.data, t.tensor_type)
            np.testing.assert_allclose(x, expected[name], rtol=1e-3, atol=1e-3, err_msg=name)
        else:
            assert t.tensor_type == old[name].tensor_type
            np.testing.assert_array_equal(t.data, old[name].data, err_msg=name)


def test_export_gguf_refuses_to_write_over_its_source(gguf_files, capsys):
    tiny, _ = gguf_files
    content = tiny.path.read_bytes()
    assert main(_export_gguf_args(tiny, tiny.path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would overwrite the input --source" in err
    assert tiny.path.read_bytes() == content


def test_export_gguf_errors_are_one_line(gguf_files, files, capsys, monkeypatch):
    tiny, _ = gguf_files
    tmp_path, _ = files  # an adapter on another model: no leaf has a GGUF name
    args = _export_gguf_args(tiny, tmp_path / "x.gguf")
    args[args.index("--adapter") + 1] = str(tmp_path / "adapter")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "x.gguf").exists()
    assert "params/attn/query/kernel: no GGUF tensor name" in err
    assert "params/head/kernel: trained in full" in err
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    assert main(_export_gguf_args(tiny, tmp_path / "x.gguf")) == 2
    assert capsys.readouterr().err == (
        "lorax-lite: error: export-gguf needs the gguf package: "
        "pip install 'lorax_lite[experiments]'\n"
    )


def test_export_gguf_file_loads_in_transformers_as_the_merged_model(gguf_files):
    """The independent end-to-end check: transformers reads the written file (its own GGUF
    loader un-permutes the query/key rows) and gives lorax_lite's merged model's logits."""
    torch = pytest.importorskip("torch", reason="transformers reads the written file")
    transformers = pytest.importorskip("transformers", reason="reads the written GGUF file")
    pytest.importorskip("accelerate", reason="transformers needs accelerate for GGUF files")
    from experiments.models.llama import forward

    tiny, _ = gguf_files
    out = tiny.path.parent / "tuned.gguf"
    assert main([*_export_gguf_args(tiny, out), "--tensor-type", "F32"]) == 0
    tokens = np.random.default_rng(3).integers(0, tiny.pretrained.config.vocab_size, (2, 12))
    tree = ll.load_adapter(tiny.path.parent / "adapter", tiny.pretrained.params)
    expected = np.asarray(forward(tiny.pretrained.config, ll.merge(tree), tokens), np.float64)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out.parent), gguf_file=out.name, dtype=torch.float32
    )
    with torch.no_grad():
        got = model(input_ids=torch.as_tensor(tokens)).logits.numpy().astype(np.float64)
    base = np.asarray(forward(tiny.pretrained.config, tiny.pretrained.params, tokens))
    assert np.abs(expected - base).max() > 0.1  # the adapter changes the logits
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
