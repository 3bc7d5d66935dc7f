"""The PEFT format: round trips, PEFT's key names and shapes, and (optionally) PEFT itself."""

import dataclasses
import errno
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import checkpoint_worker as worker
import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import deadline, randomize_b
from hypothesis import HealthCheck, given, settings
from safetensors.numpy import load_file, save_file

import lorax_lite as ll
from lorax_lite.peft import default_name_map
from lorax_lite.targets import named_leaves
from lorax_lite.weight import is_lora_node

KEY = jax.random.key(0)
WEIGHTS = "adapter_model.safetensors"
NAMES = {
    "params/embeddings/word/embedding": "embeddings.word_embeddings",
    "params/layer_0/query": "encoder.layer.0.attention.self.query",
    "params/layer_0/value": "encoder.layer.0.attention.self.value",
    "params/layer_1/query": "encoder.layer.1.attention.self.query",
    "params/layer_1/value": "encoder.layer.1.attention.self.value",
    "params/classifier": "classifier",
}


def base_params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    layer = lambda: {
        name: {"kernel": normal(8, 8), "bias": normal(8)} for name in ("query", "value", "key")
    }
    return {
        "params": {
            "embeddings": {"word": {"embedding": normal(20, 8)}},
            "layer_0": layer(),
            "layer_1": layer(),
            "classifier": {"kernel": normal(8, 3), "bias": normal(3)},
        }
    }


CONFIG = ll.LoraConfig(
    rank=2,
    alpha=5,
    dropout=0.1,
    targets=("query", "value", "word"),
    rank_pattern={"layer_1/query": 4},
    alpha_pattern={"value": 3},
    train=("classifier",),
    bias="lora_only",
)


def lora_tree(config=CONFIG):
    return randomize_b(ll.init(base_params(), config, key=KEY), jax.random.key(1))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_round_trip_equals_the_original(tmp_path, rslora):
    config = ll.LoraConfig(**{**CONFIG.to_dict(), "use_rslora": rslora})
    tree = lora_tree(config)
    ll.to_peft(tmp_path, tree, config, NAMES)
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, base_params(), NAMES), tree, strict=True)


def test_rslora_alphas_of_scales_unlike_the_config_s_are_written_and_read_back(tmp_path):
    """alpha_pattern holds the alpha that gives each node's scale under rsLoRA: s sqrt(r)."""
    config = ll.LoraConfig(
        rank=2,
        alpha=5,
        targets=("query",),
        rank_pattern={"layer_0/query": 3, "layer_1/query": 4},
        alpha_pattern={"layer_0/query": 7},
        use_rslora=True,
    )
    tree = lora_tree(config)
    query = tree["params"]["layer_1"]["query"]["kernel"]
    tree["params"]["layer_1"]["query"]["kernel"] = dataclasses.replace(query, scale=3.0)
    ll.to_peft(tmp_path, tree, config, NAMES)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    module = r"encoder\.layer\.{}\.attention\.self\.query"
    assert written["rank_pattern"] == {module.format(0): 3, module.format(1): 4}
    assert written["alpha_pattern"] == {module.format(0): 7, module.format(1): 6}  # 3 sqrt(4)
    read = ll.from_peft(tmp_path, base_params(), NAMES)
    assert read["params"]["layer_1"]["query"]["kernel"].scale == 3.0
    assert read["params"]["layer_0"]["query"]["kernel"].scale == pytest.approx(7 / np.sqrt(3))
    chex.assert_trees_all_close(read, tree)


def test_to_peft_derives_the_config_from_the_tree(tmp_path):
    """Without config=, r, lora_alpha, lora_dropout and the patterns come from the adapters:
    the files are those the config they were made with gives."""
    tree = lora_tree()
    ll.to_peft(tmp_path / "given", tree, CONFIG, NAMES)
    ll.to_peft(tmp_path / "derived", tree, name_map=NAMES)
    for name in ("adapter_config.json", WEIGHTS):
        assert (tmp_path / "derived" / name).read_bytes() == (
            tmp_path / "given" / name
        ).read_bytes()
    written = json.loads((tmp_path / "derived" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (2, 5, 0.1)
    rslora = ll.LoraConfig(**{**CONFIG.to_dict(), "use_rslora": True})
    ll.to_peft(tmp_path / "rslora", lora_tree(rslora), name_map=NAMES)  # alpha = s * r
    read = dict(
        named_leaves(ll.from_peft(tmp_path / "rslora", base_params(), NAMES), is_leaf=is_lora_node)
    )
    adapters = [(p, n) for p, n in named_leaves(lora_tree(rslora), is_leaf=is_lora_node)]
    for path, node in [(p, n) for p, n in adapters if isinstance(n, ll.LoraWeight)]:
        assert read[path].scale == pytest.approx(node.scale, rel=1e-9)
        chex.assert_trees_all_equal((read[path].a, read[path].b), (node.a, node.b))


def test_the_default_name_map_round_trips(tmp_path):
    tree = lora_tree()
    ll.to_peft(tmp_path, tree)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "layer_0.query" in written["target_modules"]  # params/layer_0/query, dot-joined
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, base_params()), tree, strict=True)


def test_a_config_that_disagrees_with_the_tree_is_refused(tmp_path):
    config = dataclasses.replace(CONFIG, dropout=0.0)
    with pytest.raises(ValueError, match="params/layer_0/query/kernel: the tree's dropout 0.1, "):
        ll.to_peft(tmp_path, lora_tree(), config, NAMES)
    assert list(tmp_path.iterdir()) == []


