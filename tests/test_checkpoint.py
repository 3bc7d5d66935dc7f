"""Adapter checkpoints and training checkpoints: round trips, validation, crash safety."""

import importlib.metadata
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import checkpoint_worker as worker
import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import randomize_b
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lorax_lite as ll
from lorax_lite.checkpoint import adapter_metadata
from lorax_lite.fingerprints import content_hash
from lorax_lite.train_checkpoint import TrainCheckpointer

KEY = jax.random.key(0)
CONFIG = ll.LoraConfig(
    rank=2,
    alpha=6,
    dropout=0.1,
    targets=("dense", "qkv"),
    rank_pattern={"qkv": 3},
    train=("head",),
    axes={"qkv": ("in", "out", "out")},
)
WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")


def base_params(seed=0, dense_shape=(8, 6)):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "params": {
            "dense": {"kernel": normal(*dense_shape), "bias": normal(dense_shape[1])},
            "qkv": {"kernel": normal(6, 2, 4).astype(jnp.bfloat16)},
            "head": {"kernel": normal(8, 3), "bias": normal(3)},
            "norm": {"scale": normal(6)},
        }
    }


def lora_tree(params=None):
    tree = ll.init(base_params() if params is None else params, CONFIG, key=KEY)
    return randomize_b(tree, jax.random.key(1))


def test_round_trip_equals_the_original_tree(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG, metadata={"task": "demo"})
    loaded = ll.load_adapter(tmp_path / "adapter", base_params())
    chex.assert_trees_all_equal(
        loaded, tree, strict=True
    )  # structure includes scale, layout and dropout
    qkv = loaded["params"]["qkv"]["kernel"]
    assert qkv.rank == 3 and qkv.scale == pytest.approx(2.0) and qkv.w.dtype == jnp.bfloat16
    info = adapter_metadata(tmp_path / "adapter")
    assert info["user"] == {"task": "demo"}
    assert ll.LoraConfig.from_dict(info["config"]) == CONFIG
    assert [e["path"] for e in info["trained"]] == ["params/head/bias", "params/head/kernel"]
    dists = {"lorax_lite": "lorax_lite", "jax": "jax", "orbax": "orbax-checkpoint"}
    assert info["versions"] == {k: importlib.metadata.version(d) for k, d in dists.items()}


def test_loading_a_lora_tree_uses_its_base(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG)
    other = ll.init(base_params(), CONFIG, key=jax.random.key(9))  # other factors, same base
    chex.assert_trees_all_equal(ll.load_adapter(tmp_path / "adapter", other), tree, strict=True)


def test_size_on_disk_follows_the_adapter_not_the_base(tmp_path):
    big = {"dense": {"kernel": jnp.ones((2048, 1024), jnp.float32)}}  # 8 MiB
    config = ll.LoraConfig(rank=1, targets="dense")
    ll.save_adapter(tmp_path / "adapter", ll.init(big, config, key=KEY), config)
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").rglob("*") if f.is_file())
    assert size < 100_000, size  # the factors are 12 KiB; the base would be 8 MiB


@pytest.mark.parametrize("check_base", [True, False])
def test_another_shape_or_missing_path_raises_naming_every_path(tmp_path, check_base):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    base = base_params(dense_shape=(8, 5))
    del base["params"]["head"]
    with pytest.raises(ValueError) as err:
        ll.load_adapter(tmp_path / "adapter", base, check_base=check_base)
    problems = str(err.value).splitlines()[1:]
    expected = [
        "params/dense/kernel: the base has shape (8, 5), the adapter was saved for shape (8, 6)",
        "params/head/bias: missing from the base (the adapter needs shape (3,))",
        "params/head/kernel: missing from the base (the adapter needs shape (8, 3))",
    ]
    if check_base:  # the fingerprint adds the other leaves that changed; each path once
        expected += [
            "params/dense/bias: saved base ((6,), 'float32'), this base ((5,), 'float32')",
            "params/qkv/kernel: the base weights differ from those the adapter was trained on "
            "(content fingerprint mismatch)",  # other random draws after the (8, 5) kernel
        ]
    assert sorted(p.strip() for p in problems if p.startswith("  ")) == sorted(expected)


