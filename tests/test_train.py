"""Training steps: one device, pmap and a mesh agree with each other and with a dense
hand-written update; accumulation, remat, donation, no per-step transfers, bf16 bases,
FSDP memory and fit."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_worker as worker

import lorax_lite as ll
from lorax_lite.trees import base_of

STEPS = 2
SGD = ll.train_step(worker.loss_fn, optax.sgd(0.1))  # shared, so it compiles once
KINDS = ["pmap", "mesh 2x4", "mesh 8x1", "mesh 2x4 fsdp", "mesh 8x1 fsdp accum 4", "accum 4"]


@functools.cache
def lora_tree():
    """The problem's LoRA tree, built once (steps copy what they donate)."""
    return worker.lora_tree()


@jax.jit
def eval_loss(tree, batch):
    return worker.loss_fn(tree, batch, None)


def counting(loss_fn):
    """``loss_fn`` that counts how often it is traced."""
    calls = []

    def counted(*args):
        calls.append(1)
        return loss_fn(*args)

    return counted, calls


def build(kind: str, loss_fn, tx, **options) -> ll.TrainStep:
    accum = 4 if "accum 4" in kind else 1
    if kind.startswith("pmap"):
        return ll.pmap_train_step(loss_fn, tx, accum_steps=accum, **options)
    if kind.startswith("mesh"):
        mesh = jax.make_mesh(mesh_shape(kind), ("data", "model"))
        sharding = "fsdp" if "fsdp" in kind else "replicated"
        return ll.sharded_train_step(
            loss_fn, tx, mesh=mesh, base_sharding=sharding, accum_steps=accum, **options
        )
    return ll.train_step(loss_fn, tx, accum_steps=accum, **options)


def mesh_shape(kind: str) -> tuple[int, int]:
    return (2, 4) if "2x4" in kind else (8, 1)


def host_batch(kind: str, index: int):
    """Batch ``index`` on the host, with pmap's leading device axis for ``"pmap"``."""
    batch = worker.batch(index)
    return ll.shard_batch(batch, 8) if kind.startswith("pmap") else batch


