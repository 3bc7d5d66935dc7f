"""Gradients reach only the trainable partition; optax steps never touch frozen leaves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_allclose, assert_trees_equal, randomize_b

import lorax_lite as ll
from lorax_lite.optim import labels

KEY = jax.random.key(0)
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 6)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, name="fc1")(x))
        x = jnp.tanh(nn.Dense(8, name="fc2")(x))
        return nn.Dense(2, name="head")(x)


MODEL = MLP()


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

    assert_trees_allclose(grads, jax.grad(dense_loss)(trainable), rtol=1e-4, atol=1e-6)


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
    assert_trees_allclose(new_trainable, expected, rtol=1e-6, atol=1e-8)


@JIT
def test_one_step_on_the_full_tree_leaves_frozen_bits(lora_params, jit):
    """Gradients for w and the plain biases are non-zero, yet their updates are zero."""
    tx = ll.optimizer(optax.adam(1e-2))
    step = lambda tree: adam_step(tx, tree, loss_of_tree)
    new_tree = (jax.jit(step) if jit else step)(lora_params)
    full_grads = jax.grad(loss_of_tree)(lora_params)
    assert np.any(np.asarray(full_grads["params"]["fc1"]["kernel"].w) != 0)
    assert np.any(np.asarray(full_grads["params"]["fc1"]["bias"]) != 0)
    assert_trees_equal(ll.partition(new_tree)[1], ll.partition(lora_params)[1])
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