def test_another_base_fingerprint_raises_and_check_base_false_transfers(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG)
    other = base_params(seed=1)  # same shapes, other values
    with pytest.raises(ValueError) as err:
        ll.load_adapter(tmp_path / "adapter", other)
    message = str(err.value)
    for path in ("params/dense/kernel", "params/qkv/kernel"):
        assert f"{path}: the base weights differ" in message
    assert "check_base=False" in message
    moved = ll.load_adapter(tmp_path / "adapter", other, check_base=False)
    dense = moved["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(dense.w, other["params"]["dense"]["kernel"])
    np.testing.assert_array_equal(dense.b, tree["params"]["dense"]["kernel"].b)


def test_fingerprint_lists_extra_and_retyped_leaves(tmp_path):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    base = base_params()
    base["params"]["extra"] = jnp.zeros(2)
    base["params"]["norm"]["scale"] = base["params"]["norm"]["scale"].astype(jnp.float16)
    with pytest.raises(ValueError) as err:
        ll.load_adapter(tmp_path / "adapter", base)
    assert "params/extra: in this base, not in the saved base" in str(err.value)
    assert "params/norm/scale: saved base ((6,), 'float32'), this base ((6,), 'float16')" in str(
        err.value
    )


def test_content_hash_sees_a_changed_element_on_the_sample_grid():
    x = jnp.arange(64.0 * 64).reshape(64, 64)
    assert content_hash(x) == content_hash(np.asarray(x))
    assert content_hash(x) != content_hash(x.at[0, 0].add(1))
    assert content_hash(x) != content_hash(x.reshape(32, 128))


def test_unknown_format_version_raises(tmp_path):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    meta_file = tmp_path / "adapter" / "metadata" / "metadata"
    info = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ValueError, match="unknown adapter format version 99"):
        ll.load_adapter(tmp_path / "adapter", base_params())


def _array_files(directory, *, chunks_only=False):
    """The non-empty files of the arrays under ``directory`` (an adapter checkpoint's arrays
    item, a training step), or only their chunk data (not the manifests or orbax metadata)."""
    files = [f for f in directory.rglob("*") if f.is_file() and f.stat().st_size]
    files = [f for f in files if "/d/" in str(f)] if chunks_only else files
    assert files
    return files


def _truncate(files):
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("chunks_only", [False, True], ids=["array files", "chunk data"])
def test_truncated_checkpoint_raises_a_clear_error(tmp_path, chunks_only):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    _truncate(_array_files(tmp_path / "adapter" / "adapter", chunks_only=chunks_only))
    # The JSON metadata is intact, so the error comes from the arrays.
    assert adapter_metadata(tmp_path / "adapter")["format_version"] == 1
    with pytest.raises(ValueError, match="truncated, corrupted") as err:
        ll.load_adapter(tmp_path / "adapter", base_params())
    assert str(tmp_path / "adapter") in str(err.value)


def test_corrupted_arrays_raise_a_clear_error(tmp_path):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    for f in _array_files(tmp_path / "adapter" / "adapter", chunks_only=True):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        ll.load_adapter(tmp_path / "adapter", base_params())


def test_missing_checkpoint_and_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError):
        ll.load_adapter(tmp_path / "nothing", base_params())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a lorax_lite adapter checkpoint"):
        ll.load_adapter(tmp_path / "empty", base_params())


def test_save_needs_the_base_and_refuses_to_overwrite(tmp_path):
    tree = lora_tree()
    trainable, _ = ll.partition(tree)
    with pytest.raises(ValueError, match="params/dense/kernel"):
        ll.save_adapter(tmp_path / "a", trainable, CONFIG)
    ll.save_adapter(tmp_path / "a", tree, CONFIG)
    with pytest.raises(ValueError, match="exists"):
        ll.save_adapter(tmp_path / "a", tree, CONFIG)
    ll.save_adapter(tmp_path / "a", tree, CONFIG, overwrite=True)