def host(tree):
    """Every leaf as a numpy array (sharded leaves gathered)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def run(kind: str, steps: int = STEPS):
    """``steps`` Adam steps on batches 0, 1, ...: (trainable, frozen, losses, traces)."""
    loss_fn, calls = counting(worker.loss_fn)
    init, step = build(kind, loss_fn, optax.adam(3e-2))
    state, losses = init(lora_tree(), jax.random.key(1)), []
    for i in range(steps):
        state, metrics = step(state, host_batch(kind, i))
        losses.append(float(metrics["loss"]))
    unstack = ll.unreplicate if kind == "pmap" else lambda tree: tree
    return host(unstack(state.trainable)), host(unstack(state.frozen)), losses, len(calls)


@pytest.fixture(scope="module")
def reference():
    return run("one device")


def dense_sgd_step(tree, batch, lr):
    """One SGD step on ``W + s * A @ B`` written out densely, without lorax_lite: the
    updated factors and head, and the gradients."""
    x, y = batch
    hidden, out = tree["hidden"]["kernel"], tree["out"]["kernel"]

    def loss(p):
        w_hidden = hidden.w + hidden.scale * p["hidden_a"] @ p["hidden_b"]
        w_out = out.w + out.scale * p["out_a"] @ p["out_b"]
        pred = jnp.tanh(jnp.tanh(x @ w_hidden) @ w_out) @ p["head"]
        return jnp.mean((pred - y) ** 2)

    p = {
        "hidden_a": hidden.a,
        "hidden_b": hidden.b,
        "out_a": out.a,
        "out_b": out.b,
        "head": tree["head"]["kernel"].value,
    }
    grads = jax.jit(jax.grad(loss))(p)
    return {k: p[k] - lr * grads[k] for k in p}, grads


def global_norm64(grads):
    """The global norm in float64 (optax.global_norm is deprecated)."""
    return np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))


def factors(trainable):
    return {
        "hidden_a": trainable["hidden"]["kernel"].a,
        "hidden_b": trainable["hidden"]["kernel"].b,
        "out_a": trainable["out"]["kernel"].a,
        "out_b": trainable["out"]["kernel"].b,
        "head": trainable["head"]["kernel"].value,
    }


@pytest.mark.parametrize("remat, wrapped", [(False, False), (True, False), (False, True)])
def test_one_step_is_the_dense_gradient_step(remat, wrapped):
    """Also with remat, and with an optimizer already wrapped by ll.optimizer."""
    tx = ll.optimizer(optax.sgd(0.5)) if wrapped else optax.sgd(0.5)
    init, step = ll.train_step(worker.loss_fn, tx, remat=remat)
    state = init(lora_tree(), jax.random.key(1))
    text = step.lower(state, worker.batch(0)).as_text()
    plain = ll.train_step(worker.loss_fn, tx).step.lower(state, worker.batch(0)).as_text()
    state, metrics = step(state, worker.batch(0))
    expected, grads = dense_sgd_step(lora_tree(), worker.batch(0), 0.5)
    chex.assert_trees_all_close(factors(state.trainable), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], global_norm64(grads), rtol=1e-5)
    chex.assert_trees_all_equal(state.frozen, ll.partition(lora_tree())[1], strict=True)
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["loss"], eval_loss(lora_tree(), worker.batch(0)))
    # remat: the backward pass recomputes the forward behind optimization barriers of its
    # own (ll.lora puts one on each adapted product's input with or without remat).
    barriers = text.count("optimization_barrier") - plain.count("optimization_barrier")
    assert (barriers > 0) == remat and barriers >= 0


@pytest.mark.parametrize("kind", ["accum 4", "pmap", "pmap accum 4", "mesh 8x1 fsdp accum 4"])
def test_every_step_kind_takes_the_full_batch_sgd_step(kind):
    """An SGD step and its ``grad_norm`` scale with the gradient (Adam's do not): averaging
    micro-batches or devices with a wrong count would show here."""
    init, step = build(kind, worker.loss_fn, optax.sgd(0.5))
    state, metrics = step(init(lora_tree(), jax.random.key(1)), host_batch(kind, 0))
    expected, grads = dense_sgd_step(lora_tree(), worker.batch(0), 0.5)
    unstack = ll.unreplicate if kind.startswith("pmap") else lambda tree: tree
    chex.assert_trees_all_close(
        factors(host(unstack(state.trainable))), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(metrics["grad_norm"], global_norm64(grads), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_kind_gives_the_same_adapters(kind, reference):
    trainable, frozen, losses, traces = run(kind)
    ref_trainable, _, ref_losses, _ = reference
    chex.assert_trees_all_close(trainable, ref_trainable, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # The base stays bit-identical, and the second step did not trace again.
    chex.assert_trees_all_equal(frozen, host(ll.partition(lora_tree())[1]), strict=True)
    assert traces == 1


def test_adapters_moved(reference):
    """Guards the comparisons above against a step that updates nothing."""
    start = host(ll.partition(lora_tree())[0])
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), reference[0], start)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_accumulation_checks_the_batch_size():
    init, step = ll.train_step(worker.loss_fn, optax.sgd(0.1), accum_steps=np.int64(4))
    state = init(lora_tree(), jax.random.key(1))
    with pytest.raises(ValueError, match=r"0: shape \(30, 8\)\n  1: shape \(30, 1\)"):
        step(state, worker.batch(0, size=30))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"accum_steps must be an integer >= 1, got {bad}"):
            ll.train_step(worker.loss_fn, optax.sgd(0.1), accum_steps=bad)


@pytest.mark.parametrize("kind", ["one device", "pmap", "mesh 8x1", "vmap"])
def test_every_step_builder_refuses_a_tree_with_nothing_to_train(kind):
    """``ll.init`` forgotten: the step would run, and never train."""
    params = base_of(lora_tree())
    tx = optax.sgd(0.1)
    if kind == "vmap":
        adapters = ll.AdapterSet.from_trees({"a": params, "b": params})
        init = ll.vmap_train_step(worker.loss_fn, tx).init
        with pytest.raises(ValueError, match=r"^vmap_train_step.init: .*did you call ll.init\?"):
            init(adapters, jax.random.split(jax.random.key(1)))
        return
    name = {"one device": "train_step", "pmap": "pmap_train_step"}.get(kind, "sharded_train_step")
    with pytest.raises(ValueError, match=rf"^{name}.init: .*did you call ll.init\?"):
        build(kind, worker.loss_fn, tx).init(params, jax.random.key(1))


def test_per_step_dropout_key_and_aux_metrics():
    def loss_fn(tree, batch, key):
        return worker.loss_fn(tree, batch, key), {"noise": jax.random.uniform(key)}

    init, step = ll.train_step(loss_fn, optax.sgd(0.1))
    state = init(worker.lora_tree(dropout=0.5), jax.random.key(7))
    noise = []
    for i in range(2):
        state, metrics = step(state, worker.batch(i))
        noise.append(float(metrics["noise"]))
    expected = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), t))) for t in (0, 1)]
    assert noise == expected


def test_aux_may_not_shadow_metrics():
    def loss_fn(tree, batch, key):
        loss = worker.loss_fn(tree, batch, key)
        return loss, {"loss": loss}

    init, step = ll.train_step(loss_fn, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"\['loss'\]"):
        step(init(lora_tree(), jax.random.key(1)), worker.batch(0))


@pytest.mark.parametrize("donate", [True, False])
def test_donation_consumes_the_state_but_not_the_callers_tree(donate):
    key = jax.random.key(1)
    init, step = SGD if donate else ll.train_step(worker.loss_fn, optax.sgd(0.1), donate=False)
    state = init(lora_tree(), key)
    new, _ = step(state, worker.batch(0))
    assert state.trainable["hidden"]["kernel"].a.is_deleted() == donate
    assert new.frozen is state.frozen  # the base is passed through, never copied
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(lora_tree()))
    assert not key.is_deleted()


@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("kind", ["pmap", "mesh 2x4 fsdp"])
def test_pmap_and_mesh_steps_donate_the_updated_state_but_not_the_base(kind, donate):
    init, step = build(kind, worker.loss_fn, optax.adam(1e-2), donate=donate)
    state = init(lora_tree(), jax.random.key(1))
    new, _ = step(state, host_batch(kind, 0))
    updated = jax.tree_util.tree_leaves((state.step, state.trainable, state.opt_state, state.key))
    assert len(updated) > 5  # adapters, head, Adam moments, step and key
    assert [x.is_deleted() for x in updated] == [donate] * len(updated)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state.frozen))
    assert new.frozen is state.frozen
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(lora_tree()))


def placed_batches(kind: str, state: ll.TrainState, count: int) -> list:
    """Batches ``0 .. count - 1`` already on the devices, laid out as ``kind``'s step takes them."""
    if kind == "pmap":  # the layout `replicate` gives the state: one row block per device
        put = functools.partial(jax.device_put, device=state.step.sharding)
    elif kind.startswith("mesh"):
        mesh = jax.make_mesh(mesh_shape(kind), ("data", "model"))
        put = lambda batch: ll.place(state, batch, mesh=mesh, base_sharding="fsdp")[1]
    else:
        put = jax.device_put
    return [put(host_batch(kind, i)) for i in range(count)]


@pytest.mark.parametrize("kind", ["one device", "pmap", "mesh 2x4 fsdp"])
def test_steps_after_the_first_transfer_nothing(kind):
    """Placed batches in, device metrics out: after compiling, a step moves no data.

    The guard is ``"disallow_explicit"``: the sharded step calls `place` (an explicit
    ``device_put``) on every batch, which ``"disallow"`` lets through. On CPU, reading a
    replicated scalar (``float(metrics["loss"])``) is zero-copy and no transfer the guard
    sees, so the control is a host batch instead.
    """
    loss_fn, calls = counting(worker.loss_fn)
    init, step = build(kind, loss_fn, optax.adam(1e-2))
    state = init(lora_tree(), jax.random.key(1))
    batches = placed_batches(kind, state, 4)
    state, _ = step(state, batches[0])
    with jax.transfer_guard("disallow_explicit"):
        for batch in batches[1:]:
            state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    assert int(np.asarray(state.step).reshape(-1)[0]) == 4 and len(calls) == 1
    with (
        jax.transfer_guard("disallow_explicit"),
        pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"),
    ):
        step(state, host_batch(kind, 0))


def teacher_params():
    """The base with a rank-2 change on both kernels: a target LoRA can fit exactly."""
    rng = np.random.default_rng(3)
    teacher = jax.tree_util.tree_map(lambda x: x, lora_tree())
    for name in ("hidden", "out"):
        node = teacher[name]["kernel"]
        a, b = (0.3 * rng.normal(size=x.shape).astype(np.float32) for x in (node.a, node.b))
        teacher[name]["kernel"] = dataclasses.replace(node, a=jnp.asarray(a), b=jnp.asarray(b))
    return ll.merge(teacher)


def teacher_batches(start, stop, size=32):
    params, model = teacher_params(), jax.jit(worker.model)
    for i in range(start, stop):
        x = worker.batch(i, size)[0]
        yield x, model(params, x)


def test_loss_decreases_with_fit_and_history_is_complete():
    init, step = ll.train_step(worker.loss_fn, optax.adam(3e-2))
    state = init(lora_tree(), jax.random.key(1))
    held_out = next(teacher_batches(1000, 1001, size=256))
    evaluate = jax.jit(lambda s: worker.loss_fn(s.tree, held_out, None))
    before = float(evaluate(state))
    state, history = ll.fit(
        step,
        state,
        teacher_batches(0, 100),
        steps=40,
        eval_fn=lambda s: {"loss": evaluate(s)},
        eval_every=20,
        tokens_per_batch=32,
        log_every=8,
    )
    assert [h["step"] for h in history] == list(range(1, 41))
    assert [h["eval_loss"] for h in history if "eval_loss" in h] == pytest.approx(
        [history[19]["eval_loss"], float(evaluate(state))], rel=1e-5
    )
    assert before > 0.05
    assert history[-1]["eval_loss"] < 0.2 * before
    assert np.mean([h["loss"] for h in history[-5:]]) < 0.2 * np.mean(
        [h["loss"] for h in history[:5]]
    )
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 for h in history)


