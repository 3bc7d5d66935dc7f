"""Mixture-of-experts layers: LoRA on an expert stack used by ``lax.ragged_dot``.

Expert weights ``(E, d_in, d_out)`` get per-expert factors ``(E, d_in, r)`` and
``(E, r, d_out)``; `lora` runs the adapter path as two ragged dots with the router's
group sizes. Checked against the merged per-expert weights in float64 numpy.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import JIT, dense_reference, normal, producers_of_shape, randomize_b, train_step_hlo
from jax import lax

import lorax_lite as ll

N_EXPERTS, D_MODEL, D_HIDDEN, N_TOKENS = 3, 5, 7, 12
EXPERTS = ll.Layout((0,), (1,), (2,))


class MoE(nn.Module):
    """Top-1 routing; tokens sorted by expert, two ragged dots, scattered back."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.5)
        up = self.param("up", init, (N_EXPERTS, D_MODEL, D_HIDDEN))
        down = self.param("down", init, (N_EXPERTS, D_HIDDEN, D_MODEL))
        expert = jnp.argmax(nn.Dense(N_EXPERTS, name="router")(x), axis=-1)
        order = jnp.argsort(expert)
        sizes = jnp.bincount(expert, length=N_EXPERTS).astype(jnp.int32)
        h = jnp.tanh(lax.ragged_dot(x[order], up, sizes))
        y = lax.ragged_dot(h, down, sizes)
        return jnp.zeros_like(y).at[order].set(y)


X = normal((N_TOKENS, D_MODEL), 1)


@pytest.fixture(scope="module")
def tree():
    params = MoE().init(jax.random.key(0), X)
    config = ll.LoraConfig(rank=2, alpha=3.0, targets=("up", "down"))
    lora = ll.init(params, config, key=jax.random.key(1), fn=MoE().apply, args=(X,))
    return randomize_b(lora, jax.random.key(2))


def reference(tree, x):
    """Each token through its expert's merged weights, float64 numpy."""
    p = tree["params"]
    merged = {name: dense_reference(p[name]) for name in ("up", "down")}
    router = np.asarray(p["router"]["kernel"], np.float64)
    logits = np.asarray(x, np.float64) @ router + np.asarray(p["router"]["bias"], np.float64)
    expert = logits.argmax(-1)
    x = np.asarray(x, np.float64)
    rows = [np.tanh(x[t] @ merged["up"][e]) @ merged["down"][e] for t, e in enumerate(expert)]
    return np.stack(rows), np.bincount(expert, minlength=N_EXPERTS)


def test_init_reads_the_expert_axis_from_ragged_dot(tree):
    p = tree["params"]
    assert p["up"].layout == EXPERTS and p["down"].layout == EXPERTS
    assert p["up"].a.shape == (N_EXPERTS, D_MODEL, 2) and p["up"].b.shape == (
        N_EXPERTS,
        2,
        D_HIDDEN,
    )
    assert p["down"].a.shape == (N_EXPERTS, D_HIDDEN, 2)
    params = MoE().init(jax.random.key(0), X)
    usage = ll.init(params, ll.LoraConfig(rank=2), key=jax.random.key(1), fn=MoE().apply, args=(X,))
    adapted = sorted(k for k, v in usage["params"].items() if isinstance(v, ll.LoraWeight))
    assert adapted == ["down", "up"]  # "all-linear" takes the experts; the router's kernel too
    assert isinstance(usage["params"]["router"]["kernel"], ll.LoraWeight)


@JIT
def test_values_equal_the_merged_experts_in_float64(tree, jit):
    apply = ll.lora(MoE().apply, strict=True)  # strict: no expert weight is materialized
    out = (jax.jit(apply) if jit else apply)(tree, X)
    expected, sizes = reference(tree, X)
    assert (sizes > 0).sum() >= 2  # the routing uses several experts
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)
    base = MoE().apply(ll.merge(jax.tree_util.tree_map(lambda x: x, tree)), X)
    assert np.abs(np.asarray(base) - expected).max() < 1e-4  # merge agrees too
    plain, _ = reference(_without_adapters(tree), X)
    assert np.abs(plain - expected).max() > 1e-2  # the adapters matter


def _without_adapters(tree):
    zero_b = lambda n: ll.LoraWeight(n.w, n.a, jnp.zeros_like(n.b), n.scale, n.layout)
    is_lora = lambda x: isinstance(x, ll.LoraWeight)
    return jax.tree_util.tree_map(lambda n: zero_b(n) if is_lora(n) else n, tree, is_leaf=is_lora)


