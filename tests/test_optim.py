"""Gradients reach only the trainable partition; optax steps never touch frozen leaves."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import JIT, MLP, randomize_b

import lorax_lite as ll
from lorax_lite.optim import labels

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 6)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)


MODEL = MLP((8, 8, 2), ("fc1", "fc2", "head"))


@pytest.fixture(scope="module")
def lora_params():
    shapes = jax.eval_shape(MODEL.init, KEY, X)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * RNG.normal(size=s.shape), s.dtype), shapes
    )
    config = ll.LoraConfig(rank=2, alpha=4.0, targets=("fc1", "fc2"), train=("head",))
    return randomize_b(ll.init(params, config, key=KEY), jax.random.key(1))


def loss_of_tree(tree):
    return jnp.mean((ll.lora(MODEL.apply)(tree, X) - Y) ** 2)


def test_gradients_exist_for_a_b_and_train_leaves_only(lora_params):
    trainable, frozen = ll.partition(lora_params)
    grads = jax.grad(lambda t: loss_of_tree(ll.combine(t, frozen)))(trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    names = sorted(jax.tree_util.keystr(path) for path, _ in flat)
    assert names == sorted(
        [f"['params']['{m}']['kernel'].{f}" for m in ("fc1", "fc2") for f in ("a", "b")]
        + [f"['params']['head']['{n}'].value" for n in ("bias", "kernel")]
    )
    for path, g in flat:
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), path


def test_gradients_match_the_dense_formula(lora_params):
    """Gradients through lora(fn) equal those of the model with W + s A B formed densely."""
    trainable, frozen = ll.partition(lora_params)
    grads = jax.grad(lambda t: loss_of_tree(ll.combine(t, frozen)))(trainable)

    def dense_loss(t):
        def form(node):
            if isinstance(node, ll.LoraWeight):
                return node.w + node.scale * jnp.matmul(node.a, node.b, precision="highest")
            return node.value if isinstance(node, ll.Trainable) else node

        is_node = lambda x: isinstance(x, ll.LoraWeight | ll.Trainable)
        params = jax.tree_util.tree_map(form, ll.combine(t, frozen), is_leaf=is_node)
        return jnp.mean((MODEL.apply(params, X) - Y) ** 2)

    chex.assert_trees_all_close(grads, jax.grad(dense_loss)(trainable), rtol=1e-4, atol=1e-6)


def adam_step(tx, tree, loss):
    grads = jax.grad(loss)(tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    return optax.apply_updates(tree, updates)


@JIT
def test_one_step_on_the_partition_equals_one_on_the_full_tree(lora_params, jit):
    """The frozen half never reaches this step; the full-tree test checks it stays frozen."""
    tx = ll.optimizer(optax.adam(1e-2), lora_params)
    trainable, frozen = ll.partition(lora_params)
    step = lambda t: adam_step(tx, t, lambda t: loss_of_tree(ll.combine(t, frozen)))
    full_step = lambda tree: adam_step(tx, tree, loss_of_tree)
    maybe_jit = jax.jit if jit else lambda f: f
    new_trainable = maybe_jit(step)(trainable)
    for old, new in zip(
        jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(new_trainable)
    ):
        assert np.all(np.asarray(old) != np.asarray(new))  # adam moves every entry by ~lr
    expected = ll.partition(maybe_jit(full_step)(lora_params))[0]
    chex.assert_trees_all_close(new_trainable, expected, rtol=1e-6, atol=1e-8)


@JIT
def test_one_step_on_the_full_tree_leaves_frozen_bits(lora_params, jit):
    """Gradients for w and the plain biases are non-zero, yet their updates are zero."""
    tx = ll.optimizer(optax.adam(1e-2))
    step = lambda tree: adam_step(tx, tree, loss_of_tree)
    new_tree = (jax.jit(step) if jit else step)(lora_params)
    full_grads = jax.grad(loss_of_tree)(lora_params)
    assert np.any(np.asarray(full_grads["params"]["fc1"]["kernel"].w) != 0)
    assert np.any(np.asarray(full_grads["params"]["fc1"]["bias"]) != 0)
    chex.assert_trees_all_equal(
        ll.partition(new_tree)[1], ll.partition(lora_params)[1], strict=True
    )
    assert loss_of_tree(new_tree) < loss_of_tree(lora_params)


@pytest.mark.parametrize("which", ["full", "trainable"])
def test_adam_state_holds_nothing_for_frozen_leaves(lora_params, which):
    tree = lora_params if which == "full" else ll.partition(lora_params)[0]
    state = ll.optimizer(optax.adam(1e-3)).init(tree)
    size = lambda t: sum(np.size(x) for x in jax.tree_util.tree_leaves(t))
    n_trainable = (6 * 2 + 2 * 8) + (8 * 2 + 2 * 8) + (8 * 2 + 2)  # A, B of fc1, fc2; head
    assert ll.count(lora_params)["trainable"] == n_trainable
    assert size(optax.tree_utils.tree_get(state, "mu")) == n_trainable
    assert size(optax.tree_utils.tree_get(state, "nu")) == n_trainable
    assert size(state) == 2 * n_trainable + 1  # mu, nu and the step count


def test_labels_mark_a_b_and_trainable(lora_params):
    marks = labels(lora_params)
    fc1 = marks["params"]["fc1"]
    assert (fc1["kernel"].w, fc1["kernel"].a, fc1["kernel"].b) == ("freeze", "train", "train")
    assert fc1["bias"] == "freeze"
    assert marks["params"]["head"]["kernel"].value == "train"


def test_optimizer_refuses_a_tree_with_nothing_to_train():
    with pytest.raises(ValueError, match="no trainable leaf; did you call ll.init"):
        ll.optimizer(optax.adam(1e-3), {"w": jnp.ones((2, 2))})


# LoRA+: B at b_lr_ratio times A's learning rate.


def _reference_updates(points, grads_seq, make_tx, ratio):
    """Each leaf's updates from its own optax optimizer (B's at ``ratio`` times the rate),
    fed the same gradients and parameters step by step."""
    flat_points = [jax.tree_util.tree_leaves(p) for p in points]
    flat_grads = [jax.tree_util.tree_leaves(g) for g in grads_seq]
    flat, treedef = jax.tree_util.tree_flatten_with_path(points[0])
    per_leaf = []
    for i, (path, leaf) in enumerate(flat):
        tx = make_tx(ratio if jax.tree_util.keystr(path).endswith(".b") else 1.0)
        state, updates = tx.init(leaf), []
        for grads, params in zip(flat_grads, flat_points):
            u, state = tx.update(grads[i], state, params[i])
            updates.append(u)
        per_leaf.append(updates)
    return [jax.tree_util.tree_unflatten(treedef, step) for step in zip(*per_leaf)]


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda m: optax.adam(1e-2 * m),
        lambda m: optax.sgd(1e-2 * m, momentum=0.9),
        lambda m: optax.adamw(1e-2 * m, weight_decay=0.1),
    ],
    ids=["adam", "sgd-momentum", "adamw"],
)
@JIT
def test_loraplus_b_updates_equal_a_ratio_times_larger_learning_rate(lora_params, make_tx, jit):
    """Three steps on the trainable partition: each leaf's update equals that of a
    separate optax optimizer at lr (A, head) or ratio * lr (B), state carried over."""
    ratio = 16.0
    trainable, frozen = ll.partition(lora_params)
    tx = ll.optimizer(make_tx(1.0), lora_params, b_lr_ratio=ratio)
    loss = lambda t: loss_of_tree(ll.combine(t, frozen))
    grads_seq, updates_seq, state, t = [], [], tx.init(trainable), trainable
    update = jax.jit(tx.update) if jit else tx.update
    for _ in range(3):
        grads = jax.grad(loss)(t)
        updates, state = update(grads, state, t)
        grads_seq.append(grads)
        updates_seq.append(updates)
        t = optax.apply_updates(t, updates)
    points = [trainable]
    for updates in updates_seq[:-1]:
        points.append(optax.apply_updates(points[-1], updates))
    expected = _reference_updates(points, grads_seq, make_tx, ratio)
    chex.assert_trees_all_close(updates_seq, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_loraplus_b_update_is_ratio_times_the_plain_one_at_the_first_step(lora_params, name):
    """At step 0 (fresh state), B's update is ratio times the plain optimizer's (both
    are linear in the rate); A's and the head's are the same; frozen leaves get zero."""
    make = {"adam": optax.adam, "sgd": optax.sgd}[name]
    ratio = 4.0
    grads = jax.grad(loss_of_tree)(lora_params)
    plain_tx = ll.optimizer(make(1e-2))
    plus_tx = ll.optimizer(make(1e-2), b_lr_ratio=ratio)
    plain, _ = plain_tx.update(grads, plain_tx.init(lora_params), lora_params)
    plus, _ = plus_tx.update(grads, plus_tx.init(lora_params), lora_params)
    flat_plain = jax.tree_util.tree_flatten_with_path(plain)[0]
    flat_plus = jax.tree_util.tree_leaves(plus)
    marks = labels(lora_params, separate_b=True)
    flat_marks = jax.tree_util.tree_leaves(marks)
    assert sorted(set(flat_marks)) == ["freeze", "train", "train_b"]
    for (path, u_plain), u_plus, mark in zip(flat_plain, flat_plus, flat_marks):
        u_plain, u_plus = np.asarray(u_plain), np.asarray(u_plus)
        if mark == "freeze":
            assert not u_plus.any(), jax.tree_util.keystr(path)
        elif mark == "train_b":
            assert u_plain.any()
            np.testing.assert_allclose(u_plus, ratio * u_plain, rtol=1e-6)
        else:
            np.testing.assert_array_equal(u_plus, u_plain)


def test_loraplus_state_has_one_inner_state_per_group(lora_params):
    trainable = ll.partition(lora_params)[0]
    state = ll.optimizer(optax.adam(1e-3), b_lr_ratio=8).init(trainable)
    size = lambda t: sum(np.size(x) for x in jax.tree_util.tree_leaves(t))
    n_b = 2 * 8 + 2 * 8  # B of fc1 and fc2
    n_rest = 6 * 2 + 8 * 2 + (8 * 2 + 2)  # A of fc1 and fc2, the head
    b_state = state.inner_states["train_b"]
    assert size(optax.tree_utils.tree_get(b_state, "mu")) == n_b
    assert size(optax.tree_utils.tree_get(state.inner_states["train"], "mu")) == n_rest
    assert size(state) == 2 * (n_b + n_rest) + 2  # mu, nu per group and two step counts


@pytest.mark.parametrize("ratio", [0, -1.0, float("inf"), float("nan"), True, "16"])
def test_loraplus_refuses_bad_ratios(lora_params, ratio):
    with pytest.raises(ValueError, match="b_lr_ratio must be a finite number > 0"):
        ll.optimizer(optax.adam(1e-3), lora_params, b_lr_ratio=ratio)


def test_loraplus_through_train_step_and_a_training_checkpoint(lora_params, tmp_path):
    """ll.train_step wraps the LoRA+ optimizer once more; two steps equal two manual
    ones, and a TrainCheckpointer round trip restores the two-group state exactly."""
    from lorax_lite.train_checkpoint import TrainCheckpointer

    ratio = 16.0
    tx = ll.optimizer(optax.adam(1e-2), b_lr_ratio=ratio)
    init, step = ll.train_step(lambda tree, batch, key: loss_of_tree(tree), tx, donate=False)
    state = init(lora_params, jax.random.key(0))
    for _ in range(2):
        state, _ = step(state, ())

    trainable, frozen = ll.partition(lora_params)
    manual_state, t = tx.init(trainable), trainable
    for _ in range(2):
        grads = jax.grad(lambda t: loss_of_tree(ll.combine(t, frozen)))(t)
        updates, manual_state = tx.update(grads, manual_state, t)
        t = optax.apply_updates(t, updates)
    chex.assert_trees_all_close(state.trainable, t, rtol=1e-5, atol=1e-7)
    fc1 = lambda tree: tree["params"]["fc1"]["kernel"]
    moved_b = np.abs(fc1(state.trainable).b - fc1(trainable).b).max()
    moved_a = np.abs(fc1(state.trainable).a - fc1(trainable).a).max()
    assert moved_b > 8 * moved_a  # Adam moves entries by ~lr: B by ~16x A's

    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state)
        ckpt.wait()
        restored = ckpt.restore(init(lora_params, jax.random.key(1))).state
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state, strict=True)
    chex.assert_trees_all_equal(restored.trainable, state.trainable, strict=True)
    after, _ = step(restored, ())
    expected, _ = step(state, ())
    chex.assert_trees_all_equal(after.trainable, expected.trainable, strict=True)