def test_fit_stops_when_the_batches_run_out(caplog):
    init, step = SGD
    state = init(lora_tree(), jax.random.key(1))
    state, history = ll.fit(step, state, map(worker.batch, range(3)), steps=10, desc="short")
    assert [h["step"] for h in history] == [1, 2, 3] and int(state.step) == 3
    assert history[0]["tokens_per_s"] is None
    assert "ran out after 3 of 10" in caplog.text


def base_bytes_per_device(frozen):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(frozen))


def test_fsdp_base_holds_one_nth_per_device():
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # FSDP splits over both axes
    compiled, per_device = {}, {}
    for sharding in ("replicated", "fsdp"):
        init, step = ll.sharded_train_step(
            worker.loss_fn, optax.adam(1e-2), mesh=mesh, base_sharding=sharding
        )
        state = init(lora_tree(), jax.random.key(1))
        per_device[sharding] = base_bytes_per_device(state.frozen)
        compiled[sharding] = step.lower(state, worker.batch(0)).compile()
        frozen_in = compiled[sharding].input_shardings[0][1]
        for x, s in zip(
            jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(frozen_in)
        ):
            assert s.shard_shape(x.shape) == x.addressable_shards[0].data.shape
    full = sum(x.nbytes for x in jax.tree_util.tree_leaves(ll.partition(lora_tree())[1]))
    assert per_device["replicated"] == full and per_device["fsdp"] * 8 == full
    # The compiled step's arguments shrink by exactly the base's 7/8 on each device.
    args = {k: c.memory_analysis().argument_size_in_bytes for k, c in compiled.items()}
    assert args["replicated"] - args["fsdp"] == full - full // 8


