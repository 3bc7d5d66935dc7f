"""LoraWeight, Layout and factor init, checked against float64 numpy."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_reference

import lorax_lite as ll
from lorax_lite.weight import LoraWeight, init_factors

KEY = jax.random.key(0)
LAYOUTS = [
    ((5, 7), ll.Layout.dense()),
    ((7, 5), ll.Layout((), (1,), (0,))),  # an (out, in) kernel
    ((6, 4, 5), ll.Layout((), (0,), (1, 2))),  # DenseGeneral (in, heads, head_dim)
    ((4, 5, 6), ll.Layout((), (0, 1), (2,))),  # DenseGeneral (heads, head_dim, out)
    ((3, 3, 4, 5), ll.Layout((), (0, 1, 2), (3,))),  # conv HWIO
    ((3, 6, 5), ll.Layout((0,), (1,), (2,))),  # scan-stacked Dense
    ((6, 2, 5), ll.Layout((1,), (0,), (2,))),  # stacked axis in the middle
]


def random_weight(shape, layout, rank=3, dtype=jnp.float32, scale=0.7):
    rng = np.random.default_rng(0)
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    w = jnp.asarray(rng.normal(size=shape), dtype)
    a = jnp.asarray(rng.normal(size=a_shape), jnp.float32)
    b = jnp.asarray(rng.normal(size=b_shape), jnp.float32)
    return ll.LoraWeight(w, a, b, scale, layout)


def test_layout_roles_round_trip_and_factor_shapes():
    layout = ll.Layout.from_roles(("in", "stack", "out", "out"))
    assert layout == ll.Layout((1,), (0,), (2, 3))
    assert layout.roles() == ("in", "stack", "out", "out")
    assert layout.factor_shapes((6, 2, 4, 5), 3) == ((2, 6, 3), (2, 3, 4, 5))


@pytest.mark.parametrize("shape, layout", LAYOUTS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_materialize_equals_float64_reference(shape, layout, jit):
    node = random_weight(shape, layout)
    materialize = jax.jit(ll.LoraWeight.materialize) if jit else ll.LoraWeight.materialize
    merged = materialize(node)
    assert merged.shape == shape and merged.dtype == jnp.float32
    np.testing.assert_allclose(merged, dense_reference(node), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, layout", LAYOUTS[:4])
def test_materialize_bf16_base_stays_bf16_and_rounds_once(shape, layout):
    node = random_weight(shape, layout, dtype=jnp.bfloat16)
    merged = node.materialize()
    assert merged.dtype == jnp.bfloat16
    expected = dense_reference(node).astype(jnp.bfloat16).astype(np.float64)
    # One rounding to bf16 (8 significant bits) of a float32 sum: within one bf16 ulp.
    ulp = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
    assert np.all(np.abs(np.asarray(merged, np.float64) - expected) <= ulp)


def test_materialize_accumulates_in_float32_before_casting():
    # delta = 2**-8 + 2**-20: rounded to bf16 first it is 2**-8, and 1 + 2**-8 ties to 1.0;
    # summed in float32 then rounded, 1 + delta rounds up to 1 + 2**-7.
    delta = 2.0**-8 + 2.0**-20
    node = ll.LoraWeight(
        jnp.ones((1, 1), jnp.bfloat16), jnp.ones((1, 1)), jnp.full((1, 1), delta), 1.0
    )
    assert float(node.materialize()[0, 0]) == 1.0 + 2.0**-7


def test_delta_has_weight_axis_order_and_scale():
    node = random_weight((6, 2, 5), ll.Layout((1,), (0,), (2,)), scale=2.5)
    expected = dense_reference(node) - np.asarray(node.w, np.float64)
    np.testing.assert_allclose(node.delta(), expected, rtol=1e-5, atol=1e-5)


def test_rank_property():
    assert random_weight((5, 7), ll.Layout.dense(), rank=4).rank == 4


def test_kaiming_uniform_bound_is_one_over_sqrt_fan_in():
    shape, layout = (8, 4, 16), ll.Layout((), (0, 1), (2,))  # fan_in = 32
    a, b = init_factors(KEY, shape, layout, 64, init="kaiming", dtype=jnp.float32)
    bound = 1 / math.sqrt(32)
    assert a.shape == (8, 4, 64) and b.shape == (64, 16)
    assert np.all(np.asarray(b) == 0)
    assert float(jnp.abs(a).max()) <= bound
    assert float(jnp.abs(a).max()) > 0.98 * bound
    # uniform on [-bound, bound]: std bound / sqrt(3); 2048 samples give ~1.5% noise.
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.06)
    assert abs(float(a.mean())) < 0.1 * bound


def test_gaussian_std_is_one_over_rank():
    rank = 8
    a, b = init_factors(KEY, (512, 16), ll.Layout.dense(), rank, init="gaussian", dtype="float32")
    assert a.shape == (512, rank) and not np.any(np.asarray(b))
    assert float(a.std()) == pytest.approx(1 / rank, rel=0.05)
    assert abs(float(a.mean())) < 0.1 / rank


def test_factors_take_the_requested_dtype_and_unknown_init_raises():
    a, b = init_factors(KEY, (4, 4), ll.Layout.dense(), 2, init="kaiming", dtype=jnp.bfloat16)
    assert a.dtype == b.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="init must be 'kaiming' or 'gaussian', got 'ones'"):
        init_factors(KEY, (4, 4), ll.Layout.dense(), 2, init="ones", dtype=jnp.float32)


def test_lora_weight_is_a_pytree_with_static_metadata():
    node = random_weight((5, 7), ll.Layout.dense(), scale=1.5)
    leaves, treedef = jax.tree_util.tree_flatten(node)
    assert len(leaves) == 3
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.scale == 1.5 and rebuilt.layout == ll.Layout.dense()
    assert jax.tree_util.tree_leaves(ll.Trainable(jnp.zeros(3)))[0].shape == (3,)


def test_residual_init_survives_jit_tree_map_partition_and_combine():
    node = dataclasses.replace(random_weight((5, 7), ll.Layout.dense()), residual_init="pissa")
    tree = {"k": node, "bias": jnp.zeros(7)}
    through_jit = jax.jit(lambda t: t)(tree)
    mapped = jax.tree_util.tree_map(lambda x: x * 2, tree)
    trainable, frozen = ll.partition(tree)
    for out in (through_jit, mapped, ll.combine(trainable, frozen)):
        assert out["k"].residual_init == "pissa"
    assert trainable["k"].residual_init == frozen["k"].residual_init == "pissa"
    # Static data: a tree of another init is another structure (jit retraces on it).
    plain = jax.tree_util.tree_structure(dataclasses.replace(node, residual_init=None))
    assert jax.tree_util.tree_structure(node) != plain
    assert LoraWeight(node.w, node.a, node.b).residual_init is None  # the default
