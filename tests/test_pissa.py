"""PiSSA and OLoRA: adapters from the weight's SVD / QR, the base replaced by the residual.

At step 0 the model is unchanged: ``residual + s A B == W`` to float32 rounding, checked
in float64 for Dense, DenseGeneral (multi-axis kernels) and a scanned stack. The factors
are checked against numpy's float64 SVD and QR, the randomized SVD against the exact one.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import IDS, SEQ, Block, ScanModel, dense_reference

import lorax_lite as ll
from lorax_lite.decompose import randomized_svd, residual_init

INITS = [("pissa", None), ("pissa", 4), ("olora", None)]
INIT_IDS = ["pissa", "pissa-niter4", "olora"]
MODELS = {"transformer-block": (Block(), IDS), "scan-stack": (ScanModel(), SEQ)}


def low_rank_plus_noise(shape, rank, seed, noise=1e-3):
    """``U diag(s) V^T`` with decaying singular values ``10 / (1 + k)``, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    *stack, m, n = shape
    u = np.linalg.qr(rng.normal(size=(*stack, m, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(*stack, n, rank)))[0]
    s = 10.0 / (1.0 + np.arange(rank))
    return (u * s) @ np.swapaxes(v, -1, -2) + noise * rng.normal(size=shape)


def lora_tree(name, init, niter, **extra):
    module, make_input = MODELS[name]
    x = make_input()
    params = module.init(jax.random.key(0), x)
    config = ll.LoraConfig(rank=2, alpha=6.0, init=init, pissa_niter=niter, **extra)
    return (
        module,
        x,
        params,
        ll.init(params, config, key=jax.random.key(1), fn=module.apply, args=(x,)),
    )


def adapters(tree):
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=is_lora) if is_lora(n)]


@pytest.mark.parametrize(("init", "niter"), INITS, ids=INIT_IDS)
@pytest.mark.parametrize("name", MODELS)
def test_step_zero_model_is_unchanged(name, init, niter):
    """Merged in float64, residual + s A B equals each original weight to float32
    rounding; the model's output through lora(fn) equals the original model's."""
    module, x, params, tree = lora_tree(name, init, niter)
    nodes = adapters(tree)
    layouts = {n.layout for n in nodes}
    if name == "scan-stack":
        assert any(layout.stack for layout in layouts)  # the stacked kernels
    else:
        assert any(len(layout.fan_out) > 1 or len(layout.fan_in) > 1 for layout in layouts)
    originals = _original_weights(params, tree)
    for path, node in _named_adapters(tree):
        w = np.asarray(originals[path], np.float64)
        merged = dense_reference(node)
        assert np.abs(merged - w).max() <= 4e-7 * np.abs(w).max(), path
        # The adapter carries a real share of the weight (the residual is not W).
        assert np.abs(np.asarray(node.w, np.float64) - w).max() > 0.01 * np.abs(w).max(), path
    out = ll.lora(module.apply, strict=True)(tree, x)
    np.testing.assert_allclose(out, module.apply(params, x), rtol=1e-5, atol=1e-5)


def _named_adapters(tree):
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)[0]
    return [(jax.tree_util.keystr(p), n) for p, n in flat if is_lora(n)]


def _original_weights(params, tree):
    is_lora = lambda n: isinstance(n, ll.LoraWeight)
    flat_tree = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)[0]
    flat_params = jax.tree_util.tree_leaves(params)
    return {jax.tree_util.keystr(p): w for (p, _), w in zip(flat_tree, flat_params)}


def test_pissa_factors_are_the_top_singular_triplets_split_evenly():
    """PEFT's split: A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T. So s A B is the
    best rank-r approximation, A's columns and B's rows have equal norms, and the
    residual's singular values are the rest of W's."""
    w = low_rank_plus_noise((24, 18), 6, 0).astype(np.float32)
    rank, scale = 4, 2.5
    a, b, residual = residual_init(
        jnp.asarray(w), ll.Layout.dense(), rank, scale, init="pissa", dtype=jnp.float32
    )
    u, s, vh = np.linalg.svd(w.astype(np.float64))
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(scale * a64 @ b64, best, atol=2e-5 * np.abs(best).max())
    np.testing.assert_allclose(np.linalg.norm(a64, axis=0), np.sqrt(s[:rank] / scale), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b64, axis=1), np.sqrt(s[:rank] / scale), rtol=1e-5)
    rest = np.linalg.svd(np.asarray(residual, np.float64), compute_uv=False)[: 18 - rank]
    np.testing.assert_allclose(rest, s[rank:], atol=1e-5)