def test_cast_base_keeps_adapters_and_optimizer_in_float32_and_trains():
    tree = ll.cast_base(lora_tree(), jnp.bfloat16)
    assert tree["hidden"]["kernel"].w.dtype == jnp.bfloat16
    assert tree["hidden"]["kernel"].a.dtype == tree["hidden"]["kernel"].b.dtype == jnp.float32
    assert tree["head"]["kernel"].value.dtype == jnp.float32
    init, step = ll.train_step(worker.loss_fn, optax.adam(3e-2))
    state = init(tree, jax.random.key(1))
    losses = []
    for x, y in teacher_batches(0, 8):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    float_leaves = jax.tree_util.tree_leaves((state.trainable, state.opt_state))
    assert {x.dtype for x in float_leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }
    chex.assert_trees_all_equal(state.frozen, ll.partition(tree)[1], strict=True)
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    # The bf16 base really is what the model used: its loss differs from the float32 one.
    f32 = eval_loss(lora_tree(), worker.batch(0))
    bf16 = eval_loss(tree, worker.batch(0))
    assert 0 < abs(float(f32) - float(bf16)) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.int8, "uint8", jnp.bool_, None, "bfloat"])
def test_cast_base_refuses_a_dtype_that_is_not_floating(dtype):
    """``cast_base(tree, jnp.int8)``, a slip for an 8-bit base, would truncate every weight."""
    with pytest.raises(TypeError, match=r"floating dtype .* got .*ll\.quantize"):
        ll.cast_base(lora_tree(), dtype)
    assert ll.cast_base(lora_tree(), "float16")["hidden"]["kernel"].w.dtype == jnp.float16