def expert_layer(x, w, sizes):
    return lax.ragged_dot(x, w, sizes)


@pytest.mark.parametrize(
    "sizes", [(4, 0, 5, 3), (0, 0, 12, 0), (3, 0, 5, 0)], ids=["one-empty", "one-full", "short"]
)
@JIT
def test_gradients_equal_the_float64_formula_with_empty_groups(sizes, jit):
    """One expert layer, loss ``sum(y * c)``: ``dA_e = s x_e^T (c_e B_e^T)``,
    ``dB_e = s (x_e A_e)^T c_e``, ``dx_t = c_t W'_e^T``. Rows past the last group
    ("short": sizes sum to 8 of 12 rows) give zero output and no gradient."""
    n_experts, d_in, d_out, rank, scale = 4, 6, 5, 3, 0.7
    w = ll.LoraWeight(
        normal((n_experts, d_in, d_out), 3),
        normal((n_experts, d_in, rank), 4),
        normal((n_experts, rank, d_out), 5),
        scale,
        ll.Layout((0,), (1,), (2,)),
    )
    x, c = normal((12, d_in), 6), normal((12, d_out), 7)
    sizes = jnp.asarray(sizes, jnp.int32)
    apply = ll.lora(expert_layer, strict=True)

    def loss(a, b, x):
        return jnp.sum(apply(x, ll.LoraWeight(w.w, a, b, scale, w.layout), sizes) * c)

    grad = jax.jit(jax.grad(loss, (0, 1, 2))) if jit else jax.grad(loss, (0, 1, 2))
    ga, gb, gx = grad(w.a, w.b, x)
    value = apply(x, w, sizes)

    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    merged, xs, cs = dense_reference(w), np.asarray(x, np.float64), np.asarray(c, np.float64)
    want_y, want_a, want_b, want_x = (
        np.zeros((12, d_out)),
        np.zeros_like(a),
        np.zeros_like(b),
        np.zeros_like(xs),
    )
    start = 0
    for e, n in enumerate(np.asarray(sizes)):
        rows = slice(start, start + n)
        want_y[rows] = xs[rows] @ merged[e]
        want_a[e] = scale * xs[rows].T @ (cs[rows] @ b[e].T)
        want_b[e] = scale * (xs[rows] @ a[e]).T @ cs[rows]
        want_x[rows] = cs[rows] @ merged[e].T
        start += n
    chex.assert_trees_all_close(
        (value, ga, gb, gx), (want_y, want_a, want_b, want_x), rtol=1e-5, atol=1e-5
    )
    empty = np.asarray(sizes) == 0
    assert not np.asarray(ga)[empty].any() and not np.asarray(gb)[empty].any()


def test_model_gradients_equal_those_through_the_merged_experts(tree):
    trainable, frozen = ll.partition(tree)
    apply = ll.lora(MoE().apply, strict=True)
    lora_loss = lambda t: jnp.sum(apply(ll.combine(t, frozen), X) ** 2)

    def merged_loss(t):
        def form(node):
            if isinstance(node, ll.LoraWeight):
                delta = jnp.einsum("eir,ero->eio", node.a, node.b, precision="highest")
                return node.w + node.scale * delta
            return node

        is_lora = lambda x: isinstance(x, ll.LoraWeight)
        params = jax.tree_util.tree_map(form, ll.combine(t, frozen), is_leaf=is_lora)
        return jnp.sum(MoE().apply(params, X) ** 2)

    grads = jax.grad(lora_loss)(trainable)
    chex.assert_trees_all_close(grads, jax.grad(merged_loss)(trainable), rtol=1e-4, atol=1e-6)
    assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_no_per_expert_delta_in_the_compiled_gradient(tree):
    trainable, frozen = ll.partition(tree)
    apply = ll.lora(MoE().apply, strict=True)
    lora_loss = lambda t, f, x: jnp.sum(apply(ll.combine(t, f), x) ** 2)
    merged_loss = lambda t, f, x: jnp.sum(MoE().apply(ll.merge(ll.combine(t, f)), x) ** 2)
    ops = ("dot", "add", "multiply", "fusion", "convolution")
    shapes = ((N_EXPERTS, D_MODEL, D_HIDDEN), (N_EXPERTS, D_HIDDEN, D_MODEL))
    lora_hlo = train_step_hlo(lora_loss, trainable, frozen, X)
    merged_hlo = train_step_hlo(merged_loss, trainable, frozen, X)
    for shape in shapes:
        assert producers_of_shape(lora_hlo, shape, ops) == [], shape
        # The check can fail: merging first forms each expert's full weight.
        assert producers_of_shape(merged_hlo, shape, ops), f"no dense {shape} found"


