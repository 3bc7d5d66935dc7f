"""Training and many-adapter floors over a quantized frozen base (QLoRA): every step kind
trains as over the dequantized float base, the codes never change or turn into floats,
FSDP splits a quantized weight as one unit, and AdapterSet/route/vmap_train_step share it."""

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import grad_and_temp_bytes

import lorax_lite as ll
from lorax_lite.targets import named_leaves

KINDS = ["int8", "nf4"]
BLOCK = 32
CONFIG = ll.LoraConfig(rank=2, alpha=4, targets=("hidden", "mid"), train=("head",))
ALSO = ("proj", "table")  # frozen plain leaves quantized too (blocked along their last axis)
TX = optax.adam(3e-2)
STEPS = 3
STEP_KINDS = ["pmap", "mesh 2x4", "mesh 2x4 fsdp", "accum 2", "mesh 2x4 fsdp accum 2"]


def is_quantized(x):
    return isinstance(x, ll.QuantizedWeight)


def model(params, x):
    h = jnp.tanh(x @ params["proj"] + params["table"][0])
    h = jnp.tanh(h @ params["hidden"]["kernel"])
    h = jnp.tanh(h @ params["mid"]["kernel"])
    return h @ params["head"]["kernel"]


def loss_fn(tree, batch, key):
    x, y = batch
    return jnp.mean((ll.lora(model)(tree, x, dropout_key=key) - y) ** 2)


@functools.cache
def base_params(seed=0):
    """The float base. Shapes chosen so that on 8 devices FSDP has every case: ``proj``
    splits its block-count axis, ``hidden`` and ``mid`` their output axis (``mid``'s
    in-block axis is as large or larger), ``table`` no axis (only its in-block one divides)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    return {
        "proj": normal(128, 32) / 8,
        "table": normal(2, 32) / 4,
        "hidden": {"kernel": normal(32, 64) / 5},
        "mid": {"kernel": normal(64, 16) / 6},
        "head": {"kernel": normal(16, 1) / 3},
    }


@functools.cache
def lora_tree(kind, seed=1, *, rank=2, double_quant=False):
    """The quantized LoRA tree, with non-zero B so that the adapters change the output."""
    config = dataclasses.replace(CONFIG, rank=rank, alpha=2 * rank)
    tree = ll.init(base_params(), config, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def nonzero_b(node):
        if isinstance(node, ll.LoraWeight):
            b = rng.normal(size=node.b.shape).astype(np.float32) * 0.3
            return dataclasses.replace(node, b=jnp.asarray(b))
        return node

    tree = jax.tree_util.tree_map(nonzero_b, tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight))
    return ll.quantize(tree, kind=kind, block=BLOCK, also=ALSO, double_quant=double_quant)


def dequantized(tree):
    """The same tree with every quantized weight replaced by its float values."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def quantized_leaves(tree):
    """``[(path, QuantizedWeight)]`` of a tree."""
    return [(p, x) for p, x in named_leaves(tree, is_leaf=is_quantized) if is_quantized(x)]


def batch(index, size=16):
    rng = np.random.default_rng(100 + index)
    x = rng.normal(size=(size, 128)).astype(np.float32)
    y = np.sin(x[:, :8].sum(axis=1, keepdims=True)).astype(np.float32)
    return x, y


def host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def build(step_kind, loss=loss_fn, **options):
    accum = 2 if "accum 2" in step_kind else 1
    if step_kind == "pmap":
        return ll.pmap_train_step(loss, TX, accum_steps=accum, **options)
    if step_kind.startswith("mesh"):
        sharding = "fsdp" if "fsdp" in step_kind else "replicated"
        mesh = jax.make_mesh((2, 4), ("data", "model"))
        return ll.sharded_train_step(
            loss, TX, mesh=mesh, base_sharding=sharding, accum_steps=accum, **options
        )
    return ll.train_step(loss, TX, accum_steps=accum, **options)


def host_batch(step_kind, index):
    return ll.shard_batch(batch(index), 8) if step_kind == "pmap" else batch(index)