def test_cast_base_on_a_state_casts_only_the_frozen_part():
    init, _ = ll.train_step(worker.loss_fn, optax.adam(3e-2))
    state = ll.cast_base(init(lora_tree(), jax.random.key(1)), jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert state.trainable["hidden"]["kernel"].a.dtype == jnp.float32


def test_replicate_unreplicate_and_shard_batch():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(4)}
    replicated = ll.replicate(tree)
    assert replicated["w"].shape == (8, 2, 3)
    assert len({s.device for s in replicated["w"].addressable_shards}) == 8
    chex.assert_trees_all_equal(
        jax.random.key_data(ll.unreplicate(replicated)["key"]),
        jax.random.key_data(tree["key"]),
        strict=True,
    )
    np.testing.assert_array_equal(ll.unreplicate(replicated)["w"], tree["w"])
    x = np.arange(16).reshape(8, 2)
    np.testing.assert_array_equal(ll.shard_batch(x, 4)[1], x[2:4])
    with pytest.raises(ValueError, match=r"b: shape \(6,\)"):
        ll.shard_batch({"a": np.zeros(8), "b": np.zeros(6)}, 4)


def test_sharded_step_rejects_bad_layouts_and_batches():
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    with pytest.raises(
        ValueError, match="^sharded_train_step: axis_name 'rows' is not a mesh axis.*'zero'"
    ):
        ll.sharded_train_step(
            worker.loss_fn, optax.sgd(0.1), mesh=mesh, axis_name="rows", base_sharding="zero"
        )
    init, step = ll.sharded_train_step(worker.loss_fn, optax.sgd(0.1), mesh=mesh)
    with pytest.raises(ValueError, match="^place: base_sharding must be"):
        ll.place(
            init(lora_tree(), jax.random.key(1)), worker.batch(0), mesh=mesh, base_sharding="zero"
        )
    with pytest.raises(ValueError, match=r"0: shape \(12, 8\)"):
        step(init(lora_tree(), jax.random.key(1)), worker.batch(0, size=12))


# ---------------------------------------------------------------- NaN and inf in a batch


def bad_batch(index: int, kind: str = "one device"):
    """Batch ``index`` with a NaN input (row 3) and an inf target (row 20)."""
    x, y = worker.batch(index)
    x[3, 2], y[20, 0] = np.nan, np.inf
    return ll.shard_batch((x, y), 8) if kind == "pmap" else (x, y)