def test_sharded_base_restores_sharded(tmp_path):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {"dense": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}
    config = ll.LoraConfig(rank=2, targets="dense")
    ll.save_adapter(tmp_path / "a", ll.init(params, config, key=KEY), config)
    spec = PartitionSpec("data", "model")
    sharded = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec[-x.ndim :]))), params
    )
    node = ll.load_adapter(tmp_path / "a", sharded)["dense"]["kernel"]
    assert node.a.sharding.spec == PartitionSpec("data", None)  # fan-in axis, rank unsharded
    assert node.b.sharding.spec == PartitionSpec(None, "model")  # rank unsharded, fan-out axis
    assert node.w.sharding.spec == spec


def test_load_without_a_base_gives_the_adapters_alone(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG)
    alone = ll.load_adapter(tmp_path / "adapter")
    dense = alone["params"]["dense"]["kernel"]
    assert dense.w is None
    np.testing.assert_array_equal(dense.a, tree["params"]["dense"]["kernel"].a)
    head = alone["params"]["head"]["kernel"]
    np.testing.assert_array_equal(head.value, tree["params"]["head"]["kernel"].value)


# Training checkpoints.


def test_train_checkpointer_keeps_the_last_n_and_restores_state_and_data(tmp_path):
    state = worker.init_state()
    saved = {}
    with TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        for step in range(4):
            state, _ = worker.train(state, step, 1)
            saved[step] = worker.flat_arrays(state)  # the next step donates `state`
            ckpt.save(step, state, data={"position": step + 1})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        like = worker.init_state()
        restored = ckpt.restore(like, step=2)
    assert isinstance(restored.state, ll.TrainState)
    assert restored.step == 2 and restored.data == {"position": 3}
    assert int(restored.state.step) == 3
    for name, value in worker.flat_arrays(restored.state).items():
        np.testing.assert_array_equal(value, saved[2][name])
    assert restored.state.frozen is like.frozen  # the base comes from `like`, never from disk


def test_train_checkpoints_leave_out_the_frozen_base(tmp_path):
    big = {"w": jnp.ones((1024, 2048), jnp.float32)}  # 8 MiB
    state = ll.TrainState(jnp.int32(5), {"a": jnp.arange(4.0)}, big, (), jax.random.key(3))
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, state)
        ckpt.wait()
        like = ll.TrainState(jnp.int32(0), {"a": jnp.zeros(4)}, big, (), jax.random.key(0))
        restored = ckpt.restore(like).state
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert size < 200_000, size
    np.testing.assert_array_equal(restored.trainable["a"], np.arange(4.0))
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    assert int(restored.step) == 5 and restored.frozen is big


def test_truncated_training_checkpoint_raises_naming_the_saved_steps(tmp_path):
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        for step in (1, 2):
            ckpt.save(step, worker.init_state(), data={"position": step})
        ckpt.wait()
        _truncate(_array_files(tmp_path / "ckpt" / "2", chunks_only=True))
        with pytest.raises(ValueError, match=r"step 2 .* truncated or corrupted") as err:
            ckpt.restore(worker.init_state())
        assert r"step=... (saved: [1, 2])" in str(err.value)
        assert ckpt.restore(worker.init_state(), step=1).data == {"position": 1}


def test_restore_without_checkpoints_raises(tmp_path):
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(FileNotFoundError, match="No training checkpoint"):
            ckpt.restore(worker.init_state())


def test_resume_in_a_fresh_process_equals_uninterrupted_training(tmp_path):
    steps = 3
    state, position = worker.train(worker.init_state(), 0, steps)
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(steps, state, data={"position": position})
    expected, _ = worker.train(state, position, steps)
    out = tmp_path / "resumed.npz"
    subprocess.run(
        [sys.executable, str(WORKER), "resume", str(tmp_path / "ckpt"), str(steps), str(out)],
        check=True,
        timeout=120,
    )
    with np.load(out, allow_pickle=False) as resumed:
        expected_arrays = worker.flat_arrays(expected)
        assert sorted(resumed.files) == sorted(expected_arrays)
        for name, value in expected_arrays.items():
            assert resumed[name].dtype == value.dtype
            np.testing.assert_array_equal(resumed[name], value)  # bitwise
    assert int(expected.step) == 2 * steps


