"""Serving many adapters in generation: `AdapterSlots` and `ll.route` over a Llama's
key/value-cache decode step, against each sequence run alone on its merged weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll
from experiments.models import llama
from lorax_lite import AdapterSlots
from tests.helpers import all_eqns, randomize_b

CONFIG = llama.make_config("tiny")
MODEL = llama.Llama(CONFIG)
TOKENS = jnp.zeros((1, 8), jnp.int32)
PARAMS = MODEL.init(jax.random.key(0), TOKENS)
NEW_TOKENS = 6


def adapter(seed: int, rank: int, *, dora: bool = False, params=PARAMS, targets="all-linear"):
    """A LoRA tree of the tiny Llama with random B (so it changes the outputs)."""
    config = ll.LoraConfig(rank=rank, alpha=2 * rank, targets=targets, use_dora=dora)
    tree = ll.init(params, config, key=jax.random.key(seed), fn=MODEL.apply, args=(TOKENS,))
    tree = randomize_b(tree, jax.random.key(seed + 100), std=0.3)
    if dora:  # magnitudes away from the base norms, so DoRA differs from LoRA
        scale = lambda x: dataclasses.replace(x, m=x.m * 1.3) if isinstance(x, ll.LoraWeight) else x
        tree = jax.tree_util.tree_map(scale, tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight))
    return tree


def prompts(batch: int) -> jax.Array:
    return jax.random.randint(jax.random.key(7), (batch, 5), 0, CONFIG.vocab_size)


def solo(params, prompt_row) -> np.ndarray:
    """Greedy tokens of one sequence alone on plain weights (the reference)."""
    return llama.generate(CONFIG, params, prompt_row[None], max_new_tokens=NEW_TOKENS)[0]


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_mixed_batch_greedy_tokens_equal_solo_merged_runs(quantized):
    """Adapters of ranks 2, 4 and 8 (one DoRA) in slots of rank 8, the base (-1) and an
    empty slot in one batch: every row's greedy tokens and first logits are those of
    its sequence run alone with its adapter merged into the dense weight."""
    adapters = [adapter(1, 4), adapter(2, 8), adapter(3, 2, dora=True), adapter(4, 8)]
    if quantized:  # each quantizes the same base to the same codes
        adapters = [ll.quantize(t, kind="nf4", block=32) for t in adapters]
    slots = AdapterSlots.create(adapters[0], capacity=5, rank=8, dora=True)
    for slot, tree in enumerate(adapters):
        slots = slots.load(slot, tree)
    ids = np.array([0, 1, 2, -1, 3, 4, 2])  # slot 4 is empty: the base
    prompt = prompts(len(ids))
    out = llama.generate(CONFIG, slots, prompt, max_new_tokens=NEW_TOKENS, adapter_ids=ids)

    base = PARAMS
    if quantized:  # the dequantized base weights
        base = jax.tree_util.tree_map(
            lambda x: x.w.dequantize() if isinstance(x, ll.LoraWeight) else x,
            adapters[0],
            is_leaf=lambda x: isinstance(x, ll.LoraWeight),
        )
    plain = [ll.merge(t) for t in adapters]
    expected = np.stack(
        [solo(base if i in (-1, 4) else plain[i], prompt[r]) for r, i in enumerate(ids)]
    )
    np.testing.assert_array_equal(out, expected)
    # and the logits of the prompt's last position, to float32 agreement
    routed = jax.jit(ll.route(MODEL.apply))(slots, jnp.asarray(ids), prompt)[:, -1]
    for r, i in enumerate(ids):
        want = llama.forward(CONFIG, base if i in (-1, 4) else plain[i], prompt[r : r + 1])[0, -1]
        np.testing.assert_allclose(routed[r], want, rtol=2e-4, atol=2e-4)
    assert len({tuple(row) for row in expected}) >= 4  # the adapters make a difference


def test_load_replace_remove_do_not_recompile_the_step():
    """One compiled decode step serves every content of the slots: loading, replacing
    and removing adapters (of other ranks) adds no entry to its jit cache, and each
    change shows in the tokens."""
    step = llama.decode_step(CONFIG, routed=True)
    cache_entries = lambda: step._cache_size()  # one entry per compiled program

    def run(slots, ids):
        prompt = prompts(len(ids))
        cache = llama.init_cache(CONFIG, len(ids), 64)
        token, cache = step(slots, jnp.asarray(ids, jnp.int32), prompt, cache, 0, None)
        return np.asarray(token)

    a, b, c = adapter(1, 4), adapter(2, 8), adapter(3, 2)
    slots = AdapterSlots.create(a, capacity=3, rank=8).load(0, a)
    ids = [0, 1, 2, -1]
    before = run(slots, ids)
    size = cache_entries()
    slots = slots.load(1, b)
    after_load = run(slots, ids)
    slots = slots.load(0, c)  # replace, another rank
    after_replace = run(slots, ids)
    slots = slots.remove(1)
    after_remove = run(slots, ids)
    assert cache_entries() == size, "a slot change recompiled the decode step"
    assert (before[1] != after_load[1]).any() or (before[0] != after_replace[0]).any()
    # the tokens follow the slots' contents: each against a freshly built set
    for got, contents in [
        (after_load, {0: a, 1: b}),
        (after_replace, {0: c, 1: b}),
        (after_remove, {0: c}),
    ]:
        fresh = AdapterSlots.create(a, capacity=3, rank=8)
        for slot, tree in contents.items():
            fresh = fresh.load(slot, tree)
        np.testing.assert_array_equal(got, run(fresh, ids))
    np.testing.assert_array_equal(after_remove[1], run(slots, [-1] * 4)[1])  # emptied: the base


def test_load_donates_the_tables_and_writes_only_the_slot():
    a, b = adapter(1, 4), adapter(2, 8)
    slots = AdapterSlots.create(a, capacity=3, rank=8).load(0, a)
    old = slots.stacked["params"]["layers"]["mlp"]["up_proj"]["kernel"].a
    new_slots = slots.load(2, b)
    assert old.is_deleted()  # updated in place, not copied
    new = new_slots.stacked["params"]["layers"]["mlp"]["up_proj"]["kernel"].a
    mine = b["params"]["layers"]["mlp"]["up_proj"]["kernel"].a
    np.testing.assert_array_equal(new[2], mine)
    np.testing.assert_array_equal(
        new[0][..., :4], a["params"]["layers"]["mlp"]["up_proj"]["kernel"].a
    )
    assert not np.asarray(new[0][..., 4:]).any()  # rank 4 padded with zeros
    assert not np.asarray(new[1]).any()  # empty slot untouched


def test_errors_name_the_slot_the_leaf_and_the_rank():
    slots = AdapterSlots.create(adapter(1, 4), capacity=2, rank=4)
    with pytest.raises(IndexError, match=r"slot 2 outside \[0, 2\)"):
        slots.load(2, adapter(1, 4))
    with pytest.raises(IndexError, match=r"slot -1 outside"):
        slots.remove(-1)
    with pytest.raises(ValueError, match=r"q_proj/kernel: rank 8 above the set's rank 4"):
        slots.load(0, adapter(2, 8))
    other = MODEL.init(jax.random.key(1), TOKENS)
    with pytest.raises(ValueError, match=r"another base weight than the set's \(same shape"):
        slots.load(0, adapter(3, 4, params=other))
    with pytest.raises(ValueError, match=r"DoRA adapter; make the set with dora=True"):
        slots.load(0, adapter(4, 4, dora=True))
    wide = llama.Llama(dataclasses.replace(CONFIG, d_ff=256))
    wide_params = wide.init(jax.random.key(0), TOKENS)
    config = ll.LoraConfig(rank=4, targets="all-linear")
    wide_tree = ll.init(wide_params, config, key=jax.random.key(0), fn=wide.apply, args=(TOKENS,))
    trainable, _ = ll.partition(wide_tree)  # no base weights: checked by shapes
    with pytest.raises(ValueError, match=r"up_proj/kernel: factor shapes .* do not fit"):
        slots.load(0, trainable)
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1, got 0"):
        AdapterSlots.create(adapter(1, 4), capacity=0, rank=4)
    with pytest.raises(ValueError, match=r"template has no LoraWeight leaves"):
        AdapterSlots.create(PARAMS, capacity=2, rank=4)


def test_adapter_of_some_leaves_loads_as_a_tree_or_a_partition():
    """An adapter of the attention only fills the other slot leaves with zeros, loaded
    whole (its base checked) or as its trainable partition: its merged tokens."""
    tree = adapter(5, 4, targets=("q_proj", "v_proj"))
    slots = AdapterSlots.create(adapter(1, 4), capacity=2, rank=4)
    slots = slots.load(0, ll.partition(tree)[0]).load(1, tree)
    prompt = prompts(3)
    out = llama.generate(CONFIG, slots, prompt, max_new_tokens=NEW_TOKENS, adapter_ids=[1, 0, -1])
    merged = ll.merge(tree)
    np.testing.assert_array_equal(out[0], solo(merged, prompt[0]))
    np.testing.assert_array_equal(out[1], solo(merged, prompt[1]))
    np.testing.assert_array_equal(out[2], solo(PARAMS, prompt[2]))


def test_route_in_axes_maps_a_cache_on_its_batch_axis():
    """in_axes/out_axes: a (layers, batch, ...) cache and a shared start position."""
    a = adapter(1, 4)
    slots = AdapterSlots.create(a, capacity=1, rank=4).load(0, a)
    routed = ll.route(MODEL.apply, in_axes=(0, 1, None), out_axes=(0, 1))
    prompt = prompts(3)
    cache = llama.init_cache(CONFIG, 3, 16)
    ids = jnp.array([0, -1, 0])
    logits, cache = routed(slots, ids, prompt, cache, 0, method="decode")
    assert cache.k.shape == (CONFIG.n_layer, 3, 16, CONFIG.n_kv_head, CONFIG.head_dim)
    merged = ll.merge(a)
    for r, i in enumerate(ids):
        params = merged if i == 0 else PARAMS
        want, want_cache = MODEL.apply(
            params, prompt[r : r + 1], llama.init_cache(CONFIG, 1, 16), 0, method="decode"
        )
        np.testing.assert_allclose(logits[r], want[0], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(cache.k[:, r], want_cache.k[:, 0], rtol=2e-4, atol=2e-4)
    # The same axes counted from the end: the same outputs.
    negative = ll.route(MODEL.apply, in_axes=(-2, -4, None), out_axes=(-3, -4))
    fresh = llama.init_cache(CONFIG, 3, 16)
    logits_neg, cache_neg = negative(slots, ids, prompt, fresh, 0, method="decode")
    np.testing.assert_allclose(logits_neg, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cache_neg.k, cache.k, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one id per example"):
        routed(slots, jnp.array([0, 0]), prompt, cache, 0, method="decode")
    with pytest.raises(ValueError, match="in_axes has 2 entries for 3 batch arguments"):
        ll.route(MODEL.apply, in_axes=(0, 1))(slots, ids, prompt, cache, 0, method="decode")


def test_routed_decode_moves_no_cache_sized_array():
    """Each example's batch-of-one axis is made by reshapes outside the map: the routed
    decode step's program transposes nothing as large as the key/value cache (an
    expand_dims inside ``jax.vmap`` would move the examples' axis of the whole cache)."""
    a = adapter(1, 4)
    slots = AdapterSlots.create(a, capacity=2, rank=4).load(0, a)
    step = llama.decode_step(CONFIG, routed=True)
    cache = llama.init_cache(CONFIG, 4, 16)
    ids, tokens = jnp.array([0, 1, -1, 0]), jnp.zeros((4, 1), jnp.int32)
    jaxpr = jax.make_jaxpr(step)(slots, ids, tokens, cache, jnp.int32(3), None)
    moved = [
        eqn.outvars[0].aval.shape
        for eqn in all_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "transpose"
        and eqn.outvars[0].aval.size == cache.k.size
        and eqn.outvars[0].aval.ndim >= cache.k.ndim
    ]
    assert moved == [], f"whole-cache transposes: {moved}"