def trained_parts(kind: str, state: ll.TrainState):
    """The trainable partition and optimizer state on the host (one replica for pmap)."""
    parts = (state.trainable, state.opt_state)
    return host(ll.unreplicate(parts) if kind == "pmap" else parts)


@pytest.mark.parametrize("kind", ["one device", *KINDS])
def test_every_step_kind_reports_and_skips_a_nonfinite_batch(kind):
    """The skipped step leaves the adapters and Adam's moments and count as they were: the
    run equals one without the bad batch. Under pmap the NaN is on one device's rows."""
    init, step = build(kind, worker.loss_fn, optax.adam(3e-2))
    state, _ = step(init(lora_tree(), jax.random.key(1)), host_batch(kind, 0))
    before = trained_parts(kind, state)
    state, metrics = step(state, bad_batch(1, kind))
    assert bool(metrics["nonfinite"]) and bool(metrics["skipped"])
    assert not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(trained_parts(kind, state), before, strict=True)
    assert int(np.asarray(state.step).reshape(-1)[0]) == 2  # the step itself is counted
    state, metrics = step(state, host_batch(kind, 2))
    assert not bool(metrics["nonfinite"]) and not bool(metrics["skipped"])

    expected = init(lora_tree(), jax.random.key(1))
    for i in (0, 2):
        expected, _ = step(expected, host_batch(kind, i))
    chex.assert_trees_all_equal(
        trained_parts(kind, state), trained_parts(kind, expected), strict=True
    )


def test_without_skipping_a_nonfinite_batch_is_reported_and_applied():
    init, step = ll.train_step(worker.loss_fn, optax.sgd(0.1), skip_nonfinite=False)
    state, metrics = step(init(lora_tree(), jax.random.key(1)), bad_batch(0))
    assert bool(metrics["nonfinite"]) and not bool(metrics["skipped"])
    assert np.isnan(np.asarray(state.trainable["hidden"]["kernel"].a)).any()


def test_vmap_train_step_skips_per_adapter():
    tree = lora_tree()
    other = jax.tree_util.tree_map(lambda x: x, tree)
    node = other["hidden"]["kernel"]
    other["hidden"]["kernel"] = dataclasses.replace(node, b=node.b + 0.1)
    adapters = ll.AdapterSet.from_trees({"clean": tree, "poisoned": other})
    init, step = ll.vmap_train_step(worker.loss_fn, optax.adam(3e-2), batch_axis=0)
    state = init(adapters, jax.random.split(jax.random.key(1), 2))
    before = host(state.trainable)
    batches = [np.stack(pair) for pair in zip(worker.batch(0), bad_batch(1))]
    state, metrics = step(state, tuple(batches))
    assert np.asarray(metrics["skipped"]).tolist() == [False, True]
    after = host(state.trainable)
    for new, old in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(new[1], old[1])  # the poisoned adapter did not move
        assert np.isfinite(new[0]).all()
    assert np.abs(after["hidden"]["kernel"].b[0] - before["hidden"]["kernel"].b[0]).max() > 0


def test_vmap_train_step_without_skipping_applies_the_nonfinite_update():
    """skip_nonfinite=False reaches every adapter's train_step: the poisoned one takes
    the NaN update, the clean one its ordinary step."""
    tree = lora_tree()
    adapters = ll.AdapterSet.from_trees({"clean": tree, "poisoned": tree})
    init, step = ll.vmap_train_step(
        worker.loss_fn, optax.adam(3e-2), batch_axis=0, skip_nonfinite=False
    )
    state = init(adapters, jax.random.split(jax.random.key(1), 2))
    batches = [np.stack(pair) for pair in zip(worker.batch(0), bad_batch(1))]
    state, metrics = step(state, tuple(batches))
    assert np.asarray(metrics["nonfinite"]).tolist() == [False, True]
    assert np.asarray(metrics["skipped"]).tolist() == [False, False]
    a = np.asarray(state.trainable["hidden"]["kernel"].a)
    assert np.isfinite(a[0]).all() and np.isnan(a[1]).any()
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        ll.vmap_train_step(worker.loss_fn, optax.adam(3e-2), skip_nonfinite="no")