def test_kill_during_save_leaves_the_previous_checkpoint_intact(tmp_path):
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "save-forever", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 50
        assert proc.stdout.readline().strip() == "saved 0"  # one complete checkpoint
        # Wait until a later save is half-written (its temporary directory exists), then kill.
        while not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    half_written = [p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert len(half_written) == 1
    like = {f"w{i}": jnp.zeros((1024, 1024), jnp.float32) for i in range(8)}
    with TrainCheckpointer(directory, max_to_keep=2) as ckpt:
        step = ckpt.latest_step()
        restored = ckpt.restore(like)
    assert half_written[0].startswith(f"{step + 1}.")  # killed while saving the next step
    assert restored.data == {"k": step}
    for value in restored.state.values():
        np.testing.assert_array_equal(value, np.full((1024, 1024), step, np.float32))


# Overwrites: the old adapter or the new one, complete, never neither.


def _fail(*args, **kwargs):
    raise OSError("simulated failure in the middle of a save")


def _rename_failing_on(target):
    """os.rename, except that the first rename to a name ending in ``target`` fails."""
    rename, failed = os.rename, []

    def rename_unless_target(src, dst, *args, **kwargs):
        if str(dst).endswith(target) and not failed:
            failed.append(dst)
            _fail()
        return rename(src, dst, *args, **kwargs)

    return rename_unless_target


@pytest.mark.parametrize(
    "failure",
    [
        "non-JSON metadata",
        "writing the metadata",
        "finalizing",
        "moving the old aside",
        "moving the new in",
    ],
)
def test_a_failed_overwrite_keeps_the_old_adapter(tmp_path, monkeypatch, failure):
    path = tmp_path / "adapter"
    old = lora_tree()
    ll.save_adapter(path, old, CONFIG, metadata={"version": 1})
    new = randomize_b(old, jax.random.key(7))
    metadata, error = {"version": 2}, OSError
    if failure == "non-JSON metadata":
        metadata, error = {"lr": np.float32(0.1), "steps": [1, np.int64(2)], 3: "three"}, TypeError
    elif failure == "writing the metadata":
        monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", _fail)
    elif failure == "finalizing":  # every item written, not yet committed
        monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", _fail)
    else:
        target = "lorax-lite-old" if failure == "moving the old aside" else str(path)
        monkeypatch.setattr(os, "rename", _rename_failing_on(target))
    with pytest.raises(error) as err:
        ll.save_adapter(path, new, CONFIG, metadata=metadata, overwrite=True)
    monkeypatch.undo()
    if error is TypeError:  # every offending part named, before anything is written
        for part in ("metadata['lr']: numpy.float32 0.1", "metadata['steps'][1]: numpy.int64 2"):
            assert part in str(err.value)
        assert "metadata: key 3 (int) is not a string, as JSON keys are" in str(err.value)
    chex.assert_trees_all_equal(ll.load_adapter(path, base_params()), old, strict=True)
    assert adapter_metadata(path)["user"] == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directory left behind


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", _fail)
    with pytest.raises(OSError, match="simulated failure"):
        ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_overwrite_never_replaces_what_is_not_an_adapter(tmp_path, kind):
    path = tmp_path / "precious"
    if kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("keep me")
    else:
        path.write_text("keep me")
    with pytest.raises(ValueError, match=f"{path} exists and is not an adapter checkpoint"):
        ll.save_adapter(path, lora_tree(), CONFIG, overwrite=True)
    assert (path / "notes.txt" if kind == "directory" else path).read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["precious"]


def _overwrite_in_a_subprocess(path, seed, kill_after=None, **kwargs):
    command = [sys.executable, str(WORKER), "overwrite-adapter", str(path), str(seed)]
    return subprocess.Popen(command + ([kill_after] if kill_after else []), **kwargs)


def _recovers_and_cleans_up(path):
    """The next overwrite succeeds and leaves no temporary sibling behind."""
    ll.save_adapter(path, worker.big_adapter(3), worker.BIG_CONFIG, overwrite=True)
    chex.assert_trees_all_equal(
        ll.load_adapter(path, worker.big_base()), worker.big_adapter(3), strict=True
    )
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize(
    "kill_after, left, survivor",
    [  # the directory entries left by the kill, and the adapter that loads
        ("lorax-lite-new", ["adapter", ".adapter.lorax-lite-new"], 1),
        ("lorax-lite-old", [".adapter.lorax-lite-new", ".adapter.lorax-lite-old"], 1),
        ("PATH", ["adapter", ".adapter.lorax-lite-old"], 2),
        ("lorax-lite-trash", ["adapter", ".adapter.lorax-lite-trash"], 2),
    ],
    ids=["new written", "old moved aside", "new moved in", "old about to be deleted"],
)
def test_sigkill_at_each_step_of_an_overwrite_leaves_a_complete_adapter(
    tmp_path, kill_after, left, survivor
):
    path = tmp_path / "adapter"
    ll.save_adapter(path, worker.big_adapter(1), worker.BIG_CONFIG)
    kill_after = str(path) if kill_after == "PATH" else kill_after
    proc = _overwrite_in_a_subprocess(path, 2, kill_after)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == sorted(left)
    chex.assert_trees_all_equal(
        ll.load_adapter(path, worker.big_base()), worker.big_adapter(survivor), strict=True
    )
    assert adapter_metadata(path)["adapters"][0]["path"] == "dense_0/kernel"
    _recovers_and_cleans_up(path)


def test_sigkill_while_writing_an_overwrite_leaves_a_complete_adapter(tmp_path):
    path = tmp_path / "adapter"
    ll.save_adapter(path, worker.big_adapter(1), worker.BIG_CONFIG)
    proc = _overwrite_in_a_subprocess(path, 2, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 60
        # Kill as soon as a temporary directory appears: the arrays are being written.
        while os.listdir(tmp_path) == ["adapter"]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    loaded = ll.load_adapter(path, worker.big_base())
    factor = np.asarray(loaded["dense_0"]["kernel"].a)
    assert factor[0, 0] in (1, 2)
    chex.assert_trees_all_equal(loaded, worker.big_adapter(int(factor[0, 0])), strict=True)
    _recovers_and_cleans_up(path)


# The adapter metadata: every field checked, errors naming the file, the field, the expectation.


def _edit_metadata(directory, edit):
    meta_file = directory / "metadata" / "metadata"
    info = json.loads(meta_file.read_text())
    edit(info)
    meta_file.write_text(json.dumps(info))
    return meta_file


def _set(*keys, value):
    def edit(info):
        node = info
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _delete(*keys):
    def edit(info):
        node = info
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set("adapters", 0, "rank", value="2"),
            "adapters[0].rank: expected an int >= 1, found '2'",
        ),
        (_delete("adapters", 0, "layout"), "adapters[0].layout: expected one role of"),
        (_set("adapters", 1, "layout", value=["in", "out", "up"]), "found ['in', 'out', 'up']"),
        (_set("adapters", 0, "scale", value=None), "adapters[0].scale: expected a finite number"),
        (_set("adapters", 0, "scale", value=10**400), "adapters[0].scale: expected a finite n"),
        (_set("adapters", 0, "dropout", value=1.5), "adapters[0].dropout: expected a number in"),
        (_set("adapters", 0, "a", "dtype", value="int8"), "adapters[0].a.dtype: expected a floa"),
        (_set("adapters", 0, "b", "shape", value=[2, 7]), "adapters[0].b.shape: expected [2, 6]"),
        (_set("adapters", 0, "shape", value=[8, "6"]), "adapters[0].shape: expected a list of"),
        (_set("adapters", 0, value=[]), "adapters[0]: expected a JSON object, found []"),
        (_set("trained", 0, "dtype", value="float33"), "trained[0].dtype: expected the dtype"),
        (_delete("trained", 1, "sha256"), "trained[1].sha256: expected 64 hexadecimal digits"),
        (_set("trained", 1, "path", value=""), "trained[1].path: expected a leaf path"),
        (_set("trained", 1, "path", value="params/head/bias"), "'params/head/bias' is given twice"),
        (_delete("adapters"), "adapters: expected a JSON array, found nothing (the field is"),
        (_set("base", "leaves", value=[]), "base: expected {'leaves': {path: [shape, dtype]}"),
        (_set("base", "leaves", "params/norm/scale", value=[[6]]), "base.leaves['params/norm/s"),
        (_set("base", "hashes", "params/nowhere", value="0" * 32), "base.hashes['params/nowhere"),
        (_set("versions", "jax", value=12), "versions['jax']: expected a version string"),
        (_set("config", "rank", value=0), "config: expected the fields of a valid LoraConfig"),
        (_set("config", "colour", value="red"), "config: expected the fields of a valid LoraCo"),
        (_set("sha256", value="xyz"), "sha256: expected 64 hexadecimal digits, found 'xyz'"),
        # Well-formed edits: the checksum of the metadata notices them.
        (_set("adapters", 0, "scale", value=2.5), "sha256: the metadata does not match the chec"),
        (_set("user", value={"task": "other"}), "sha256: the metadata does not match the checks"),
    ],
)
def test_corrupted_metadata_fields_raise_naming_file_field_and_expectation(tmp_path, edit, message):
    ll.save_adapter(tmp_path / "adapter", lora_tree(), CONFIG, metadata={"task": "demo"})
    meta_file = _edit_metadata(tmp_path / "adapter", edit)
    for read in (adapter_metadata, ll.load_adapter, lambda p: ll.load_adapter(p, base_params())):
        with pytest.raises(ValueError, match="corrupted or was edited") as err:
            read(tmp_path / "adapter")
        assert str(meta_file) in str(err.value)
        assert message in str(err.value)