def test_adapters_of_different_dropouts_are_refused(tmp_path):
    tree = lora_tree()
    query = tree["params"]["layer_0"]["query"]["kernel"]
    tree["params"]["layer_0"]["query"]["kernel"] = dataclasses.replace(query, dropout=0.3)
    with pytest.raises(ValueError, match=r"dropout rates differ .*0.3: params/layer_0/query/k"):
        ll.to_peft(tmp_path, tree, name_map=NAMES)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_to_peft_refuses_residual_base_adapters_from_the_tree(tmp_path, init):
    """The tree records its adapters' init: no config is needed, and a plain one does not
    hide it (it disagrees with the tree)."""
    tree = ll.init(base_params(), dataclasses.replace(CONFIG, init=init), key=KEY)
    for config in (None, CONFIG):
        with pytest.raises(ValueError, match=f"params/layer_0/query/kernel.*init='{init}'"):
            ll.to_peft(tmp_path, tree, config, NAMES)
    assert list(tmp_path.iterdir()) == []


def test_keys_shapes_and_values_are_peft_s(tmp_path):
    tree = lora_tree()
    ll.to_peft(tmp_path, tree, CONFIG, NAMES, base_model_name_or_path="tiny-bert")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {"base_model.model.embeddings.word_embeddings.lora_embedding_A": (2, 20)}
    expected["base_model.model.embeddings.word_embeddings.lora_embedding_B"] = (8, 2)
    for layer in (0, 1):
        for proj in ("query", "value"):
            module = f"base_model.model.encoder.layer.{layer}.attention.self.{proj}"
            rank = 4 if (layer, proj) == (1, "query") else 2
            expected[f"{module}.lora_A.weight"] = (rank, 8)  # (r, in)
            expected[f"{module}.lora_B.weight"] = (8, rank)  # (out, r)
            expected[f"{module}.base_layer.bias"] = (8,)  # bias="lora_only"
    expected["base_model.model.classifier.weight"] = (3, 8)  # torch Linear (out, in)
    expected["base_model.model.classifier.bias"] = (3,)
    assert {k: v.shape for k, v in tensors.items()} == expected
    node = tree["params"]["layer_1"]["query"]["kernel"]
    module = "base_model.model.encoder.layer.1.attention.self.query"
    np.testing.assert_array_equal(tensors[f"{module}.lora_A.weight"], np.asarray(node.a).T)
    np.testing.assert_array_equal(tensors[f"{module}.lora_B.weight"], np.asarray(node.b).T)
    head = np.asarray(tree["params"]["classifier"]["kernel"].value)
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], head.T)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 5
    assert config["lora_dropout"] == 0.1 and config["fan_in_fan_out"] is False
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "tiny-bert" and config["use_rslora"] is False
    assert config["target_modules"] == sorted(v for v in NAMES.values() if v != "classifier")
    assert config["rank_pattern"] == {r"encoder\.layer\.1\.attention\.self\.query": 4}
    value_modules = [f"encoder.layer.{i}.attention.self.value" for i in (0, 1)]
    assert config["alpha_pattern"] == {m.replace(".", r"\."): 3 for m in value_modules}


def test_the_merged_weight_is_peft_s_formula(tmp_path):
    """W' = W + (alpha / r) * (B_torch @ A_torch).T for a Flax (in, out) kernel, in float64."""
    tree = lora_tree()
    ll.to_peft(tmp_path, tree, CONFIG, NAMES)
    tensors = {k: v.astype(np.float64) for k, v in load_file(tmp_path / WEIGHTS).items()}
    module = "base_model.model.encoder.layer.0.attention.self.value"
    w = np.asarray(base_params()["params"]["layer_0"]["value"]["kernel"], np.float64)
    delta = (3 / 2) * tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
    merged = ll.merge(tree)["params"]["layer_0"]["value"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged, np.float64), w + delta.T, rtol=1e-5, atol=1e-6)


def test_callable_name_map_and_default_name_map(tmp_path):
    config = ll.LoraConfig(rank=2, targets="query")
    tree = ll.init(base_params(), config, key=KEY)
    ll.to_peft(tmp_path, tree, config, default_name_map)
    keys = set(load_file(tmp_path / WEIGHTS))
    assert "base_model.model.layer_0.query.lora_A.weight" in keys
    chex.assert_trees_all_close(
        ll.from_peft(tmp_path, base_params(), default_name_map),
        tree,
        rtol=1e-5,
        atol=1e-6,
    )


def test_layouts_peft_cannot_express_and_unmapped_leaves_raise(tmp_path):
    params = {
        "stacked": {"kernel": jnp.ones((3, 8, 8))},
        "middle": {"kernel": jnp.ones((8, 3, 8))},
        "general": {"kernel": jnp.ones((8, 2, 4))},
        "dense": {"kernel": jnp.ones((8, 8))},
        "plain": {"kernel": jnp.ones((8, 8))},
    }
    config = ll.LoraConfig(
        rank=2,
        targets=("stacked", "middle", "general", "dense", "plain"),
        axes={
            "stacked": ("stack", "in", "out"),
            "middle": ("in", "stack", "out"),
            "general": ("in", "out", "out"),
        },
    )
    tree = ll.init(params, config, key=KEY)
    names = {"stacked": "s", "middle": "m.{layer}", "general": "g", "plain": "p.{layer}"}
    with pytest.raises(ValueError) as err:
        ll.to_peft(tmp_path, tree, config, names)
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        "  dense/kernel: the name map gives no PyTorch module",
        "  general/kernel: a weight with axis roles ('in', 'out', 'out') has no PEFT equivalent; "
        "PEFT's LoRA holds 2-D Linear and Embedding weights, one per layer (stack layers along "
        "the leading axis, reshape multi-axis kernels to 2-D)",
        "  middle/kernel: a weight with axis roles ('in', 'stack', 'out') has no PEFT equivalent; "
        "PEFT's LoRA holds 2-D Linear and Embedding weights, one per layer (stack layers along "
        "the leading axis, reshape multi-axis kernels to 2-D)",
        "  plain/kernel: the name map gives the per-layer template 'p.{layer}', but its layout "
        "has no stack axis",
        "  stacked/kernel: stacked along its leading (layer) axis, but the name map gives 's', "
        "not a per-layer template with {layer} (e.g. 'model.layers.{layer}.mlp')",
    ]