def test_fit_skips_nonfinite_steps_and_counts_them(caplog):
    init, step = ll.train_step(worker.loss_fn, optax.adam(3e-2))
    batches = [worker.batch(0), bad_batch(1), worker.batch(2), bad_batch(3), worker.batch(4)]
    state, history = ll.fit(step, init(lora_tree(), jax.random.key(1)), batches, steps=5)
    assert [h["skipped"] for h in history] == [False, True, False, True, False]
    assert [h["nonfinite"] for h in history] == [False, True, False, True, False]
    assert "fit: skipped 2 of 5 updates with a NaN or inf loss or gradients (steps 2, 4)" in (
        caplog.text
    )
    clean = [batches[i] for i in (0, 2, 4)]
    expected, _ = ll.fit(step, init(lora_tree(), jax.random.key(1)), clean, steps=3)
    chex.assert_trees_all_equal(host(state.trainable), host(expected.trainable), strict=True)


def test_fit_stops_after_too_many_nonfinite_steps_in_a_row():
    init, step = ll.train_step(worker.loss_fn, optax.adam(3e-2))
    batches = [worker.batch(0), *(bad_batch(i) for i in range(1, 9))]
    state = init(lora_tree(), jax.random.key(1))
    with pytest.raises(ll.NonFiniteError) as err:
        ll.fit(step, state, batches, steps=9, log_every=4, max_consecutive_nonfinite=3)
    assert str(err.value).startswith(
        "fit: steps 2 to 4 (3 in a row, max_consecutive_nonfinite=3) had a NaN or inf loss "
        "or gradients; their updates were skipped (they changed no adapter)"
    )
    # Raised at the host read of step 4; the state after step 1 is intact and handed back.
    assert int(err.value.state.step) == 4 and len(err.value.history) == 4
    fresh = lambda: init(lora_tree(), jax.random.key(1))  # steps donate the state
    first, _ = step(fresh(), worker.batch(0))
    chex.assert_trees_all_equal(host(err.value.state.trainable), host(first.trainable), strict=True)
    # A finite step ends a run; None never stops.
    mixed = [bad_batch(1), bad_batch(2), worker.batch(3), bad_batch(4), bad_batch(5)]
    _, history = ll.fit(step, fresh(), mixed, steps=5, max_consecutive_nonfinite=3)
    assert [h["skipped"] for h in history] == [True, True, False, True, True]
    _, history = ll.fit(step, fresh(), batches, steps=9, max_consecutive_nonfinite=None)
    assert sum(h["skipped"] for h in history) == 8
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be None or an int >= 1"):
        ll.fit(step, fresh(), batches, steps=1, max_consecutive_nonfinite=0)


@pytest.mark.parametrize("donate", [True, False])
def test_vmap_train_step_lowers_with_the_base_beside_the_stacked_state(donate):
    """``step.lower`` as for every other step: the stacked state (adapter axis first) is
    donated as asked, the frozen base is one unbatched argument beside it, never donated."""
    leaves = jax.tree_util.tree_leaves
    adapters = ll.AdapterSet.from_trees({"a": lora_tree(), "b": lora_tree()})
    init, step = ll.vmap_train_step(worker.loss_fn, optax.adam(1e-2), donate=donate)
    state = init(adapters, jax.random.split(jax.random.key(1), 2))
    stacked_in, frozen_in, _ = step.lower(state, worker.batch(0)).args_info[0]
    assert [x.shape for x in leaves(frozen_in)] == [x.shape for x in leaves(state.frozen)]
    assert not any(x.donated for x in leaves(frozen_in))
    trainable_in = leaves(stacked_in.trainable)
    assert [x.shape for x in trainable_in] == [x.shape for x in leaves(state.trainable)]
    assert {x.shape[0] for x in trainable_in} == {2}
    assert [x.donated for x in leaves(stacked_in)] == [donate] * len(leaves(stacked_in))
    new, metrics = step(state, worker.batch(0))  # lowering consumed nothing
    assert metrics["loss"].shape == (2,) and new.frozen is state.frozen