def train(step_kind, tree):
    """``STEPS`` Adam steps: (trainable, frozen, opt_state, losses) on the host."""
    init, step = build(step_kind)
    state, losses = init(tree, jax.random.key(7)), []
    for i in range(STEPS):
        state, metrics = step(state, host_batch(step_kind, i))
        losses.append(float(metrics["loss"]))
    parts = (state.trainable, state.frozen, state.opt_state)
    if step_kind == "pmap":
        parts = ll.unreplicate(parts)
    return (*host(parts), losses)


@functools.cache
def float_reference(kind):
    """One-device training over the dequantized float base: what every quantized run
    must reproduce (lora over the codes equals lora over their float values)."""
    return train("one device", dequantized(lora_tree(kind)))


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_kind", ["one device", *STEP_KINDS])
def test_every_step_kind_trains_as_over_the_float_base(step_kind, kind):
    trainable, frozen, opt_state, losses = train(step_kind, lora_tree(kind))
    ref_trainable, _, _, ref_losses = float_reference(kind)
    chex.assert_trees_all_close(trainable, ref_trainable, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # The frozen codes, scales and their metadata are bit-identical after training.
    chex.assert_trees_all_equal(frozen, host(ll.partition(lora_tree(kind))[1]), strict=True)
    assert [p for p, _ in quantized_leaves(frozen)] == [
        "hidden/kernel/w",
        "mid/kernel/w",
        "proj",
        "table",
    ]
    # Adam's mu and nu for the adapters and the head, nothing for the base.
    moments = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x))
    assert moments == 2 * (2 * (32 + 64) + 2 * (64 + 16) + 16)  # A and B of rank 2, head


@pytest.mark.parametrize("kind", KINDS)
def test_training_moved_the_adapters(kind):
    """Guards the comparisons above against steps that update nothing."""
    trained = float_reference(kind)[0]
    start = host(ll.partition(lora_tree(kind))[0])
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), trained, start)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-3
    losses = float_reference(kind)[3]
    assert losses[-1] < losses[0]


# Under FSDP on 8 devices: the axis of ``data`` each quantized weight is split along.
FSDP_AXIS = {"proj": 0, "table": None, "hidden/kernel/w": 2, "mid/kernel/w": 2}


def full_spec(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_splits_a_quantized_weight_as_one_unit(kind):
    """Codes and scales split along the same axis, never the in-block one: each device
    holds whole blocks and exactly their scales. (The previous code split each array on
    its own: ``mid``'s codes along the in-block axis, its scales along the output axis.)"""
    init, _ = build("mesh 2x4 fsdp")
    state = init(lora_tree(kind), jax.random.key(7))
    placed = quantized_leaves(state.frozen)
    assert {p for p, _ in placed} == set(FSDP_AXIS)
    for path, q in placed:
        in_block = q.data.ndim + q.axis
        data_spec = full_spec(q.data.sharding.spec, q.data.ndim)
        assert data_spec == full_spec(q.scales.sharding.spec, q.scales.ndim), path
        split = [i for i, s in enumerate(data_spec) if s is not None]
        assert split == ([] if FSDP_AXIS[path] is None else [FSDP_AXIS[path]]), (path, data_spec)
        scales_by_device = {s.device: s for s in q.scales.addressable_shards}
        for shard in q.data.addressable_shards:
            assert shard.data.shape[in_block] == q.data.shape[in_block]  # whole blocks
            theirs = scales_by_device[shard.device].index
            for axis, (mine, scale) in enumerate(zip(shard.index, theirs)):
                if axis != in_block:  # the same blocks' scales on the same device
                    assert mine.indices(q.data.shape[axis]) == scale.indices(
                        q.scales.shape[axis]
                    ), path
        if split:
            assert q.data.addressable_shards[0].data.size * 8 == q.data.size


def test_fsdp_splits_double_quantized_scales_with_their_blocks():
    """Double-quantized scale codes split like the blocks they scale; their factors and
    offsets (a few per weight) are replicated. Training matches one device on the
    dequantized float base."""
    tree = lora_tree("nf4", double_quant=True)
    init, step = build("mesh 2x4 fsdp")
    state = init(tree, jax.random.key(7))
    placed = quantized_leaves(state.frozen)
    assert placed and all(q.double_quant for _, q in placed)
    for path, q in placed:
        data_spec = full_spec(q.data.sharding.spec, q.data.ndim)
        codes = q.scales.codes
        assert full_spec(codes.sharding.spec, codes.ndim) == data_spec, path
        assert q.scales.factors.sharding.is_fully_replicated, path
        assert q.scales.offsets.sharding.is_fully_replicated, path
    split = [p for p, q in placed if any(full_spec(q.data.sharding.spec, q.data.ndim))]
    assert split  # some weight is split across the devices
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, host_batch("mesh 2x4 fsdp", i))
        losses.append(float(metrics["loss"]))
    init1, step1 = build("one device")
    ref, ref_losses = init1(dequantized(tree), jax.random.key(7)), []
    for i in range(STEPS):
        ref, metrics = step1(ref, batch(i))
        ref_losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize("step_kind", ["one device", "pmap", "mesh 2x4 fsdp"])
