"""Any corrupted byte or JSON field of a saved adapter or training step: it loads bit for bit
or raises the library's ValueError, never another exception."""

import contextlib
import json
import pathlib
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lorax_lite as ll
from lorax_lite.train_checkpoint import TrainCheckpointer

CONFIG = ll.LoraConfig(
    rank=2, alpha=6, targets=("dense", "qkv"), train=("head",), axes={"qkv": ("in", "out", "out")}
)
EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True)


def base_params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "dense": {"kernel": normal(6, 4), "bias": normal(4)},
        "qkv": {"kernel": normal(4, 2, 3).astype(jnp.bfloat16)},
        "head": {"kernel": normal(4, 2)},
    }


def train_state():
    rng = np.random.default_rng(1)
    return {
        "step": jnp.int32(7),
        "trainable": {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
        "opt": {"mu": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16), "count": jnp.int32(3)},
        "key": jax.random.key(4),
    }


DATA = {"position": 120, "epoch": [1, 2.5], "name": "run"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter and a training step, saved once; each example corrupts a copy."""
    root = tmp_path_factory.mktemp("saved")
    tree = randomize_b(ll.init(base_params(), CONFIG, key=jax.random.key(0)), jax.random.key(1))
    ll.save_adapter(root / "adapter", tree, CONFIG, metadata={"task": "demo", "lr": 0.1})
    with TrainCheckpointer(root / "ckpt") as ckpt:
        ckpt.save(3, train_state(), data=DATA)
    return root, tree


@contextlib.contextmanager
def corrupted_copy(directory, corrupt):
    """A copy of ``directory`` in which ``corrupt(copy)`` changed one file."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = pathlib.Path(scratch) / directory.name
        shutil.copytree(directory, copy)
        corrupt(copy)
        yield copy


def files_of(directory, *, json_only=False):
    files = sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file())
    files = [f for f in files if (directory / f).stat().st_size]
    return [f for f in files if _json_of(directory / f) is not None] if json_only else files


def _json_of(path):
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        return None


def loads_identically_or_raises_value_error(load, check):
    """``load()`` gives what ``check`` accepts, or raises exactly ValueError."""
    try:
        loaded = load()
    except ValueError as err:
        assert type(err) is ValueError, f"{type(err).__name__}: {err}"  # not a subclass
        event("raised ValueError")
        return
    check(loaded)
    event("loaded identically")


def load_adapter(directory, tree):
    loads_identically_or_raises_value_error(
        lambda: ll.load_adapter(directory, base_params()),
        lambda loaded: chex.assert_trees_all_equal(
            loaded, tree, strict=True
        ),  # scale, layout, dropout included
    )


def restore_step(directory, _):
    def restore():
        with TrainCheckpointer(directory) as ckpt:
            return ckpt.restore(train_state())

    def check(restored):
        as_data = lambda x: jax.random.key_data(x) if x.dtype == train_state()["key"].dtype else x
        chex.assert_trees_all_equal(
            jax.tree_util.tree_map(as_data, restored.state),
            jax.tree_util.tree_map(as_data, train_state()),
            strict=True,
        )
        assert (restored.step, restored.data) == (3, DATA)

    loads_identically_or_raises_value_error(restore, check)


CHECKPOINTS = {"adapter": ("adapter", load_adapter), "training step": ("ckpt", restore_step)}


@st.composite
def byte_corruptions(draw, files, json_files):
    """Flips one bit (or some bits) of one byte of one file, a JSON file half the time."""
    name = draw(st.sampled_from(json_files) | st.sampled_from(files))
    event(f"file {name.name if '/d/' not in str(name) else 'd/<chunk data>'}")
    mask = draw(st.sampled_from([1 << bit for bit in range(8)]) | st.integers(1, 255))
    where = draw(st.floats(0, 1, exclude_max=True))

    def corrupt(copy):
        content = bytearray((copy / name).read_bytes())
        content[int(where * len(content))] ^= mask
        (copy / name).write_bytes(bytes(content))

    return corrupt


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=4,
)