def test_from_peft_lists_every_problem(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    base = base_params()
    base["params"]["layer_0"]["query"]["kernel"] = jnp.ones((8, 5))
    del base["params"]["classifier"]
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, base, NAMES)
    message = str(err.value)
    assert (
        "encoder.layer.0.attention.self.query: lora_A.weight (2, 8) and lora_B.weight (8, 2) "
        "adapt a weight of (d_in, d_out) = (8, 8); the base leaf params/layer_0/query/kernel "
        "is float32[8, 5]"
    ) in message
    assert "classifier.weight: maps to no base leaf" in message
    assert "classifier.bias: maps to no base leaf" in message


def test_from_peft_refuses_pickle_and_unsupported_variants(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="never the pickled"):
        ll.from_peft(tmp_path, base_params(), NAMES)
    save_file({}, tmp_path / WEIGHTS)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "lora_bias": True, "r": 2, "lora_alpha": 2})
    )
    with pytest.raises(ValueError, match="lora_bias"):
        ll.from_peft(tmp_path, base_params(), NAMES)


def test_experiments_bert_name_map_gives_peft_s_bert_module_names(tmp_path):
    """The shipped MiniLM/BERT name map, on the experiments' Flax BERT (tiny, random)."""
    from experiments.models import bert
    from experiments.models.bert_peft import peft_name_map

    config = bert.BertConfig(
        vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
        max_positions=16,
    )  # fmt: skip
    ids, mask = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
    params = bert.BertEncoder(config).init(KEY, ids, mask)
    lora_config = ll.LoraConfig(rank=2, alpha=4, targets=("query", "value"))
    tree = randomize_b(ll.init(params, lora_config, key=KEY), jax.random.key(1))
    ll.to_peft(tmp_path, tree, lora_config, peft_name_map())
    # The names of transformers' BertModel modules, written out by hand.
    modules = [
        f"encoder.layer.{i}.attention.self.{proj}" for i in (0, 1) for proj in ("query", "value")
    ]
    expected = {}
    for module in modules:
        expected[f"base_model.model.{module}.lora_A.weight"] = (2, 16)  # (r, in)
        expected[f"base_model.model.{module}.lora_B.weight"] = (16, 2)  # (out, r)
    tensors = load_file(tmp_path / WEIGHTS)
    assert {k: v.shape for k, v in tensors.items()} == expected
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["target_modules"] == sorted(modules)
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, params, peft_name_map()), tree, strict=True)


INTEROP = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


@pytest.mark.skipif(not INTEROP, reason="needs torch, transformers and peft (make interop)")
def test_peft_bert_with_the_exported_adapter_matches_lorax_lite(tmp_path):
    import peft
    import torch
    import transformers

    from experiments.models import bert
    from experiments.models.bert_peft import peft_name_map

    hf_config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    torch_model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    config = bert.BertConfig.from_hf(hf_config.to_dict())
    params = {"params": bert.from_torch(state, config)}

    lora_config = ll.LoraConfig(
        rank=2, alpha=4, targets=("query", "value", "word_embeddings"), bias="lora_only"
    )
    tree = randomize_b(ll.init(params, lora_config, key=KEY), jax.random.key(1))
    shift = lambda node: ll.Trainable(node.value + 0.1) if isinstance(node, ll.Trainable) else node
    tree = jax.tree_util.tree_map(shift, tree, is_leaf=lambda x: isinstance(x, ll.Trainable))
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 7)).astype(np.int32)
    mask = np.ones((2, 7), bool)
    expected = ll.lora(bert.BertEncoder(config).apply)(tree, ids, mask)

    ll.to_peft(tmp_path, tree, lora_config, peft_name_map())
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
        ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        got = peft_model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()
    baseline = bert.BertEncoder(config).apply(params, ids, mask)
    # The adapters and the trained biases change the output; PEFT must load them all.
    assert np.abs(np.asarray(expected) - np.asarray(baseline)).max() > 1e-2
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)


def _tiny_bert():
    """A random 2-layer transformers BertModel and the experiments' Flax BERT with its
    weights, and a batch."""
    import torch
    import transformers

    from experiments.models import bert

    hf_config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    torch_model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    config = bert.BertConfig.from_hf(hf_config.to_dict())
    params = {"params": bert.from_torch(state, config)}
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 7)).astype(np.int32)
    return torch_model, bert.BertEncoder(config), params, ids, np.ones((2, 7), bool)


def _peft_output(peft_model, ids, mask):
    import torch

    with torch.no_grad():
        ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        return peft_model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()