def test_weight_on_the_left_of_a_ragged_dot_is_materialized_with_a_warning():
    """No low-rank rule for a LoRA weight as the grouped rows: strict mode refuses."""
    w = ll.LoraWeight(normal((6, 4), 8), normal((6, 2), 9), normal((2, 4), 10), 0.5)
    experts = normal((2, 4, 3), 11)
    sizes = jnp.asarray([2, 4], jnp.int32)
    with pytest.raises(ll.MaterializationError, match="ragged_dot_general"):
        ll.lora(expert_layer, strict=True)(w, experts, sizes)
    with pytest.warns(UserWarning, match="ragged_dot_general"):
        out = ll.lora(expert_layer)(w, experts, sizes)
    expected = expert_layer(jnp.asarray(dense_reference(w), jnp.float32), experts, sizes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def stacked_experts(params, x, sizes):
    """Layers of experts ``(L, E, d, d)`` scanned over, the residual stream carried."""

    def layer(h, w):
        return h + jnp.tanh(lax.ragged_dot(h, w, sizes)), None

    return lax.scan(layer, x, params["experts"])[0]


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_scanned_expert_stack_equals_the_merged_layers(quantized):
    """``(L, E, d, d)`` experts in a ``lax.scan``: layout (stack, stack, in, out), the
    rule runs per layer on the sliced factors; an int8 base dequantizes per layer."""
    n_layers, d = 3, 8
    params = {"experts": 0.3 * normal((n_layers, N_EXPERTS, d, d), 12)}
    x, sizes = normal((10, d), 13), jnp.asarray([4, 0, 6], jnp.int32)
    config = ll.LoraConfig(rank=2, alpha=2.0, targets="experts")
    tree = ll.init(params, config, key=jax.random.key(3), fn=stacked_experts, args=(x, sizes))
    tree = randomize_b(tree, jax.random.key(4), std=0.3)
    assert tree["experts"].layout == ll.Layout((0, 1), (2,), (3,))
    if quantized:
        tree = ll.quantize(tree, kind="int8", block=8)
    out = jax.jit(ll.lora(stacked_experts, strict=True))(tree, x, sizes)

    node = tree["experts"]
    w = node.w.dequantize() if quantized else node.w
    merged = dense_reference(ll.LoraWeight(w, node.a, node.b, node.scale, node.layout))
    h, groups = np.asarray(x, np.float64), np.repeat(np.arange(N_EXPERTS), np.asarray(sizes))
    for layer in merged:
        h = h + np.tanh(np.stack([h[t] @ layer[e] for t, e in enumerate(groups)]))
    np.testing.assert_allclose(np.asarray(out, np.float64), h, rtol=1e-5, atol=1e-5)


@JIT
def test_ragged_dot_general_with_other_axis_orders(jit):
    """``ragged_dot_general`` on rows laid out ``(d_in, m)`` and experts ``(E, d_out, d_in)``:
    the factors' dimension numbers follow the weight's; float64 reference per row."""
    n_experts, d_in, d_out, m = 3, 6, 4, 9
    numbers = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (2,)), ((), ())),
        lhs_ragged_dimensions=(1,),
        rhs_group_dimensions=(0,),
    )

    def layer(x, w, sizes):
        return lax.ragged_dot_general(x, w, sizes, numbers)

    x, sizes = normal((d_in, m), 14), jnp.asarray([3, 0, 6], jnp.int32)
    params = {"w": normal((n_experts, d_out, d_in), 15)}
    fn = lambda p, x, sizes: layer(x, p["w"], sizes)
    tree = ll.init(
        params, ll.LoraConfig(rank=2, targets="w"), key=jax.random.key(7), fn=fn, args=(x, sizes)
    )
    tree = randomize_b(tree, jax.random.key(8))
    assert tree["w"].layout == ll.Layout((0,), (2,), (1,))
    apply = ll.lora(fn, strict=True)
    out = (jax.jit(apply) if jit else apply)(tree, x, sizes)
    merged = dense_reference(tree["w"])  # (E, d_out, d_in)
    groups = np.repeat(np.arange(n_experts), np.asarray(sizes))
    rows = np.asarray(x, np.float64).T
    expected = np.stack([merged[e] @ rows[t] for t, e in enumerate(groups)])
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)