def json_nodes(value, path=()):
    """The path of every node of a JSON document (the root excluded)."""
    if not isinstance(value, dict | list):
        return []
    children = value.items() if isinstance(value, dict) else enumerate(value)
    return [p for k, v in children for p in [(*path, k), *json_nodes(v, (*path, k))]]


def plausible_edits(value, document):
    """Values a slip could leave where ``value`` was: near numbers, other strings of the
    same document, a shorter list, a dict without one key."""
    strings = sorted({s for s in _leaves(document) if isinstance(s, str)})
    if value is None:
        return [0, ""]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1, value - 1, value * 2, -value, str(value)]
    if isinstance(value, str):
        return [s for s in strings if s != value] + [value[:-1], value + "0"]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:], list(reversed(value))]
    return [{k: v for k, v in value.items() if k != key} for key in value] or [[]]


def _leaves(value):
    if isinstance(value, dict):
        return [*value.keys(), *(x for v in value.values() for x in _leaves(v))]
    return [x for v in value for x in _leaves(v)] if isinstance(value, list) else [value]


@st.composite
def field_corruptions(draw, directory, files):
    """Replaces, edits, deletes or renames one field of one JSON file."""
    name = draw(st.sampled_from(files))
    document = _json_of(directory / name)
    path = draw(st.sampled_from(json_nodes(document)))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    action = draw(st.sampled_from(["replace", "edit", "delete", "rename"]))
    if action == "replace":
        parent[key] = draw(JSON_VALUES)
    elif action == "edit" and plausible_edits(old, document):
        parent[key] = draw(st.sampled_from(plausible_edits(old, document)))
    elif isinstance(parent, dict) and action == "rename":
        parent[key + "_"] = parent.pop(key)
    else:
        del parent[key]
    text = json.dumps(document)

    def corrupt(copy):
        (copy / name).write_text(text)

    return corrupt


@pytest.mark.parametrize("kind", CHECKPOINTS)
@EXAMPLES
@given(data=st.data())
def test_any_corrupted_byte_loads_identically_or_raises(saved, kind, data):
    root, tree = saved
    directory, load = CHECKPOINTS[kind]
    files, json_files = files_of(root / directory), files_of(root / directory, json_only=True)
    corrupt = data.draw(byte_corruptions(files, json_files))
    with corrupted_copy(root / directory, corrupt) as copy:
        load(copy, tree)


@pytest.mark.parametrize("kind", CHECKPOINTS)
@EXAMPLES
@given(data=st.data())
def test_any_corrupted_json_field_loads_identically_or_raises(saved, kind, data):
    root, tree = saved
    directory, load = CHECKPOINTS[kind]
    files = files_of(root / directory, json_only=True)
    corrupt = data.draw(field_corruptions(root / directory, files))
    with corrupted_copy(root / directory, corrupt) as copy:
        load(copy, tree)


@pytest.mark.parametrize(
    "kind, name, before, after",
    [  # one flipped bit each: a valid JSON document that says something else
        ("adapter", "metadata/metadata", '"scale": 3.0', '"scale": 2.0'),
        ("adapter", "metadata/metadata", '"layout"', '"mayout"'),
        ("adapter", "metadata/metadata", '"path": "dense/kernel"', '"qath": "dense/kernel"'),
        ("training step", "3/data/metadata", '"position": 120', '"position": 130'),
    ],
)
def test_a_flipped_bit_in_a_json_file_raises(saved, kind, name, before, after):
    root, _ = saved
    assert sum(bin(a ^ b).count("1") for a, b in zip(before.encode(), after.encode())) == 1

    def flip(copy):
        content = (copy / name).read_text()
        assert before in content
        (copy / name).write_text(content.replace(before, after, 1))

    with corrupted_copy(root / CHECKPOINTS[kind][0], flip) as copy:
        with pytest.raises(ValueError) as err:
            if kind == "adapter":
                ll.load_adapter(copy, base_params())
            else:
                with TrainCheckpointer(copy) as ckpt:
                    ckpt.restore(train_state())
    assert type(err.value) is ValueError