@pytest.mark.skipif(not INTEROP, reason="needs torch, transformers and peft (make interop)")
def test_peft_dora_export_matches_lorax_lite(tmp_path):
    """A trained DoRA adapter (non-zero B, m moved off ||W||) loaded by PEFT's
    DoRA layers gives lorax_lite's output."""
    import peft

    from experiments.models.bert_peft import peft_name_map

    torch_model, model, params, ids, mask = _tiny_bert()
    config = ll.LoraConfig(rank=2, alpha=4, targets=("query", "value"), use_dora=True)
    tree = randomize_b(ll.init(params, config, key=KEY), jax.random.key(1))
    grow = lambda n: dataclasses.replace(n, m=n.m * 1.3)
    tree = jax.tree_util.tree_map(
        lambda n: grow(n) if isinstance(n, ll.LoraWeight) else n, tree, is_leaf=is_lora_node
    )
    expected = ll.lora(model.apply)(tree, ids, mask)
    ll.to_peft(tmp_path, tree, config, peft_name_map())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    got = _peft_output(peft_model, ids, mask)
    baseline = model.apply(params, ids, mask)
    assert np.abs(np.asarray(expected) - np.asarray(baseline)).max() > 1e-2
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTEROP, reason="needs torch, transformers and peft (make interop)")
def test_peft_made_dora_adapter_reads_into_lorax_lite(tmp_path):
    """PEFT builds the DoRA adapter (random B, its own lora_magnitude_vector, then
    scaled): from_peft reads it and lorax_lite's output equals PEFT's."""
    import peft
    import torch

    from experiments.models.bert_peft import peft_name_map

    torch_model, model, params, ids, mask = _tiny_bert()
    peft_config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True,
        init_lora_weights=False,
    )  # fmt: skip
    peft_model = peft.get_peft_model(torch_model, peft_config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
    got = _peft_output(peft_model, ids, mask)
    peft_model.save_pretrained(str(tmp_path))
    tree = ll.from_peft(tmp_path, params, peft_name_map())
    query = tree["params"]["layer_0"]["attention"]["query"]["kernel"]
    assert query.m.shape == (16,) and query.detach_norm
    np.testing.assert_allclose(
        np.asarray(ll.lora(model.apply)(tree, ids, mask)), got, atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------- collisions and bad files


def test_to_peft_refuses_two_leaves_on_one_module_and_writes_nothing(tmp_path):
    names = {**NAMES, "params/layer_1/query": NAMES["params/layer_0/query"]}
    with pytest.raises(ValueError) as err:
        ll.to_peft(tmp_path / "out", lora_tree(), CONFIG, names)
    message = str(err.value)
    module = "encoder.layer.0.attention.self.query"
    assert (
        f"{module}: the name map sends the adapters of params/layer_0/query/kernel and "
        "params/layer_1/query/kernel to this one PyTorch module"
    ) in message
    # bias="lora_only": both biases would be written to one tensor too.
    assert (
        f"base_model.model.{module}.base_layer.bias: both params/layer_0/query/bias and "
        "params/layer_1/query/bias map to this PyTorch tensor"
    ) in message
    assert not (tmp_path / "out").exists()


def test_from_peft_refuses_two_leaves_on_one_module(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    names = {**NAMES, "params/layer_1/value": NAMES["params/layer_0/value"]}
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, base_params(), names)
    assert (
        "encoder.layer.0.attention.self.value: the name map sends "
        "params/layer_0/value/kernel and params/layer_1/value/kernel to this one PyTorch module"
    ) in str(err.value)
    assert "params/layer_0/value/bias and params/layer_1/value/bias" in str(err.value)


def test_from_peft_refuses_two_tensors_on_one_leaf(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    module = "base_model.model.encoder.layer.0.attention.self.query"
    edit_peft(tmp_path, tensors=lambda t: {**t, f"{module}.bias": t[f"{module}.base_layer.bias"]})
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, base_params(), NAMES)
    assert (
        "encoder.layer.0.attention.self.query.bias and "
        "encoder.layer.0.attention.self.query.base_layer.bias both map to the base leaf "
        "params/layer_0/query/bias"
    ) in str(err.value)


def edit_peft(directory, *, config=None, tensors=None):
    """Rewrites a PEFT directory's config and tensors through the given functions. The
    tensors are written again without to_peft's header, as PEFT writes them: an edited
    config is then read as a foreign file's, not as a mix of two exports."""
    if config is not None:
        tensors = tensors or (lambda t: t)
        path = directory / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(directory / WEIGHTS)), directory / WEIGHTS)


def from_peft_error(directory, params=None, names=NAMES) -> str:
    with pytest.raises(ValueError) as err:
        ll.from_peft(directory, base_params() if params is None else params, names)
    return str(err.value)


BAD_FIELDS = {
    "peft_type": ("LOHA", 'peft_type: expected "LORA", found "LOHA"'),
    "r": (0, "r: expected an int >= 1, found 0"),
    "lora_alpha": (None, "lora_alpha: expected a finite number > 0, found nothing"),
    "lora_dropout": (2.0, "lora_dropout: expected a number in [0, 1), found 2.0"),
    "use_rslora": ("yes", 'use_rslora: expected true or false, found "yes"'),
    "fan_in_fan_out": (1, "fan_in_fan_out: expected true or false, found 1"),
    "use_dora": ("yes", 'use_dora: expected true or false, found "yes"'),
    "layer_replication": ([[0, 1]], "layer_replication: expected null"),
    "bias": ("some", 'bias: expected "none", "all" or "lora_only", found "some"'),
    "rank_pattern": ({"query": 0, "(": 2}, 'rank_pattern["query"]: expected an int >= 1'),
    "alpha_pattern": ([3], "alpha_pattern: expected a JSON object {regex: value}, found [3]"),
    "target_modules": (5, "target_modules: expected a list of module names or a regex, found 5"),
    "modules_to_save": ("classifier", "modules_to_save: expected a list of module names"),
    "init_lora_weights": ("pissa_niter_4", 'found "pissa_niter_4", which trains on a modified'),
}


def test_from_peft_lists_every_bad_config_field(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)

    def corrupt(config):
        config = {**config, **{k: v for k, (v, _) in BAD_FIELDS.items()}}
        del config["lora_alpha"]  # was a KeyError
        return config

    edit_peft(tmp_path, config=corrupt)
    text = from_peft_error(tmp_path)
    assert text.startswith(f"{tmp_path / 'adapter_config.json'}: invalid or unsupported fields")
    for _, expected in BAD_FIELDS.values():
        assert expected in text
    assert 'rank_pattern["("]: expected a valid regex' in text
    assert len(text.splitlines()) == len(BAD_FIELDS) + 2  # header, and both rank_pattern keys


