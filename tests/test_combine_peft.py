"""combine_adapters' pruning merges (ties, dare_linear, dare_ties, magnitude_prune)
against PEFT 0.21's add_weighted_adapter on the same adapters, DARE with a fixed mask."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll

PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
NAMES, RANK, ALPHAS = ("x", "y", "z"), 4, (8.0, 4.0, 12.0)
SHAPES = {"0": (12, 10), "1": (10, 7)}  # (in, out) of two Linear layers


def fixed_mask(x, density):
    """A keep mask that is a function of the values alone, so that PEFT (patched) and
    lorax_lite drop the same entries of the same factor, in either layout."""
    return (abs(x) * 997.0) % 1.0 < density


def _factors(seed=0):
    """Per adapter and layer ``(A (in, r), B (r, out))``, B non-zero."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            layer: (rng.normal(size=(i, RANK)).astype(np.float32),
                    rng.normal(size=(RANK, o)).astype(np.float32))
            for layer, (i, o) in SHAPES.items()
        }
        for name in NAMES
    }  # fmt: skip


def _ours(factors, bases, weights, **kwargs):
    trees = {
        name: {
            layer: ll.LoraWeight(jnp.asarray(bases[layer]), jnp.asarray(a), jnp.asarray(b),
                                 alpha / RANK)
            for layer, (a, b) in factors[name].items()
        }
        for name, alpha in zip(NAMES, ALPHAS)
    }  # fmt: skip
    return ll.combine_adapters(trees, weights, **kwargs)


def _peft(factors, bases, weights, monkeypatch, **kwargs):
    import peft
    import torch
    from peft.utils import merge_utils

    def random_pruning(tensor, density, rescale):  # PEFT's, with the fixed mask
        pruned = tensor * fixed_mask(tensor, density).to(tensor.dtype)
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in SHAPES.values()]
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for layer, key in zip(layers, SHAPES):
            layer.weight.copy_(torch.from_numpy(bases[key].T))
    for name, alpha in zip(NAMES, ALPHAS):
        config = peft.LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(SHAPES))
        if name == NAMES[0]:
            model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            for key, (a, b) in factors[name].items():
                module = model.base_model.model[int(key)]
                module.lora_A[name].weight.copy_(torch.from_numpy(a.T))
                module.lora_B[name].weight.copy_(torch.from_numpy(b.T))
    model.add_weighted_adapter(list(weights), list(weights.values()), "merged", **kwargs)
    out = {}
    for key in SHAPES:
        module = model.base_model.model[int(key)]
        assert module.scaling["merged"] == 1.0
        out[key] = (module.lora_A["merged"].weight.detach().numpy().T,
                    module.lora_B["merged"].weight.detach().numpy().T)  # fmt: skip
    return out


CASES = [
    ("ties", 0.5, "total"),
    ("ties", 0.3, "frequency"),
    ("dare_linear", 0.6, "total"),
    ("dare_ties", 0.5, "total"),
    ("dare_ties", 0.7, "frequency"),
    ("magnitude_prune", 0.4, "total"),
    ("magnitude_prune", 1.0, "total"),
]


@pytest.mark.slow
@pytest.mark.skipif(not PEFT, reason="needs torch and peft (make interop)")
@pytest.mark.parametrize("method, density, sign_method", CASES)
def test_pruning_merges_equal_peft(method, density, sign_method, monkeypatch):
    factors = _factors()
    rng = np.random.default_rng(1)
    bases = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    weights = {"x": 0.7, "y": -0.4, "z": 1.3}
    theirs = _peft(factors, bases, weights, monkeypatch, combination_type=method,
                   density=density, majority_sign_method=sign_method)  # fmt: skip
    ours = _ours(factors, bases, weights, method=method, density=density,
                 majority_sign_method=sign_method, dare_mask=fixed_mask)  # fmt: skip
    for key in SHAPES:
        node = ours.tree[key]
        assert node.scale == 1.0
        np.testing.assert_allclose(np.asarray(node.a), theirs[key][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(node.b), theirs[key][1], rtol=1e-5, atol=1e-6)
        assert 0 < float(ours.errors[key]) < 10  # approximate: not the weighted sum


def test_pruning_merges_check_their_options():
    factors, bases = _factors(), {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\], got None"):
        _ours(factors, bases, {"x": 1.0}, method="ties")
    with pytest.raises(ValueError, match="majority_sign_method must be"):
        _ours(factors, bases, {"x": 1.0}, method="ties", density=0.5, majority_sign_method="x")
    with pytest.raises(ValueError, match="DARE's random masks need key="):
        _ours(factors, bases, {"x": 1.0}, method="dare_linear", density=0.5)


def test_dare_with_a_key_keeps_about_density_and_rescales():
    """With a PRNG key, DARE keeps about ``density`` of each factor's entries, rescaled
    by ``1 / density``; at density 1 it is ``linear``."""
    factors = _factors(3)
    bases = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    one = _ours(factors, bases, {"x": 1.0}, method="dare_linear", density=0.5,
                key=jax.random.key(0))  # fmt: skip
    a = np.asarray(factors["x"]["0"][0]) * np.sqrt(ALPHAS[0] / RANK)
    got = np.asarray(one.tree["0"].a)
    kept = got != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(got[kept], a[kept] / 0.5, rtol=1e-5)
    full = _ours(factors, bases, {"x": 0.5, "y": 0.5}, method="dare_linear", density=1.0,
                 key=jax.random.key(0))  # fmt: skip
    linear = _ours(factors, bases, {"x": 0.5, "y": 0.5}, method="linear")
    np.testing.assert_allclose(full.tree["1"].b, linear.tree["1"].b, rtol=1e-6)
