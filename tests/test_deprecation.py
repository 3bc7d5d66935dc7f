"""The public API's one convention: every old spelling still works one release, warns
``DeprecationWarning`` and gives what the new spelling gives; the rules writers share."""

import inspect
import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MLP, randomize_b
from safetensors.numpy import load_file

import lorax_lite as ll
from lorax_lite.deprecation import renamed_keywords

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
MODEL = MLP((8, 3), ("fc1", "fc2"))
PARAMS = MODEL.init(jax.random.key(0), X)
CONFIG = ll.LoraConfig(rank=2, targets="all-linear")
NAMES = {"params/fc1": "fc1", "params/fc2": "fc2"}


def lora_tree(seed=1, config=CONFIG):
    tree = ll.init(PARAMS, config, key=jax.random.key(seed), fn=MODEL.apply, args=(X,))
    return randomize_b(tree, jax.random.key(seed + 100))


def adapter_set():
    return ll.AdapterSet.from_trees({"a": lora_tree(1), "b": lora_tree(2)})


def state_of(tree):
    trainable, frozen = ll.partition(tree)
    return ll.TrainState(jnp.zeros((), jnp.int32), trainable, frozen, (), jax.random.key(3))


def assert_same_export(one, other):
    """Two PEFT exports hold the same configuration and tensors."""
    config = lambda d: json.loads((d / "adapter_config.json").read_text())
    assert config(one) == config(other)
    tensors = lambda d: load_file(d / "adapter_model.safetensors")
    chex.assert_trees_all_equal(tensors(one), tensors(other))


def old_and_new(old, new):
    """``old()`` (which must warn ``DeprecationWarning`` naming the new spelling) and
    ``new()`` (which must not warn)."""
    with pytest.warns(DeprecationWarning, match="deprecated.*use") as caught:
        before = old()
    assert all(w.filename == __file__ for w in caught)  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        after = new()
    return before, after


def test_renamed_keywords_refuses_both_spellings_and_keeps_the_signature():
    @renamed_keywords(ids="adapter_ids")
    def pick(*, adapter_ids):
        """Doc."""
        return adapter_ids

    with pytest.raises(TypeError, match="pass adapter_ids= alone, not also ids="):
        pick(ids=1, adapter_ids=2)
    assert pick.__doc__ == "Doc." and list(inspect.signature(pick).parameters) == ["adapter_ids"]


def test_place_and_sharded_train_step_data_axis_is_axis_name():
    mesh = jax.make_mesh((8,), ("rows",))
    state = state_of(lora_tree())
    batch = jnp.ones((8, 6))
    old, new = old_and_new(
        lambda: ll.place(state, batch, mesh=mesh, data_axis="rows"),
        lambda: ll.place(state, batch, mesh=mesh, axis_name="rows"),
    )
    chex.assert_trees_all_equal(old, new)
    assert old[1].sharding == new[1].sharding and new[1].sharding.spec == jax.P("rows")
    with pytest.raises(ValueError, match="axis_name 'data' is not a mesh axis"):
        ll.place(state, batch, mesh=mesh)  # the default stays "data"

    loss = lambda tree, batch, key: jnp.mean(ll.lora(MODEL.apply)(tree, batch) ** 2)
    old, new = old_and_new(
        lambda: ll.sharded_train_step(loss, optax.sgd(0.1), mesh=mesh, data_axis="rows"),
        lambda: ll.sharded_train_step(loss, optax.sgd(0.1), mesh=mesh, axis_name="rows"),
    )
    steps = [step(init(lora_tree(), jax.random.key(0)), batch)[1] for init, step in (old, new)]
    chex.assert_trees_all_equal(*steps)


def test_select_which_and_per_example_ids_are_adapter_id_and_adapter_ids():
    adapters = adapter_set()
    old, new = old_and_new(
        lambda: adapters.select(which="b"), lambda: adapters.select(adapter_id="b")
    )
    chex.assert_trees_all_equal(old, new)
    ids = jnp.array([1, 0, -1, 1])
    old, new = old_and_new(
        lambda: adapters.per_example(ids=ids), lambda: adapters.per_example(adapter_ids=ids)
    )
    chex.assert_trees_all_equal(old, new)