# A catastrophic regex for Python's backtracking re: exponential time on a long module name.
HOSTILE = "([a-z_.0-9]+)+x"


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules"])
def test_a_catastrophic_regex_in_the_config_is_matched_without_hanging(tmp_path, field):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    if field == "target_modules":
        hostile = lambda c: {**c, field: f"{HOSTILE}|.*(query|value|word_embeddings)"}
    else:  # tried first, matching nothing: the file's own keys decide
        hostile = lambda c: {**c, field: {HOSTILE: 4, **c[field]}}
    edit_peft(tmp_path, config=hostile)
    with deadline(20):
        read = ll.from_peft(tmp_path, base_params(), NAMES)
    chex.assert_trees_all_equal(read, lora_tree(), strict=True)


@pytest.mark.parametrize(
    "key, construct",
    [
        ("(?=q)query", "the group '(?=q'"),
        (r"(q)\1", r"the escape \1"),
        ("q*+", "a possessive quantifier"),
    ],
)
def test_a_regex_construct_that_needs_backtracking_is_refused_by_name(tmp_path, key, construct):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    edit_peft(tmp_path, config=lambda c: {**c, "rank_pattern": {key: 4}})
    message = from_peft_error(tmp_path)
    assert f"rank_pattern[{json.dumps(key)}]: expected a valid regex ({construct}" in message


def test_to_peft_never_matches_the_config_s_alpha_patterns(tmp_path):
    """A config read from a checkpoint (lorax-lite export-peft) may hold a hostile pattern:
    the alphas come from the adapters' scales, so it is never matched."""
    config = dataclasses.replace(CONFIG, alpha_pattern={"([a-z_/0-9]+)+x": 1, "value": 3})
    with deadline(20):
        ll.to_peft(tmp_path, lora_tree(), config, NAMES)
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, base_params(), NAMES), lora_tree())


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"[1, 2]", "expected a JSON object, found an array"),
        (b'{"r": 2', "not UTF-8 JSON (JSONDecodeError"),
        (b'{"r": "\xff"}', "not UTF-8 JSON (UnicodeDecodeError"),
    ],
    ids=["list", "truncated", "latin-1"],
)
def test_from_peft_refuses_config_files_that_are_no_json_object(tmp_path, content, expected):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    (tmp_path / "adapter_config.json").write_bytes(content)
    assert from_peft_error(tmp_path).startswith(f"{tmp_path / 'adapter_config.json'}: {expected}")


def test_from_peft_refuses_a_weights_file_that_is_no_safetensors(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    text = from_peft_error(tmp_path)
    assert text.startswith(f"{tmp_path / WEIGHTS}: not a readable safetensors file")


def single_adapter(tmp_path, a, b, kernel_shape, **config):
    """A PEFT directory with one adapter on module ``proj``, and a base with its kernel."""
    tensors = {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b}
    save_file(tensors, tmp_path / WEIGHTS)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"], **config}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return {"params": {"proj": {"kernel": jnp.ones(kernel_shape)}}}


NAMES_PROJ = {"params/proj": "proj"}


def test_from_peft_refuses_factors_of_the_transposed_weight(tmp_path):
    """A 16 -> 8 adapter (A (r, 16), B (8, r)) does not land on an 8 -> 16 kernel (8, 16)."""
    a, b = np.ones((2, 16), np.float32), np.ones((8, 2), np.float32)
    params = single_adapter(tmp_path, a, b, (8, 16))
    text = from_peft_error(tmp_path, params, NAMES_PROJ)
    assert (
        "proj: lora_A.weight (2, 16) and lora_B.weight (8, 2) adapt a weight of "
        "(d_in, d_out) = (16, 8); the base leaf params/proj/kernel is float32[8, 16] "
        "(a transposed (out, in) weight)"
    ) in text
    # The same factors on the (16, 8) kernel they describe load.
    params = single_adapter(tmp_path, a, b, (16, 8))
    node = ll.from_peft(tmp_path, params, NAMES_PROJ)["params"]["proj"]["kernel"]
    assert node.layout == ll.Layout.dense() and node.a.shape == (16, 2)


def test_from_peft_checks_factor_dtypes_values_and_ranks(tmp_path):
    ones = lambda *shape, dtype=np.float32: np.ones(shape, dtype)
    a = ones(3, 8)
    a[0, 0] = np.nan
    tensors = {
        "base_model.model.p0.lora_A.weight": ones(2, 8, dtype=np.int32),
        "base_model.model.p0.lora_B.weight": ones(8, 2),
        "base_model.model.p1.lora_A.weight": a,
        "base_model.model.p1.lora_B.weight": ones(8, 3),
        "base_model.model.p2.lora_A.weight": ones(3, 8),  # r is 2
        "base_model.model.p2.lora_B.weight": ones(8, 3),
        "base_model.model.p3.lora_A.weight": ones(2, 8),  # rank_pattern gives 4
        "base_model.model.p3.lora_B.weight": ones(8, 2),
        "base_model.model.p4.lora_A.weight": ones(2, 8),  # not in target_modules
        "base_model.model.p4.lora_B.weight": ones(8, 2),
        "base_model.model.p5.lora_B.weight": ones(8, 2),  # no lora_A
        "base_model.model.p6.lora_A.weight": ones(2, 8, dtype=jnp.bfloat16),  # fine
        "base_model.model.p6.lora_B.weight": ones(8, 2, dtype=np.float16),
    }
    save_file(tensors, tmp_path / WEIGHTS)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"p3": 4}}
    config["target_modules"] = ["p0", "p1", "p2", "p3", "p5", "p6"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    params = {f"p{i}": {"kernel": jnp.ones((8, 8))} for i in range(7)}
    names = {f"p{i}": f"p{i}" for i in range(7)}
    text = from_peft_error(tmp_path, params, names)
    expected = [
        "p0.lora_A.weight: dtype int32, expected a floating dtype",
        "p1.lora_A.weight: holds 1 NaN or inf values, expected finite",
        "p2.lora_A.weight: rank 3 (shape (3, 8)), adapter_config.json's r gives 2",
        "p2.lora_B.weight: rank 3 (shape (8, 3)), adapter_config.json's r gives 2",
        "p3.lora_A.weight: rank 2 (shape (2, 8)), adapter_config.json's "
        'rank_pattern["p3"] gives 4',
        "p4: has lora_A.weight/lora_B.weight but is not in adapter_config.json's target_modules",
        "p5.lora_B.weight: lora_B.weight without lora_A.weight",
    ]
    for line in expected:
        assert line in text
    assert "\n  p6" not in text
    assert len(text.splitlines()) == 1 + len(expected) + 1  # p3's lora_B too
    # Without the bad modules the half-precision factors load as they are.
    for i in range(6):
        tensors = {k: v for k, v in tensors.items() if f".p{i}." not in k}
    save_file(tensors, tmp_path / WEIGHTS)
    node = ll.from_peft(tmp_path, params, names)["p6"]["kernel"]
    assert (node.a.dtype, node.b.dtype) == (jnp.bfloat16, jnp.float16)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["adapter_config.json", WEIGHTS]),
    where=st.floats(0, 1, exclude_max=True),
    byte=st.integers(0, 255),
    truncate=st.booleans(),
)
def test_a_corrupted_peft_file_loads_or_raises_value_error(tmp_path, name, where, byte, truncate):
    """PEFT files carry no checksum, so a changed number may load; anything else that is
    wrong raises ValueError, never another exception (KeyError, SafetensorError, ...)."""
    directory = tmp_path / f"{name}-{where}-{byte}-{truncate}"
    ll.to_peft(directory, lora_tree(), CONFIG, NAMES)
    data = bytearray((directory / name).read_bytes())
    position = int(where * len(data))
    if truncate:
        del data[position:]
    else:
        data[position] = byte
    (directory / name).write_bytes(bytes(data))
    try:
        tree = ll.from_peft(directory, base_params(), NAMES)
    except ValueError:
        return
    kinds = lambda tree: [(p, type(n)) for p, n in named_leaves(tree, is_leaf=is_lora_node)]
    assert kinds(tree) == kinds(lora_tree())  # scales may differ: alpha is a number in the file


