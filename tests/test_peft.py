"""The PEFT format: round trips, PEFT's key names and shapes, and (optionally) PEFT itself."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_allclose, assert_trees_equal, randomize_b
from safetensors.numpy import load_file, save_file

import lorax_lite as ll
from lorax_lite.peft import default_name_map

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
    assert_trees_equal(ll.from_peft(tmp_path, base_params(), NAMES), tree)


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
    assert_trees_allclose(ll.from_peft(tmp_path, base_params(), default_name_map), tree)


def test_layouts_peft_cannot_express_and_unmapped_leaves_raise(tmp_path):
    params = {
        "stacked": {"kernel": jnp.ones((3, 8, 8))},
        "general": {"kernel": jnp.ones((8, 2, 4))},
        "dense": {"kernel": jnp.ones((8, 8))},
    }
    config = ll.LoraConfig(
        rank=2,
        targets=("stacked", "general", "dense"),
        axes={"stacked": ("stack", "in", "out"), "general": ("in", "out", "out")},
    )
    tree = ll.init(params, config, key=KEY)
    with pytest.raises(ValueError) as err:
        ll.to_peft(tmp_path, tree, config, {"stacked": "s", "general": "g"})
    message = str(err.value)
    assert "stacked/kernel: a weight with axis roles ('stack', 'in', 'out')" in message
    assert "general/kernel: a weight with axis roles ('in', 'out', 'out')" in message
    assert "dense/kernel: the name map gives no PyTorch module" in message


def test_from_peft_lists_every_problem(tmp_path):
    ll.to_peft(tmp_path, lora_tree(), CONFIG, NAMES)
    base = base_params()
    base["params"]["layer_0"]["query"]["kernel"] = jnp.ones((8, 5))
    del base["params"]["classifier"]
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, base, NAMES)
    message = str(err.value)
    assert "encoder.layer.0.attention.self.query: factors for a (8, 8) torch weight" in message
    assert "classifier.weight: maps to no base leaf" in message
    assert "classifier.bias: maps to no base leaf" in message


def test_from_peft_refuses_pickle_and_unsupported_variants(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="never the pickled"):
        ll.from_peft(tmp_path, base_params(), NAMES)
    save_file({}, tmp_path / WEIGHTS)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True, "r": 2, "lora_alpha": 2})
    )
    with pytest.raises(ValueError, match="use_dora"):
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
    assert_trees_equal(ll.from_peft(tmp_path, params, peft_name_map()), tree)


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