def test_metadata_without_a_checksum_still_loads(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree, CONFIG)
    _edit_metadata(tmp_path / "adapter", _delete("sha256"))  # as written before the checksum
    chex.assert_trees_all_equal(
        ll.load_adapter(tmp_path / "adapter", base_params()), tree, strict=True
    )


# Training checkpoints: the errors say what is wrong.


def test_restoring_onto_another_shape_names_each_leaf_and_both_shapes(tmp_path):
    state = {"a": jnp.zeros((3, 4)), "opt": {"mu": jnp.zeros(5), "nu": jnp.zeros(5)}}
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        like = {"a": jnp.zeros((3, 5)), "opt": {"mu": jnp.zeros(5), "extra": jnp.zeros(2)}}
        with pytest.raises(ValueError) as err:
            ckpt.restore(like)
    message = str(err.value)
    assert "onto `like`" in message and "corrupted" not in message
    problems = sorted(line.strip() for line in message.splitlines()[1:])
    assert problems == [
        "a: saved with shape (3, 4), `like` has shape (3, 5)",
        "opt/extra: in `like`, not in the saved state",
        "opt/nu: in the saved state, not in `like`",
    ]


def test_non_json_data_raises_at_save_and_costs_no_step(tmp_path):
    state = worker.init_state()
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(TypeError) as err:
            ckpt.save(1, state, data={"position": np.int64(3), "seen": {"epochs": [np.float32(1)]}})
        for part in ("data['position']: numpy.int64 3", "data['seen']['epochs'][0]: numpy.float32"):
            assert part in str(err.value)
        ckpt.save(2, state, data={"position": 3})
        ckpt.wait()
        assert ckpt.all_steps() == [2]
        assert ckpt.restore(state).data == {"position": 3}