def test_no_float_copy_of_a_quantized_weight_between_steps(step_kind):
    """After a step the state's base is still the integer codes, and the compiled step
    takes, donates and returns no float array shaped like a quantized weight."""
    tree = lora_tree("nf4")
    shapes = {q.shape for _, q in quantized_leaves(tree)}
    init, step = build(step_kind)
    state, _ = step(init(tree, jax.random.key(7)), host_batch(step_kind, 0))
    after = quantized_leaves(state.frozen)
    assert [p for p, _ in after] == [p for p, _ in quantized_leaves(tree)]
    for path, q in after:
        assert q.data.dtype == jnp.uint8 and q.kind == "nf4", path
    compiled = step.lower(state, host_batch(step_kind, 1)).compile()
    assert float_copies(compiled, shapes) == []

    # The check can fail: a state holding the dequantized base does pass float weights.
    control = init(dequantized(tree), jax.random.key(7))
    assert float_copies(step.lower(control, host_batch(step_kind, 1)).compile(), shapes)


def float_copies(compiled, shapes):
    """Float arguments and outputs of a compiled step whose trailing axes are one of
    ``shapes`` (pmap adds a leading device axis)."""
    avals = [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(compiled.args_info)]
    avals += [(o.shape, o.dtype) for o in jax.tree_util.tree_leaves(compiled.out_info)]
    return [
        (shape, dtype)
        for shape, dtype in avals
        if jnp.issubdtype(dtype, jnp.floating)
        and any(shape[len(shape) - len(s) :] == s for s in shapes if len(shape) >= len(s))
    ]


def test_cast_base_changes_the_dequantized_dtype_and_keeps_the_codes():
    tree = lora_tree("int8")
    cast = ll.cast_base(tree, jnp.bfloat16)
    before, after = quantized_leaves(tree), quantized_leaves(cast)
    assert [p for p, _ in after] == [p for p, _ in before] and len(after) == 4
    for (path, old), (_, new) in zip(before, after):
        chex.assert_trees_all_equal(
            (new.data, new.scales, new.offsets), (old.data, old.scales, old.offsets), strict=True
        )
        assert (new.kind, new.block, new.axis) == (old.kind, old.block, old.axis)
        assert new.dtype == jnp.bfloat16 and new.dequantize().dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(new.dequantize(), old.dequantize().astype(jnp.bfloat16))
    assert cast["mid"]["kernel"].a.dtype == cast["head"]["kernel"].value.dtype == jnp.float32
    # The model runs on the bf16 values: its output differs from the float32 one.
    x = batch(0)[0]
    f32, bf16 = ll.lora(model)(tree, x), ll.lora(model)(cast, x)
    assert 0 < float(jnp.abs(f32 - bf16).max()) < 0.1

    # On a state: the frozen part only, placed arrays kept as they are.
    init, step = build("mesh 2x4 fsdp")
    state = init(tree, jax.random.key(7))
    cast_state = ll.cast_base(state, jnp.bfloat16)
    for (_, old), (_, new) in zip(
        quantized_leaves(state.frozen), quantized_leaves(cast_state.frozen)
    ):
        assert new.data is old.data and new.scales is old.scales
        assert new.dtype == jnp.bfloat16
    assert cast_state.opt_state is state.opt_state
    cast_state, metrics = step(cast_state, batch(0))
    assert np.isfinite(float(metrics["loss"]))
    assert quantized_leaves(cast_state.frozen)[0][1].dtype == jnp.bfloat16


# --- many adapters ----------------------------------------------------------------------