def test_olora_factors_come_from_the_qr_of_w_transposed():
    """PEFT's OLoRA on the (out, in) weight W^T = Q R: A = R_r^T, B = Q_r^T; B's rows are
    orthonormal and s A B = s (Q_r R_r)^T, compared with numpy's float64 QR."""
    w = np.random.default_rng(1).normal(size=(10, 7)).astype(np.float32)
    rank, scale = 3, 2.0
    a, b, residual = residual_init(
        jnp.asarray(w), ll.Layout.dense(), rank, scale, init="olora", dtype=jnp.float32
    )
    q, r = np.linalg.qr(w.T.astype(np.float64))
    expected = scale * (q[:, :rank] @ r[:rank]).T
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(scale * a64 @ b64, expected, atol=1e-5)
    np.testing.assert_allclose(b64 @ b64.T, np.eye(rank), atol=1e-6)
    np.testing.assert_allclose(np.abs(a64.T), np.abs(r[:rank]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(residual, np.float64), w - expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(200, 150), (3, 120, 90)], ids=["matrix", "stack"])
def test_randomized_svd_matches_the_exact_one_on_low_rank_plus_noise(shape):
    """Rank-8 signal plus 1e-3 noise, rank 8 asked: the singular values within 1e-4
    relative and the approximation error within 1% of the optimal one from 2 power
    iterations on; the plain range finder (0 iterations) is the least accurate."""
    m = low_rank_plus_noise(shape, 8, 2)
    rank = 8
    s_exact = np.linalg.svd(m, compute_uv=False)[..., :rank]
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    optimal = np.linalg.norm(m - (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :])
    errors = {}
    for niter in (0, 2, 4):
        u, s, vh = randomized_svd(
            jnp.asarray(m, jnp.float32), rank, niter=niter, key=jax.random.key(5)
        )
        u, s, vh = (np.asarray(x, np.float64) for x in (u, s, vh))
        errors[niter] = np.linalg.norm(m - (u * s[..., None, :]) @ vh)
        if niter >= 2:
            np.testing.assert_allclose(s, s_exact, rtol=1e-4)
            assert errors[niter] <= 1.01 * optimal, (niter, errors[niter], optimal)
    assert errors[0] >= errors[4]
    assert u.shape == (*shape[:-1], rank) and vh.shape == (*shape[:-2], rank, shape[-1])


def test_randomized_pissa_differs_by_key_and_is_reproducible():
    w = jnp.asarray(low_rank_plus_noise((40, 30), 10, 3, noise=0.5), jnp.float32)
    run = lambda key: residual_init(
        w, ll.Layout.dense(), 4, 1.0, init="pissa", dtype=jnp.float32, niter=0, key=key
    )
    first, again, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(first[2], again[2])
    assert np.abs(np.asarray(first[2]) - np.asarray(other[2])).max() > 0
    with pytest.raises(ValueError, match="needs a key"):
        residual_init(w, ll.Layout.dense(), 4, 1.0, init="pissa", dtype=jnp.float32, niter=1)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_quantized_base_holds_the_quantized_residual(kind, init):
    """init(..., quantization=kind) quantizes the residual (QPiSSA): the model at step 0 is
    the original up to the residual's quantization error. For PiSSA on a weight with a
    few large directions that error is below quantizing W itself (the residual's range
    is smaller); OLoRA's is reported as is, at most twice quantizing W's."""
    w = low_rank_plus_noise((64, 48), 4, 4, noise=0.05).astype(np.float32)
    config = ll.LoraConfig(rank=4, alpha=4.0, targets="k", init=init)
    tree = ll.init({"k": jnp.asarray(w)}, config, key=jax.random.key(0), quantization=kind)
    node = tree["k"]
    assert isinstance(node.w, ll.QuantizedWeight) and node.w.kind == kind
    merged = np.asarray(ll.merge(tree)["k"], np.float64)
    float_tree = ll.init({"k": jnp.asarray(w)}, config, key=jax.random.key(0))
    residual = np.asarray(float_tree["k"].w, np.float64)
    dequantized = np.asarray(node.w.dequantize(), np.float64)
    np.testing.assert_allclose(
        merged, dense_reference(dataclasses.replace(node, w=dequantized)), atol=1e-5
    )
    err = np.abs(merged - w).max()
    assert err == pytest.approx(np.abs(dequantized - residual).max(), rel=1e-3, abs=1e-6)
    plain = ll.quantize(
        ll.init(
            {"k": jnp.asarray(w)},
            dataclasses.replace(config, init="kaiming"),
            key=jax.random.key(0),
        ),
        kind=kind,
    )
    plain_err = np.abs(np.asarray(plain["k"].w.dequantize(), np.float64) - w).max()
    assert err > 0
    if init == "pissa":
        assert err < 0.5 * plain_err, (err, plain_err)
    else:
        assert err < 2 * plain_err, (err, plain_err)


def test_saved_adapter_refuses_the_original_base_and_loads_onto_the_residual(tmp_path):
    module, x, params, tree = lora_tree("transformer-block", "pissa", None)
    config = ll.LoraConfig(rank=2, alpha=6.0, init="pissa")
    trained = _one_adam_step(module, x, tree)
    ll.save_adapter(tmp_path / "adapter", trained, config)
    residual_base = ll.partition(trained)[1]
    loaded = ll.load_adapter(tmp_path / "adapter", residual_base)
    apply = ll.lora(module.apply)
    np.testing.assert_array_equal(apply(loaded, x), apply(trained, x))
    with pytest.raises(ValueError, match="content fingerprint mismatch") as err:
        ll.load_adapter(tmp_path / "adapter", params)
    assert "init='pissa'" in str(err.value) and "residual" in str(err.value)
    # ll.init with the same config and key rebuilds the residual base bit for bit.
    again = ll.init(params, config, key=jax.random.key(1), fn=module.apply, args=(x,))
    reloaded = ll.load_adapter(tmp_path / "adapter", ll.partition(again)[1])
    np.testing.assert_array_equal(apply(reloaded, x), apply(trained, x))


