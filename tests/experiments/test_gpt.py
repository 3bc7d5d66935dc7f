"""The Flax GPT-2 of experiments/models: shapes, causality, scan/unrolled/remat equivalence."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models.gpt import (
    GPT,
    causal_lm_loss,
    count_params,
    make_config,
    random_params,
    stack_layers,
)

CONFIG = make_config("tiny", max_len=32, scan=False)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def unrolled():
    """Parameters of the unrolled tiny model (blocks ``h_0``, ``h_1``), drawn in numpy."""
    return random_params(CONFIG, 0, std=0.05)


def test_random_params_have_the_structure_and_dtypes_of_init():
    config = dataclasses.replace(CONFIG, scan=True, lora_rank=2, lora_alpha=4.0)
    params = random_params(config, 1)
    expected = jax.eval_shape(GPT(config).init, jax.random.key(0), TOKENS)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]
    assert shapes(params) == shapes(expected)
    inner = params["params"]
    assert abs(float(inner["ln_f"]["scale"].mean()) - 1.0) < 0.02
    assert abs(float(inner["wte"]["embedding"].std()) - 0.02) < 0.002
    assert float(jnp.abs(inner["h"]["mlp"]["c_fc"]["lora_b"]).max()) > 0


@functools.cache
def _jitted_apply(config):
    return jax.jit(GPT(config).apply)


def _apply(config, params, tokens=TOKENS):
    return _jitted_apply(config)(params, tokens)


def test_shapes_names_and_parameter_count(unrolled):
    scanned = stack_layers(unrolled, CONFIG.n_layer)
    shapes = jax.tree_util.tree_map(jnp.shape, scanned["params"])
    d, n = CONFIG.d_model, CONFIG.n_layer
    assert shapes["h"]["attn"]["c_attn"]["kernel"] == (n, d, 3 * d)
    assert shapes["h"]["attn"]["c_proj"]["kernel"] == (n, d, d)
    assert shapes["h"]["mlp"]["c_fc"]["kernel"] == (n, d, 4 * d)
    assert shapes["h"]["mlp"]["c_proj"]["kernel"] == (n, 4 * d, d)
    assert shapes["lm_head"] == {"kernel": (d, CONFIG.vocab_size)}
    assert sum(x.size for x in jax.tree_util.tree_leaves(unrolled)) == count_params(CONFIG)
    logits = _apply(CONFIG, unrolled)
    assert logits.shape == (*TOKENS.shape, CONFIG.vocab_size) and logits.dtype == jnp.float32


def test_changing_a_future_token_leaves_past_logits_unchanged(unrolled):
    changed = TOKENS.at[:, 10].set((TOKENS[:, 10] + 1) % CONFIG.vocab_size)
    before, after = _apply(CONFIG, unrolled), _apply(CONFIG, unrolled, changed)
    np.testing.assert_array_equal(np.asarray(before[:, :10]), np.asarray(after[:, :10]))
    assert np.abs(np.asarray(before[:, 10:] - after[:, 10:])).min(axis=-1).max() > 0


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_matches_unrolled_blocks(unrolled, remat):
    scanned = dataclasses.replace(CONFIG, scan=True, remat=remat)
    expected = _apply(CONFIG, unrolled)
    actual = _apply(scanned, stack_layers(unrolled, CONFIG.n_layer))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_flat_tokens_is_the_same_function(unrolled):
    flat = dataclasses.replace(CONFIG, scan=True, flat_tokens=True)
    actual = _apply(flat, stack_layers(unrolled, CONFIG.n_layer))
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(_apply(CONFIG, unrolled)), rtol=1e-5, atol=1e-5
    )


def test_scan_init_has_the_unrolled_structure_stacked(unrolled):
    scanned = dataclasses.replace(CONFIG, scan=True)
    shapes = jax.eval_shape(GPT(scanned).init, jax.random.key(0), TOKENS)
    expected = jax.eval_shape(lambda p: stack_layers(p, CONFIG.n_layer), unrolled)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_leaves(shapes) == jax.tree_util.tree_leaves(expected)


def test_bfloat16_compute_stays_close_to_float32(unrolled):
    logits = _apply(dataclasses.replace(CONFIG, dtype="bfloat16"), unrolled)
    reference = np.asarray(_apply(CONFIG, unrolled))
    assert logits.dtype == jnp.bfloat16
    err = np.abs(np.asarray(logits, np.float32) - reference).max()
    assert err < 0.05 * np.abs(reference).max()


def test_inline_lora_equals_the_merged_dense_weight_in_float64(unrolled):
    rank, alpha = 4, 8.0
    config = dataclasses.replace(CONFIG, lora_rank=rank, lora_alpha=alpha)
    params = _with_random_b(random_params(config, 0, std=0.05), 0)
    actual = _apply(config, params)
    np.testing.assert_allclose(
        np.asarray(actual),
        np.asarray(_apply(CONFIG, _merged(params, alpha / rank))),
        rtol=1e-4,
        atol=1e-5,
    )
    assert np.abs(np.asarray(actual - _apply(CONFIG, unrolled))).max() > 1e-2


def _with_random_b(tree, seed):
    """Every ``lora_b`` drawn normal (std 0.1), so that the adapters matter."""
    rng = np.random.default_rng(seed)

    def visit(node):
        if "lora_b" in node:
            return {**node, "lora_b": jnp.asarray(rng.normal(0, 0.1, node["lora_b"].shape))}
        return {k: visit(v) if isinstance(v, dict) else v for k, v in node.items()}

    return visit(tree)


def _merged(tree, scale):
    """Plain Dense parameters ``w + scale * A @ B`` (float64 product), for the plain GPT."""
    if "lora_a" in tree:
        a, b = np.asarray(tree["lora_a"], np.float64), np.asarray(tree["lora_b"], np.float64)
        w = np.asarray(tree["kernel"], np.float64) + scale * a @ b
        return {"kernel": jnp.asarray(w, jnp.float32), "bias": tree["bias"]}
    return {k: _merged(v, scale) if isinstance(v, dict) else v for k, v in tree.items()}


def test_causal_lm_loss_matches_numpy():
    logits = jax.random.normal(jax.random.key(3), (2, 5, 7))
    tokens = jax.random.randint(jax.random.key(4), (2, 5), 0, 7)
    x = np.asarray(logits, np.float64)[:, :-1]
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    t = np.asarray(tokens)[:, 1:]
    expected = -np.take_along_axis(logp, t[..., None], -1).mean()
    np.testing.assert_allclose(float(jax.jit(causal_lm_loss)(logits, tokens)), expected, rtol=1e-6)


def test_dropout_only_in_training(unrolled):
    config = dataclasses.replace(CONFIG, dropout=0.5)
    model = GPT(config)
    run = jax.jit(model.apply, static_argnames="deterministic")
    key = lambda i: {"dropout": jax.random.key(i)}
    eval_out = run(unrolled, TOKENS, deterministic=True)
    np.testing.assert_allclose(
        np.asarray(eval_out), np.asarray(_apply(CONFIG, unrolled)), rtol=1e-6, atol=1e-6
    )
    a = run(unrolled, TOKENS, deterministic=False, rngs=key(0))
    b = run(unrolled, TOKENS, deterministic=False, rngs=key(1))
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError, match="unknown GPT config 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="not a multiple of n_head=5(.|\n)*attention must be"):
        make_config("tiny", n_head=5, attention="flash")


def test_tied_head_equals_an_untied_head_holding_the_embedding_transposed(unrolled):
    tied = dataclasses.replace(CONFIG, tie_head=True)
    inner = {k: v for k, v in unrolled["params"].items() if k != "lm_head"}
    assert sum(x.size for x in jax.tree_util.tree_leaves(inner)) == count_params(tied)
    untied = {**inner, "lm_head": {"kernel": inner["wte"]["embedding"].T}}
    np.testing.assert_allclose(
        np.asarray(_apply(tied, {"params": inner})),
        np.asarray(_apply(CONFIG, {"params": untied})),
        rtol=1e-5,
        atol=1e-6,
    )