def adapter_trees(kind):
    """Three adapters of one quantized base: ranks 2, 4, and one adapting ``hidden`` only."""
    only_hidden = dict(lora_tree(kind, 3))
    only_hidden["mid"] = {"kernel": only_hidden["mid"]["kernel"].w}
    return {"a": lora_tree(kind, 1), "b": lora_tree(kind, 2, rank=4), "c": only_hidden}


@functools.cache
def adapter_set(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the padding warning
        return ll.AdapterSet.from_trees(adapter_trees(kind), base=base_params())


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_set_shares_the_quantized_base(kind):
    adapters, trees = adapter_set(kind), adapter_trees(kind)
    # The set keeps the adapters' quantized weights (from_trees got the float base=).
    for (path, held), (_, own) in zip(
        quantized_leaves(adapters.frozen), quantized_leaves(trees["a"])
    ):
        assert held is own, path
    for name, tree in trees.items():
        chex.assert_trees_all_equal(adapters.get(name), tree, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the padding warning
        more = adapters.remove("b").add("b2", trees["b"])
    assert more.names == ("a", "c", "b2")
    chex.assert_trees_all_equal(more.get("b2"), trees["b"], strict=True)
    assert is_quantized(more.base()["mid"]["kernel"])
    # A combination keeps the shared quantized base and runs like its parts.
    combined = ll.combine_adapters(adapters, {"a": 1.0, "c": -1.0}, method="cat").tree
    assert combined["mid"]["kernel"].w is adapters.frozen["mid"]["kernel"].w
    x = batch(0, size=4)[0]
    expected = dequantized(trees["a"])
    node = expected["hidden"]["kernel"]
    c_delta = trees["c"]["hidden"]["kernel"].delta(jnp.float32)
    expected["hidden"]["kernel"] = dataclasses.replace(node, w=node.w - c_delta)
    np.testing.assert_allclose(
        ll.lora(model)(combined, x), ll.lora(model)(expected, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_routing_over_a_quantized_base_equals_solo_runs(kind, jit):
    adapters, trees = adapter_set(kind), adapter_trees(kind)
    x = batch(3, size=7)[0]
    ids = jnp.array([2, 0, -1, 1, 1, -1, 0])
    routed = ll.route(model)
    out = (jax.jit(routed) if jit else routed)(adapters, ids, x)
    float_base = dequantized(adapters.base())
    for k, i in enumerate(ids.tolist()):
        xk = x[k : k + 1]
        if i < 0:
            alone = ll.lora(model)(adapters.base(), xk)
            over_float = model(float_base, xk)
        else:
            alone = ll.lora(model)(trees["abc"[i]], xk)
            over_float = ll.lora(model)(dequantized(trees["abc"[i]]), xk)
        np.testing.assert_allclose(out[k], alone[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[k], over_float[0], rtol=1e-5, atol=1e-6)
    # The adapters matter: examples with different ids differ.
    assert not np.allclose(out[1], routed(adapters, jnp.array([1]), x[1:2])[0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_of_another_quantization_are_refused(kind):
    other_kind = "int8" if kind == "nf4" else "nf4"
    trees = {"a": lora_tree(kind, 1), "other": lora_tree(other_kind, 2)}
    with pytest.raises(ValueError) as info:
        ll.AdapterSet.from_trees(trees)
    message = str(info.value)
    for path in ("hidden/kernel", "mid/kernel", "proj", "table"):
        assert f"{path}: 'other' has another base weight than 'a'" in message
    assert f"quantized {other_kind} (block 32, axis -2) vs" in message
    # A float base= that is not the one the adapters were quantized from.
    with pytest.raises(
        ValueError,
        match=r"proj: 'a' has another base weight than 'base' \(same shape, different values\)",
    ):
        ll.AdapterSet.from_trees({"a": lora_tree(kind, 1)}, base=base_params(seed=5))


# --- vmap_train_step ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_train_step_over_a_quantized_base_equals_solo_training(kind):
    trees = {"a": lora_tree(kind, 1), "b": lora_tree(kind, 2)}
    adapters = ll.AdapterSet.from_trees(trees)
    keys = jax.random.split(jax.random.key(9), 2)
    init, step = ll.vmap_train_step(loss_fn, TX, batch_axis=0)
    state = init(adapters, keys)
    batches = [tuple(np.stack(pair) for pair in zip(batch(i), batch(10 + i))) for i in range(2)]
    for both in batches:
        state, metrics = step(state, both)
    trained = adapters.with_trainable(state.trainable)
    kept = len(quantized_leaves(state.frozen))
    assert kept == len(quantized_leaves(trees["a"])) > 0  # the base stays quantized
    solo_init, solo_step = ll.train_step(loss_fn, TX)
    for i, name in enumerate(trees):
        alone = solo_init(trees[name], keys[i])
        for both in batches:
            alone, alone_metrics = solo_step(alone, (both[0][i], both[1][i]))
        np.testing.assert_allclose(metrics["loss"][i], alone_metrics["loss"], rtol=1e-5)
        chex.assert_trees_all_close(host(trained.get(name)), host(alone.tree), rtol=1e-5, atol=1e-6)
        moved = trained.get(name)["mid"]["kernel"].b - trees[name]["mid"]["kernel"].b
        assert np.abs(moved).max() > 1e-3
    chex.assert_trees_all_equal(host(state.frozen), host(adapters.frozen), strict=True)


# --- memory of the backward pass -----------------------------------------------------------


def test_a_scanned_quantized_base_keeps_no_float_weight_per_layer_for_the_backward():
    # Without remat, the gradient of ``x @ dequantize(q)`` would keep each layer's
    # dequantized float weight as a residual; ll.lora recomputes it in the backward, so
    # the compiled gradient's temporaries match those over a float base.
    n_layers, d = 8, 512

    def model(params, x):
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return (jax.lax.scan(layer, x, params["w"])[0] ** 2).sum()

    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (n_layers, d, d)) / np.sqrt(d)}
    x = jnp.ones((32, d))
    config = ll.LoraConfig(rank=4, alpha=8, targets=("w",))
    tree = ll.init(params, config, key=key, fn=model, args=(x,))
    _, float_base = grad_and_temp_bytes(model, tree, x)
    _, nf4_base = grad_and_temp_bytes(model, ll.quantize(tree, kind="nf4", block=64), x)
    if float_base is None or nf4_base is None:
        pytest.skip("this backend reports no memory analysis")
    one_weight = d * d * 4
    assert nf4_base < float_base + n_layers * one_weight / 2, (nf4_base, float_base)


def test_a_quantized_base_cast_by_the_model_stays_quantized_up_to_its_product():
    # A model computing in bfloat16 casts each float32-dequantizing weight; ll.lora retypes
    # the quantized weight instead of dequantizing it there, so the product still recomputes
    # it in the backward pass: no bf16 copy of every layer's weight is kept (as over the
    # same weights dequantized to float32 beforehand, whose cast the product recomputes
    # too), and values and gradients equal those over the dequantized weights.
    n_layers, d = 8, 512

    def model(params, x):
        def layer(h, w):
            return jnp.tanh(h @ w.astype(jnp.bfloat16)), None

        h = jax.lax.scan(layer, x.astype(jnp.bfloat16), params["w"])[0]
        return (h.astype(jnp.float32) ** 2).sum()

    key = jax.random.key(1)
    params = {"w": jax.random.normal(key, (n_layers, d, d)) / np.sqrt(d)}
    x = jnp.ones((32, d))
    config = ll.LoraConfig(rank=4, alpha=8, targets=("w",))
    tree = ll.init(params, config, key=key, fn=model, args=(x,))
    tree = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, b=0.01 * jnp.ones_like(n.b)),
        tree,
        is_leaf=lambda n: isinstance(n, ll.LoraWeight),
    )
    quantized = ll.quantize(tree, kind="nf4", block=64)
    dequantized = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, w=n.w.dequantize()),
        quantized,
        is_leaf=lambda n: isinstance(n, ll.LoraWeight),
    )
    (value, grads), quantized_bytes = grad_and_temp_bytes(model, quantized, x)
    (value_ref, grads_ref), float_bytes = grad_and_temp_bytes(model, dequantized, x)
    assert value == value_ref
    chex.assert_trees_all_equal(grads, grads_ref)
    if quantized_bytes is None:
        pytest.skip("this backend reports no memory analysis")
    one_bf16_weight = d * d * 2
    assert quantized_bytes < float_bytes + n_layers * one_bf16_weight / 2, (
        quantized_bytes,
        float_bytes,
    )