def test_edited_training_data_raises(tmp_path):
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, worker.init_state(), data={"position": 3})
    (tmp_path / "ckpt" / "1" / "data" / "metadata").write_text(json.dumps({"position": 4}))
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(ValueError, match="data of step 1 does not match the checksum"):
            ckpt.restore(worker.init_state())


def test_a_corrupted_step_metadata_file_raises_naming_the_directory(tmp_path):
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"a": jnp.zeros(3)})
    meta_file = tmp_path / "ckpt" / "1" / "_CHECKPOINT_METADATA"
    edited = {**json.loads(meta_file.read_text()), "performance_metrics": {"": 0.0}}
    meta_file.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="_CHECKPOINT_METADATA file\\) is corrupted") as err:
        TrainCheckpointer(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(err.value)


# Saving without recombining: a (trainable, frozen) pair or a TrainState.


def test_a_partition_pair_or_a_train_state_saves_what_the_full_tree_saves(tmp_path):
    tree = lora_tree()
    trainable, frozen = ll.partition(tree)
    state = ll.TrainState(jnp.zeros((), jnp.int32), trainable, frozen, (), jax.random.key(3))
    for name, saved in [("full", tree), ("pair", (trainable, frozen)), ("state", state)]:
        ll.save_adapter(tmp_path / name, saved, CONFIG, metadata={"task": "demo"})
        chex.assert_trees_all_equal(
            ll.load_adapter(tmp_path / name, base_params()), tree, strict=True
        )
    full = adapter_metadata(tmp_path / "full")
    assert adapter_metadata(tmp_path / "pair") == full  # same fingerprint, entries, checksum
    assert adapter_metadata(tmp_path / "state") == full


def test_a_lora_tree_that_is_a_2_tuple_is_not_taken_for_a_pair(tmp_path):
    """Two full LoRA trees of one structure in a tuple (two towers) save as one tree of
    both, and their own partition pair saves the same adapter."""
    towers = (lora_tree(), lora_tree())
    ll.save_adapter(tmp_path / "towers", towers, CONFIG)
    info = adapter_metadata(tmp_path / "towers")
    one = [e["path"] for e in adapter_metadata_of(tmp_path, lora_tree())["adapters"]]
    assert [e["path"] for e in info["adapters"]] == [f"{i}/{p}" for i in (0, 1) for p in one]
    chex.assert_trees_all_equal(
        ll.load_adapter(tmp_path / "towers", (base_params(), base_params())), towers, strict=True
    )
    ll.save_adapter(tmp_path / "towers_pair", ll.partition(towers), CONFIG)
    assert adapter_metadata(tmp_path / "towers_pair") == info


def test_pairs_that_are_not_a_partition_are_refused_naming_the_adapters(tmp_path):
    trainable, frozen = ll.partition(lora_tree())
    other = ll.init(base_params(), ll.LoraConfig(rank=1, targets="dense"), key=KEY)
    for not_a_pair in [(frozen, trainable), (trainable, ll.partition(other)[1])]:
        with pytest.raises(ValueError, match=r"\(trainable, frozen\) pair .* lack one: .*dense"):
            ll.save_adapter(tmp_path / "a", not_a_pair, CONFIG)
    assert os.listdir(tmp_path) == []


def adapter_metadata_of(tmp_path, tree):
    """The metadata `save_adapter` writes for ``tree``."""
    ll.save_adapter(tmp_path / "probe", tree, CONFIG, overwrite=True)
    return adapter_metadata(tmp_path / "probe")


def test_save_adapter_without_a_config_records_null_and_loads(tmp_path):
    tree = lora_tree()
    ll.save_adapter(tmp_path / "adapter", tree)
    assert adapter_metadata(tmp_path / "adapter")["config"] is None
    chex.assert_trees_all_equal(
        ll.load_adapter(tmp_path / "adapter", base_params()), tree, strict=True
    )


def test_save_adapter_refuses_a_config_that_disagrees_with_the_tree(tmp_path):
    config = ll.LoraConfig(**{**CONFIG.to_dict(), "dropout": 0.25})
    with pytest.raises(ValueError, match=r"disagrees with the tree:\n  .*: the tree's dropout"):
        ll.save_adapter(tmp_path / "adapter", lora_tree(), config)
    assert not (tmp_path / "adapter").exists()


def test_the_residual_init_is_saved_with_each_adapter_and_checked(tmp_path):
    """A PiSSA tree saved without a config loads with its residual_init, and the hint for
    the original base names it; a config that says otherwise is refused."""
    pissa = ll.LoraConfig(**{**CONFIG.to_dict(), "init": "pissa"})
    tree = ll.init(base_params(), pissa, key=KEY)
    ll.save_adapter(tmp_path / "adapter", tree)
    entries = adapter_metadata(tmp_path / "adapter")["adapters"]
    assert {e["residual_init"] for e in entries} == {"pissa"}
    loaded = ll.load_adapter(tmp_path / "adapter", ll.partition(tree)[1])
    chex.assert_trees_all_equal(loaded, tree, strict=True)  # residual_init is static data
    with pytest.raises(ValueError, match="init='pissa': its base is the residual"):
        ll.load_adapter(tmp_path / "adapter", base_params())
    with pytest.raises(
        ValueError, match="the tree's residual_init 'pissa', the config's init 'kaiming'"
    ):
        ll.save_adapter(tmp_path / "other", tree, CONFIG)