def test_init_quantize_is_quantization():
    kwargs = dict(key=jax.random.key(1), fn=MODEL.apply, args=(X,))
    old, new = old_and_new(
        lambda: ll.init(PARAMS, CONFIG, quantize=dict(kind="int8", block=2), **kwargs),
        lambda: ll.init(PARAMS, CONFIG, quantization=dict(kind="int8", block=2), **kwargs),
    )
    chex.assert_trees_all_equal(old, new)
    assert isinstance(new["params"]["fc1"]["kernel"].w, ll.QuantizedWeight)


def test_to_peft_and_from_peft_directory_is_path(tmp_path):
    tree = lora_tree()
    old, new = old_and_new(
        lambda: ll.to_peft(directory=tmp_path / "old", tree=tree, config=CONFIG, name_map=NAMES),
        lambda: ll.to_peft(path=tmp_path / "new", tree=tree, config=CONFIG, name_map=NAMES),
    )
    assert_same_export(old, new)
    old, new = old_and_new(
        lambda: ll.from_peft(directory=old, params=PARAMS, name_map=NAMES),
        lambda: ll.from_peft(path=new, params=PARAMS, name_map=NAMES),
    )
    chex.assert_trees_all_equal(old, new)
    chex.assert_trees_all_close(new, tree)


def test_save_adapter_pair_warns_and_saves_what_combine_saves(tmp_path):
    tree = lora_tree()
    pair = ll.partition(tree)
    old_and_new(
        lambda: ll.save_adapter(tmp_path / "pair", pair, CONFIG),
        lambda: ll.save_adapter(tmp_path / "tree", ll.combine(*pair), CONFIG),
    )
    assert ll.adapter_metadata(tmp_path / "pair") == ll.adapter_metadata(tmp_path / "tree")


# --- One rule for every writer --------------------------------------------------------------


def test_to_peft_refuses_an_existing_export_unless_overwrite(tmp_path):
    first, second = lora_tree(1), lora_tree(2)
    ll.to_peft(tmp_path, first, CONFIG, NAMES)
    (tmp_path / "README.md").write_text("a model card")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already holds an export .*overwrite=True"):
        ll.to_peft(tmp_path, second, CONFIG, NAMES)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    ll.to_peft(tmp_path, second, CONFIG, NAMES, overwrite=True)
    chex.assert_trees_all_close(ll.from_peft(tmp_path, PARAMS, NAMES), second)
    assert (tmp_path / "README.md").read_text() == "a model card"


def test_a_lone_file_of_an_export_counts_as_an_export(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match=r"already holds an export \(adapter_config.json\)"):
        ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)


def test_every_writer_takes_a_train_state_as_its_tree(tmp_path):
    tree = lora_tree()
    state = state_of(tree)
    chex.assert_trees_all_equal(ll.merge(state), ll.merge(tree))
    ll.to_peft(tmp_path / "tree", tree, CONFIG, NAMES)
    ll.to_peft(tmp_path / "state", state, CONFIG, NAMES)
    assert_same_export(tmp_path / "tree", tmp_path / "state")
    ll.save_adapter(tmp_path / "saved", state, CONFIG)
    chex.assert_trees_all_equal(ll.load_adapter(tmp_path / "saved", PARAMS), tree)


def test_vmap_train_step_init_takes_a_mapping_of_trees_as_combine_adapters_does():
    loss = lambda tree, batch, key: jnp.mean(ll.lora(MODEL.apply)(tree, batch) ** 2)
    init, step = ll.vmap_train_step(loss, optax.sgd(0.1), donate=False)
    keys = jax.random.split(jax.random.key(0), 2)
    trees = {"a": lora_tree(1), "b": lora_tree(2)}
    from_set = step(init(ll.AdapterSet.from_trees(trees), keys), X)
    from_mapping = step(init(trees, keys), X)
    chex.assert_trees_all_equal(from_set, from_mapping)
    with pytest.raises(TypeError, match="AdapterSet or a mapping .*got list"):
        init([trees["a"], trees["b"]], keys)