def test_a_failed_export_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorax_lite.peft.write.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ll.to_peft(
            tmp_path,
            lora_tree(ll.LoraConfig(rank=1, targets="query")),
            name_map=NAMES,
            overwrite=True,
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file
    chex.assert_trees_all_equal(
        ll.from_peft(tmp_path, base_params(), NAMES), lora_tree(), strict=True
    )


def _export_in_a_subprocess(directory, seed, kill_after=None) -> int:
    worker = pathlib.Path(__file__).with_name("checkpoint_worker.py")
    command = [sys.executable, str(worker), "export-peft", str(directory), str(seed)]
    return subprocess.run(command + ([kill_after] if kill_after else []), timeout=300).returncode


def _exported(seed):
    return worker.big_adapter(seed, worker.peft_config(seed))


@pytest.mark.parametrize(
    "kill_after, survivor",
    [  # killed right after: the new tensors written, the old export moved aside, the new
        # one renamed in, the old one renamed to be deleted (before the fix: between the
        # tensors' and the config's renames, new tensors read at the old scale)
        (WEIGHTS, 1),
        ("lorax-lite-old", 1),
        ("PATH", 2),
        ("lorax-lite-trash", 2),
    ],
    ids=["tensors written", "old moved aside", "new moved in", "old about to be deleted"],
)
def test_sigkill_at_each_step_of_a_re_export_leaves_one_whole_export(
    tmp_path, kill_after, survivor
):
    path = tmp_path / "peft"
    ll.to_peft(path, _exported(1), worker.peft_config(1), default_name_map)
    (path / "README.md").write_text("a model card")
    kill_after = str(path) if kill_after == "PATH" else kill_after
    assert _export_in_a_subprocess(path, 2, kill_after) == -signal.SIGKILL
    read = ll.from_peft(path, worker.big_base(), default_name_map)
    chex.assert_trees_all_equal(read, _exported(survivor), strict=True)
    # The next export recovers, keeps the other files and leaves no hidden sibling.
    ll.to_peft(path, _exported(3), worker.peft_config(3), default_name_map, overwrite=True)
    assert os.listdir(tmp_path) == ["peft"]
    assert (path / "README.md").read_text() == "a model card"
    read = ll.from_peft(path, worker.big_base(), default_name_map)
    chex.assert_trees_all_equal(read, _exported(3), strict=True)


def test_from_peft_refuses_the_tensors_of_one_export_with_the_config_of_another(tmp_path):
    for seed in (1, 2):
        export = _exported(seed), worker.peft_config(seed)
        ll.to_peft(tmp_path / str(seed), *export, default_name_map)
    shutil.copy(tmp_path / "2" / WEIGHTS, tmp_path / "1" / WEIGHTS)
    with pytest.raises(ValueError, match="the directory mixes two exports") as err:
        ll.from_peft(tmp_path / "1", worker.big_base(), default_name_map)
    assert f"{WEIGHTS} was written with another adapter_config.json" in str(err.value)
    # A PEFT-written file has no such header: the same pair, written without it, loads.
    edit_peft(tmp_path / "1", tensors=lambda t: t)
    read = ll.from_peft(tmp_path / "1", worker.big_base(), default_name_map)
    assert read["dense_0"]["kernel"].scale == 1.0 / 64  # the config's alpha, the other's factors


# ---------------------------------------------------------------- scanned (stacked) layers


class ScanBlock(nn.Module):
    """A residual MLP layer, 8 -> 12 -> 8, with biases (scanned below)."""

    @nn.compact
    def __call__(self, x, _):
        h = jnp.tanh(nn.Dense(12, name="up")(x))
        return x + nn.Dense(8, name="down")(h), None


class Scanned(nn.Module):
    """An input projection, three layers in one ``nn.scan``, and a head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        layers = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(2, name="head")(x)


SCAN_X = jax.random.normal(jax.random.key(2), (4, 5))
SCAN_NAMES = {
    "params/embed": "embed",
    "params/layers/up": "layers.{layer}.up",
    "params/layers/down": "layers.{layer}.down",
    "params/head": "head",
}
SCAN_CONFIG = ll.LoraConfig(
    rank=2,
    alpha=4,
    targets=("embed", "up", "down"),
    rank_pattern={"down": 3},
    alpha_pattern={"up": 6},
    train=("head",),
    bias="lora_only",
)


def scanned_tree(config=SCAN_CONFIG):
    model = Scanned()
    params = model.init(KEY, SCAN_X)
    tree = ll.init(params, config, key=jax.random.key(3), fn=model.apply, args=(SCAN_X,))
    tree = randomize_b(tree, jax.random.key(4))
    shift = lambda node: ll.Trainable(node.value + 0.1) if isinstance(node, ll.Trainable) else node
    return params, jax.tree_util.tree_map(shift, tree, is_leaf=is_lora_node)


def test_scanned_layers_round_trip_bit_exactly_through_per_layer_modules(tmp_path):
    params, tree = scanned_tree()
    up = tree["params"]["layers"]["up"]["kernel"]
    assert up.layout.stack == (0,) and up.a.shape == (3, 8, 2)  # init saw the scan
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)
    back = ll.from_peft(tmp_path, params, SCAN_NAMES)
    chex.assert_trees_all_equal(back, tree, strict=True)
    assert back["params"]["layers"]["up"]["kernel"].layout == up.layout
    apply = jax.jit(ll.lora(Scanned().apply))
    np.testing.assert_array_equal(np.asarray(apply(back, SCAN_X)), np.asarray(apply(tree, SCAN_X)))
    # The adapters and the trained biases change the output, so the check above has teeth.
    assert np.abs(np.asarray(apply(tree, SCAN_X) - Scanned().apply(params, SCAN_X))).max() > 1e-2


def test_dora_adapters_of_scanned_layers_round_trip_bit_exactly_with_m_per_layer(tmp_path):
    """DoRA's magnitude follows the layers: layer i's lora_magnitude_vector is m[i] (each
    layer's m moved off ||W_i|| differently, so a whole, shared or misplaced m shows), and
    from_peft stacks the vectors back into m."""
    config = dataclasses.replace(SCAN_CONFIG, use_dora=True)
    params, tree = scanned_tree(config)
    rng = np.random.default_rng(5)

    def move_m(node):
        if not isinstance(node, ll.LoraWeight):
            return node
        factor = jnp.asarray(1 + 0.2 * rng.standard_normal(node.m.shape), node.m.dtype)
        return dataclasses.replace(node, m=node.m * factor)

    tree = jax.tree_util.tree_map(move_m, tree, is_leaf=is_lora_node)
    up = tree["params"]["layers"]["up"]["kernel"]
    assert up.layout.stack == (0,) and up.m.shape == (3, 12)
    ll.to_peft(tmp_path, tree, config, SCAN_NAMES)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(tmp_path / WEIGHTS)
    magnitude = "lora_magnitude_vector"
    np.testing.assert_array_equal(
        tensors[f"base_model.model.embed.{magnitude}"], tree["params"]["embed"]["kernel"].m
    )
    for proj, d_out in (("up", 12), ("down", 8)):
        m = np.asarray(tree["params"]["layers"][proj]["kernel"].m)
        assert not np.array_equal(m[0], m[1])
        for i in range(3):
            vector = tensors[f"base_model.model.layers.{i}.{proj}.{magnitude}"]
            assert vector.shape == (d_out,)
            np.testing.assert_array_equal(vector, m[i])
    assert sum(k.endswith(magnitude) for k in tensors) == 7
    back = ll.from_peft(tmp_path, params, SCAN_NAMES)
    chex.assert_trees_all_equal(back, tree, strict=True)  # m included: DoRA nodes flatten it
    assert back["params"]["layers"]["up"]["kernel"].m.shape == (3, 12)
    apply = jax.jit(ll.lora(Scanned().apply))
    np.testing.assert_array_equal(np.asarray(apply(back, SCAN_X)), np.asarray(apply(tree, SCAN_X)))
    # m changes the output, so the check above has teeth.
    unmoved = scanned_tree(config)[1]
    assert np.abs(np.asarray(apply(tree, SCAN_X) - apply(unmoved, SCAN_X))).max() > 1e-2


def test_scanned_layers_are_written_as_peft_s_per_layer_modules(tmp_path):
    """Each layer's tensors are PEFT's: W_i + (alpha / r) * (B_i @ A_i).T equals lorax_lite's
    merged layer i in float64; ranks and alphas are per-layer patterns."""
    params, tree = scanned_tree()
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)
    tensors = {k: v.astype(np.float64) for k, v in load_file(tmp_path / WEIGHTS).items()}
    expected = {"base_model.model.embed.lora_A.weight": (2, 5)}
    expected["base_model.model.embed.lora_B.weight"] = (8, 2)
    expected["base_model.model.embed.base_layer.bias"] = (8,)
    expected |= {"base_model.model.head.weight": (2, 8), "base_model.model.head.bias": (2,)}
    for i in range(3):
        for proj, (d_in, d_out, rank) in {"up": (8, 12, 2), "down": (12, 8, 3)}.items():
            module = f"base_model.model.layers.{i}.{proj}"
            expected[f"{module}.lora_A.weight"] = (rank, d_in)
            expected[f"{module}.lora_B.weight"] = (d_out, rank)
            expected[f"{module}.base_layer.bias"] = (d_out,)
    assert {k: v.shape for k, v in tensors.items()} == expected
    merged = ll.merge(tree)["params"]["layers"]
    for proj, alpha, rank in (("up", 6, 2), ("down", 4, 3)):
        w = np.asarray(params["params"]["layers"][proj]["kernel"], np.float64)
        bias = np.asarray(tree["params"]["layers"][proj]["bias"].value)
        for i in range(3):
            module = f"base_model.model.layers.{i}.{proj}"
            delta = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
            np.testing.assert_allclose(
                np.asarray(merged[proj]["kernel"][i], np.float64),
                w[i] + alpha / rank * delta.T,
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_array_equal(tensors[f"{module}.base_layer.bias"], bias[i])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    layer_modules = [f"layers.{i}.{p}" for i in range(3) for p in ("up", "down")]
    assert config["target_modules"] == sorted(["embed", *layer_modules])
    assert config["rank_pattern"] == {rf"layers\.{i}\.down": 3 for i in range(3)}
    assert config["alpha_pattern"] == {rf"layers\.{i}\.up": 6 for i in range(3)}


def test_a_callable_name_map_may_return_layer_templates(tmp_path):
    params, tree = scanned_tree()
    names = lambda path: SCAN_NAMES[path.rpartition("/")[0]]  # KeyError: not mapped
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, names)
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, params, names), tree, strict=True)


def drop_layer(tensors, module):
    return {k: v for k, v in tensors.items() if f".{module}." not in k}


def test_from_peft_names_the_missing_layers_of_a_stack(tmp_path):
    params, tree = scanned_tree()
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)
    edit_peft(tmp_path, tensors=lambda t: drop_layer(drop_layer(t, "layers.0.up"), "layers.2.up"))
    text = from_peft_error(tmp_path, params, SCAN_NAMES)
    lines = text.splitlines()[1:]
    assert lines == [
        "  params/layers/up/kernel: stacks 3 layers, but 2 of their modules have no tensors: "
        "layers.0.up, layers.2.up (expected every layer)",
        "  params/layers/up/bias: stacks 3 layers, but 2 of their modules have no tensors: "
        "layers.0.up, layers.2.up (expected every layer)",
    ]


def test_from_peft_names_the_layer_whose_rank_or_alpha_differs(tmp_path):
    params, tree = scanned_tree()
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)
    module = "base_model.model.layers.1.up"

    def rank_4(tensors):
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        tensors[f"{module}.lora_A.weight"] = np.concatenate([a, a])
        tensors[f"{module}.lora_B.weight"] = np.concatenate([b, b], axis=1)
        return tensors

    patterns = lambda c: {**c, "rank_pattern": {**c["rank_pattern"], r"layers\.1\.up": 4}}
    edit_peft(tmp_path, config=patterns, tensors=rank_4)
    text = from_peft_error(tmp_path, params, SCAN_NAMES)
    assert text.splitlines()[1:] == [
        "  params/layers/up/kernel: its layers must share one rank; rank 2 in 2 layers, but "
        "rank 4 in layers.1.up"
    ]
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES, overwrite=True)
    alphas = lambda c: {**c, "alpha_pattern": {r"layers\.2\.up": 3, "up": 6}}
    edit_peft(tmp_path, config=alphas)
    text = from_peft_error(tmp_path, params, SCAN_NAMES)
    assert text.splitlines()[1:] == [
        "  params/layers/up/kernel: its layers must share one scale; scale 3.0 in 2 layers, "
        "but scale 1.5 in layers.2.up"
    ]
    # The same per-layer patterns, equal across the layers, read back as one stack.
    alphas = lambda c: {**c, "alpha_pattern": {rf"layers\.{i}\.up": 6 for i in range(3)}}
    edit_peft(tmp_path, config=alphas)
    chex.assert_trees_all_equal(ll.from_peft(tmp_path, params, SCAN_NAMES), tree, strict=True)


def test_from_peft_refuses_a_stack_of_adapters_and_trained_weights(tmp_path):
    params, tree = scanned_tree()
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)

    def trained_layer_1(tensors):
        tensors = drop_layer(tensors, "layers.1.up")
        tensors["base_model.model.layers.1.up.weight"] = np.ones((12, 8), np.float32)
        return tensors

    edit_peft(tmp_path, tensors=trained_layer_1)
    text = from_peft_error(tmp_path, params, SCAN_NAMES)
    assert text.splitlines()[1:] == [
        "  params/layers/up/kernel: its layers must all be adapters or all trained in full; "
        "LoraWeight in 2 layers, but Trainable in layers.1.up",
        "  params/layers/up/bias: stacks 3 layers, but 1 of their modules have no tensors: "
        "layers.1.up (expected every layer)",
    ]


def test_from_peft_refuses_a_layer_template_on_a_leaf_without_axes(tmp_path):
    params, tree = scanned_tree()
    ll.to_peft(tmp_path, tree, SCAN_CONFIG, SCAN_NAMES)
    params = {**params, "step": jnp.zeros(())}
    text = from_peft_error(tmp_path, params, {**SCAN_NAMES, "step": "step.{layer}"})
    assert text.splitlines()[1:] == [
        "  step: the name map gives the per-layer template 'step.{layer}', but the leaf has no axes"
    ]


def test_the_command_line_exports_scanned_layers_with_a_json_template_map(tmp_path):
    from lorax_lite.cli import main

    params, tree = scanned_tree()
    ll.save_adapter(tmp_path / "adapter", tree, SCAN_CONFIG)
    (tmp_path / "names.json").write_text(json.dumps(SCAN_NAMES))
    args = ["export-peft", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]
    assert main([*args, "--name-map", str(tmp_path / "names.json")]) == 0
    chex.assert_trees_all_equal(
        ll.from_peft(tmp_path / "peft", params, SCAN_NAMES), tree, strict=True
    )


def test_an_export_is_the_same_bytes_every_time(tmp_path):
    """The tensors' header metadata is written sorted (safetensors writes hash-map order,
    which differs from one call to the next)."""
    for i in range(6):
        ll.to_peft(tmp_path / str(i), lora_tree(), CONFIG, NAMES)
    files = {(tmp_path / str(i) / "adapter_model.safetensors").read_bytes() for i in range(6)}
    assert len(files) == 1