@pytest.mark.parametrize("check_base", [True, False])
def test_the_residual_recipe_loads_with_a_fully_trained_head(tmp_path, check_base):
    """The frozen partition holds Trainable(None) at a trained leaf: the saved value fills it."""
    module, x, _, tree = lora_tree(
        "scan-stack",
        "pissa",
        None,
        targets=("ScanCheckpointLayer_0/.*",),
        train=("params/Dense_0",),
    )
    config = ll.LoraConfig(
        rank=2,
        alpha=6.0,
        init="pissa",
        targets=("ScanCheckpointLayer_0/.*",),
        train=("params/Dense_0",),
    )
    trained = _one_adam_step(module, x, tree)
    ll.save_adapter(tmp_path / "adapter", trained, config)
    residual_base = ll.partition(trained)[1]
    assert residual_base["params"]["Dense_0"]["kernel"] == ll.Trainable(None)
    loaded = ll.load_adapter(tmp_path / "adapter", residual_base, check_base=check_base)
    chex.assert_trees_all_equal(loaded, trained)
    apply = ll.lora(module.apply)
    np.testing.assert_array_equal(apply(loaded, x), apply(trained, x))


def _one_adam_step(module, x, tree):
    trainable, frozen = ll.partition(tree)
    loss = lambda t: jnp.mean(ll.lora(module.apply)(ll.combine(t, frozen), x) ** 2)
    tx = ll.optimizer(optax.adam(1e-2))
    updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable), trainable)
    return ll.combine(optax.apply_updates(trainable, updates), frozen)


def test_to_peft_refuses_residual_base_adapters(tmp_path):
    _, _, _, tree = lora_tree("transformer-block", "olora", None)
    config = ll.LoraConfig(rank=2, alpha=6.0, init="olora")
    with pytest.raises(ValueError, match="init='olora'.*residual"):
        ll.to_peft(tmp_path / "peft", tree, config, lambda path: path.replace("/", "."))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(init="svd"), "init must be one of"),
        (dict(init="kaiming", pissa_niter=2), "pissa_niter is for init='pissa'"),
        (dict(init="pissa", pissa_niter=-1), "pissa_niter must be None or an int >= 0"),
        (dict(init="pissa", pissa_niter=2.5), "pissa_niter must be None or an int >= 0"),
    ],
)
def test_config_validates_the_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ll.LoraConfig(**kwargs)


def test_config_round_trips_the_init():
    config = ll.LoraConfig(init="pissa", pissa_niter=np.int64(4))
    assert config.pissa_niter == 4 and type(config.pissa_niter) is int
    assert ll.LoraConfig.from_dict(config.to_dict()) == config


PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))


@pytest.mark.skipif(not PEFT, reason="needs torch and peft (make interop)")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft(init):
    """PEFT's PiSSA/OLoRA init of a torch Linear: our A, B are its lora_A^T, lora_B^T
    (up to the sign of each singular/QR pair) and our residual its base weight^T."""
    import peft
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9, bias=False))
    w = model[0].weight.detach().numpy().T.copy()  # (in, out), as a Flax kernel
    rank, alpha = 3, 6
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init)
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model[0]
    peft_a = layer.lora_A["default"].weight.detach().numpy().T
    peft_b = layer.lora_B["default"].weight.detach().numpy().T
    peft_residual = layer.base_layer.weight.detach().numpy().T

    ours = ll.init(
        {"k": jnp.asarray(w)},
        ll.LoraConfig(rank=rank, alpha=alpha, targets="k", init=init),
        key=jax.random.key(0),
    )["k"]
    np.testing.assert_allclose(np.asarray(ours.w), peft_residual, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(ours.a)), np.abs(peft_a), atol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(ours.b)), np.abs(peft_b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.a) @ np.asarray(ours.b), peft_a @ peft_b, atol=1e-5)


def test_init_refuses_weights_without_values():
    """Shape stand-ins have no values to decompose: every such leaf is named (a
    `QuantizedWeight` already in the tree is refused the same way)."""
    params = {"q": jax.ShapeDtypeStruct((8, 4), jnp.float32), "k": jnp.ones((8, 4))}
    config = ll.LoraConfig(rank=2, targets=("q", "k"), init="olora")
    with pytest.raises(ValueError, match=r"q: init='olora' decomposes the weight's values") as e:
        ll.init(params, config, key=jax.random.key(0))
    assert "ShapeDtypeStruct" in str(e.value) and "\n  k:" not in str(e.value)
    kaiming = ll.init(params, dataclasses.replace(config, init="kaiming"), key=jax.random.key(0))
    assert kaiming["q"].a.shape == (8, 2)
