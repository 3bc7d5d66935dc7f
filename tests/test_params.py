"""init, partition/combine, merge/unmerge: checked against the dense formula in float64."""

import dataclasses
import logging
import math

import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import JIT, MLP, Stacked, dense_reference, randomize_b
from hypothesis import given, settings

import lorax_lite as ll
from lorax_lite.targets import named_leaves
from lorax_lite.weight import is_lora_node

KEY = jax.random.key(0)


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


class Mixed(nn.Module):
    """Embed, DenseGeneral both ways, a 1-D conv and a Dense head."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(20, 8, name="emb")(ids)
        q = nn.DenseGeneral((2, 4), name="qkv")(h)  # kernel (in, heads, head_dim)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)  # kernel (heads, head_dim, out)
        h = nn.relu(nn.Conv(8, (3,), name="conv")(h))  # kernel (width, in, out)
        return nn.Dense(3, name="head")(h)


X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
IDS = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(2, 5)), jnp.int32)
MIXED_TARGETS = ("emb", "qkv", "out", "conv", "head")


def numpy_init(model, *args, seed=0):
    """Random parameters of ``model``'s shapes, drawn by numpy (no XLA compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda *xs: model.init(KEY, *xs), *args)
    draw = lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype)
    return jax.tree_util.tree_map(draw, shapes)


@pytest.fixture(scope="module")
def mlp():
    model = MLP((16, 16, 2), ("fc1", "fc2", "head"), nn.relu)
    return model, numpy_init(model, X)


@pytest.fixture(scope="module")
def mixed():
    return Mixed(), numpy_init(Mixed(), IDS)


@pytest.fixture(scope="module")
def stacked():
    return Stacked(8), numpy_init(Stacked(8), X)


def to_dtype(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)


def lora_nodes(tree):
    return {
        p: x for p, x in named_leaves(tree, is_leaf=is_lora_node) if isinstance(x, ll.LoraWeight)
    }


def assert_merged_matches_reference(merged, lp):
    merged_leaves = dict(named_leaves(merged))
    nodes = lora_nodes(lp)
    assert nodes
    for path, node in nodes.items():
        actual = np.asarray(merged_leaves[path], np.float64)
        assert merged_leaves[path].dtype == node.w.dtype, path
        expected = dense_reference(node)
        if node.w.dtype == jnp.bfloat16:  # one rounding of a float32 sum: one bf16 ulp
            expected = expected.astype(jnp.bfloat16).astype(np.float64)
            tol = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
        else:
            tol = 1e-5 * (1 + np.abs(expected))
        assert np.all(np.abs(actual - expected) <= tol), path
    for path, leaf in named_leaves(untouched_leaves(lp)):
        np.testing.assert_array_equal(merged_leaves[path], leaf)


def untouched_leaves(lp):
    """The leaves of ``lp`` that are neither adapted nor trained."""
    return jax.tree_util.tree_map(
        lambda x: None if is_lora_node(x) else x, lp, is_leaf=is_lora_node
    )


# ---------------------------------------------------------------- zero change at init


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_zero_change_at_init_linen(mlp, mixed, dtype):
    for (model, params), x, targets in (
        (mlp, X, ("fc1", "fc2", "head")),
        (mixed, IDS, MIXED_TARGETS),
    ):
        params = to_dtype(params, dtype)
        config = ll.LoraConfig(rank=2, targets=targets)
        lp = ll.init(params, config, key=KEY, fn=model.apply, args=(x,))
        assert len(lora_nodes(lp)) == len(targets)
        merged = ll.merge(lp)
        chex.assert_trees_all_equal(merged, params, strict=True)
        apply = jax.jit(model.apply)
        np.testing.assert_array_equal(apply(merged, x), apply(params, x))


# ---------------------------------------------------------------- merge vs float64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@JIT
def test_merge_equals_dense_formula_2d_densegeneral_conv_embed(mixed, dtype, jit):
    model, params = mixed
    params = to_dtype(params, dtype)
    config = ll.LoraConfig(rank=2, alpha=3.0, targets=MIXED_TARGETS)
    lp = randomize_b(ll.init(params, config, key=KEY, fn=model.apply, args=(IDS,)), KEY)
    layouts = {p: n.layout for p, n in lora_nodes(lp).items()}
    assert layouts["params/qkv/kernel"] == ll.Layout((), (0,), (1, 2))
    assert layouts["params/out/kernel"] == ll.Layout((), (0, 1), (2,))
    assert layouts["params/conv/kernel"] == ll.Layout((), (0, 1), (2,))
    assert layouts["params/head/kernel"] == ll.Layout.dense()
    merged = maybe_jit(ll.merge, jit)(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert_merged_matches_reference(merged, lp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_merge_stacked_scan_kernels(stacked, dtype):
    model, params = stacked
    params = to_dtype(params, dtype)
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="fc"), key=KEY, fn=model.apply, args=(X,))
    node = lp["params"]["layers"]["fc"]["kernel"]
    assert node.layout == ll.Layout((0,), (1,), (2,))
    assert node.a.shape == (3, 8, 2) and node.b.shape == (3, 2, 8)
    lp = randomize_b(lp, KEY)
    assert_merged_matches_reference(ll.merge(lp), lp)


def test_merge_with_axes_override_and_no_fn():
    rng = np.random.default_rng(2)
    params = {
        "experts": {"w": jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)},
        "proj": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)},
    }
    config = ll.LoraConfig(
        rank=2,
        targets=("experts", "proj"),
        axes={"experts/w": ("in", "stack", "out"), "proj": ("in", "in", "out")},
    )
    lp = randomize_b(ll.init(params, config, key=KEY), KEY)
    assert lp["experts"]["w"].layout == ll.Layout((1,), (0,), (2,))
    assert lp["experts"]["w"].a.shape == (3, 6, 2)
    assert lp["proj"]["kernel"].layout == ll.Layout((), (0, 1), (2,))
    assert_merged_matches_reference(ll.merge(lp), lp)


@pytest.mark.parametrize("reverse", [False, True])
def test_axes_longest_matching_key_wins_whatever_the_order(reverse):
    params = {"proj": {"kernel": jnp.ones((2, 3, 5))}}
    axes = [("proj", ("stack", "in", "out")), ("proj/kernel", ("in", "in", "out"))]
    config = ll.LoraConfig(rank=2, targets="proj", axes=dict(axes[::-1] if reverse else axes))
    assert ll.init(params, config, key=KEY)["proj"]["kernel"].layout == ll.Layout((), (0, 1), (2,))


def test_merge_unwraps_trainable_and_keeps_dtypes(mlp):
    _, params = mlp
    params = to_dtype(params, jnp.bfloat16)
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="fc1", train=("head",)), key=KEY)
    merged = ll.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
    assert lp["params"]["fc1"]["kernel"].a.dtype == jnp.float32


@JIT
def test_merge_accumulates_in_float32(jit):
    # delta = 2**-8 + 2**-20: cast to bf16 before the sum it would round 1 + delta to 1.0.
    delta = 2.0**-8 + 2.0**-20
    w = ll.LoraWeight(jnp.ones((1, 1), jnp.bfloat16), jnp.ones((1, 1)), jnp.full((1, 1), delta))
    merged = maybe_jit(ll.merge, jit)({"w": w})["w"]
    assert merged.dtype == jnp.bfloat16 and float(merged[0, 0]) == 1.0 + 2.0**-7


# ---------------------------------------------------------------- merge checks


def test_merge_check_names_every_non_finite_leaf(mlp):
    _, params = mlp
    lp = ll.init(params, ll.LoraConfig(rank=2, targets=("fc1", "fc2")), key=KEY)
    fc1, fc2 = lp["params"]["fc1"]["kernel"], lp["params"]["fc2"]["kernel"]
    lp["params"]["fc1"]["kernel"] = ll.LoraWeight(fc1.w, fc1.a, fc1.b.at[0, 0].set(jnp.nan))
    lp["params"]["fc2"]["kernel"] = ll.LoraWeight(fc2.w, fc2.a, fc2.b.at[1, 2].set(jnp.inf))
    ll.merge(lp)  # no check, no error
    with pytest.raises(ValueError) as info:
        ll.merge(lp, check=True)
    assert "params/fc1/kernel" in str(info.value) and "params/fc2/kernel" in str(info.value)
    assert "params/head/kernel" not in str(info.value)


def test_merge_probe_logs_largest_deviation(mlp, caplog):
    model, params = mlp
    config = ll.LoraConfig(rank=2, targets=("fc1", "fc2"))
    lp = randomize_b(ll.init(params, config, key=KEY), KEY)
    with caplog.at_level(logging.INFO, logger="lorax_lite"):
        merged = ll.merge(lp, check=True, probe=(model.apply, (X,)))
    (record,) = [r for r in caplog.records if r.name == "lorax_lite"]
    assert "max |merged - unmerged|" in record.getMessage()
    expected = np.abs(
        np.asarray(model.apply(merged, X), np.float64) - np.asarray(ll.lora(model.apply)(lp, X))
    ).max()
    assert record.args[0] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert record.args[0] < 1e-4
    # A non-finite adapter gives a non-finite deviation, which the probe refuses.
    fc1 = lp["params"]["fc1"]["kernel"]
    lp["params"]["fc1"]["kernel"] = ll.LoraWeight(fc1.w, fc1.a.at[0, 0].set(jnp.nan), fc1.b)
    with pytest.raises(ValueError, match="deviates by nan"):
        ll.merge(lp, probe=(model.apply, (X,)))


# ---------------------------------------------------------------- unmerge


def on_grid(x, step):
    """``x`` rounded to multiples of ``step``, a power of two."""
    return jnp.round(x / step) * step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source", ["tree", "partition"])
def test_unmerge_gives_back_the_base_bit_for_bit(mixed, dtype, source):
    """On a coarse binary grid, merging rounds nothing, so the base recovered from the
    merged values (given the partition) is the original bit for bit, as is the kept one."""
    model, params = mixed
    params = jax.tree_util.tree_map(lambda x: on_grid(x, 1 / 8).astype(dtype), params)
    config = ll.LoraConfig(rank=2, alpha=4.0, targets=MIXED_TARGETS[1:], train=("emb",), bias="all")
    lp = randomize_b(ll.init(params, config, key=KEY, fn=model.apply, args=(IDS,)), KEY)
    snap = lambda n: dataclasses.replace(n, a=on_grid(n.a, 1 / 4), b=on_grid(n.b, 1 / 4))
    lp = jax.tree_util.tree_map(
        lambda n: snap(n) if isinstance(n, ll.LoraWeight) else n, lp, is_leaf=is_lora_node
    )
    merged = ll.merge(lp)
    merged_leaves = dict(named_leaves(merged))
    for path, node in lora_nodes(lp).items():  # control: merging changed every base
        assert np.any(np.asarray(merged_leaves[path]) != np.asarray(node.w)), path
    restored = ll.unmerge(merged, lp if source == "tree" else ll.partition(lp)[0])
    chex.assert_trees_all_equal(restored, lp, strict=True)


def test_unmerge_from_trainable_partition_recovers_base(mixed):
    model, params = mixed
    config = ll.LoraConfig(rank=2, targets=MIXED_TARGETS[1:], train=("emb",))
    lp = randomize_b(ll.init(params, config, key=KEY, fn=model.apply, args=(IDS,)), KEY)
    trainable, _ = ll.partition(lp)
    restored = ll.unmerge(ll.merge(lp), trainable)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(lp)
    chex.assert_trees_all_close(restored, lp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- init choices


def test_rank_and_alpha_patterns_longest_wins(mlp):
    _, params = mlp
    config = ll.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=("fc1", "fc2", "head"),
        rank_pattern={"fc.": 3, "params/fc2": 1, "head": 2},
        alpha_pattern={"head": 2.0},
    )
    nodes = lora_nodes(ll.init(params, config, key=KEY))
    ranks = {p: (n.a.shape[-1], n.b.shape[0], n.rank) for p, n in nodes.items()}
    assert ranks == {
        "params/fc1/kernel": (3, 3, 3),
        "params/fc2/kernel": (1, 1, 1),
        "params/head/kernel": (2, 2, 2),
    }
    assert nodes["params/fc1/kernel"].scale == pytest.approx(8.0 / 3)
    assert nodes["params/fc2/kernel"].scale == pytest.approx(8.0 / 1)
    assert nodes["params/head/kernel"].scale == pytest.approx(2.0 / 2)


def test_rslora_scale_is_alpha_over_sqrt_rank(mlp):
    _, params = mlp
    for rslora, expected in ((False, 12.0 / 4), (True, 12.0 / math.sqrt(4))):
        config = ll.LoraConfig(rank=4, alpha=12.0, targets="fc2", use_rslora=rslora)
        node = ll.init(params, config, key=KEY)["params"]["fc2"]["kernel"]
        assert node.scale == pytest.approx(expected)


def test_init_statistics_through_init():
    rng = np.random.default_rng(3)
    params = {"big": {"kernel": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)}}
    kaiming = ll.init(params, ll.LoraConfig(rank=32, targets="big"), key=KEY)["big"]["kernel"]
    bound = 1 / math.sqrt(256)
    assert float(jnp.abs(kaiming.a).max()) <= bound
    assert float(kaiming.a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not np.any(np.asarray(kaiming.b))
    config = ll.LoraConfig(rank=16, targets="big", init="gaussian")
    gaussian = ll.init(params, config, key=KEY)["big"]["kernel"]
    assert float(gaussian.a.std()) == pytest.approx(1 / 16, rel=0.05)


def test_factor_dtype_float32_for_bf16_base_unless_asked(mlp):
    _, params = mlp
    params = to_dtype(params, jnp.bfloat16)
    node = ll.init(params, ll.LoraConfig(rank=2, targets="fc1"), key=KEY)["params"]["fc1"]["kernel"]
    assert node.w.dtype == jnp.bfloat16
    assert node.a.dtype == node.b.dtype == jnp.float32
    config = ll.LoraConfig(rank=2, targets="fc1", dtype="bfloat16")
    node = ll.init(params, config, key=KEY)["params"]["fc1"]["kernel"]
    assert node.a.dtype == node.b.dtype == jnp.bfloat16


def test_one_fresh_key_per_leaf():
    same = np.ones((8, 8), np.float32)
    params = {f"l{i}": {"kernel": jnp.asarray(same)} for i in range(4)}
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="all-linear"), key=KEY)
    a = [np.asarray(lp[f"l{i}"]["kernel"].a) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(a[i], a[j])
    again = ll.init(params, ll.LoraConfig(rank=2, targets="all-linear"), key=KEY)
    np.testing.assert_array_equal(again["l0"]["kernel"].a, a[0])
    other = ll.init(params, ll.LoraConfig(rank=2), key=jax.random.key(1))
    assert not np.allclose(other["l0"]["kernel"].a, a[0])


@pytest.mark.parametrize(
    "bias, trained",
    [
        ("none", []),
        ("all", ["params/fc1/bias", "params/fc2/bias", "params/head/bias"]),
        ("lora_only", ["params/fc1/bias"]),
    ],
)
def test_bias_modes(mlp, bias, trained):
    _, params = mlp
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="fc1", bias=bias), key=KEY)
    found = [p for p, x in named_leaves(lp, is_leaf=is_lora_node) if isinstance(x, ll.Trainable)]
    assert sorted(found) == trained


def test_bias_all_covers_densegeneral_and_stacked_biases(mixed, stacked):
    (model, params), (s_model, s_params) = mixed, stacked
    config = ll.LoraConfig(rank=2, targets="qkv", bias="lora_only")
    lp = ll.init(params, config, key=KEY, fn=model.apply, args=(IDS,))
    assert isinstance(lp["params"]["qkv"]["bias"], ll.Trainable)  # shape (2, 4)
    lp = ll.init(s_params, ll.LoraConfig(rank=2, bias="all"), key=KEY, fn=s_model.apply, args=(X,))
    assert isinstance(lp["params"]["layers"]["fc"]["bias"], ll.Trainable)  # shape (3, 8)


def test_all_linear_with_fn_excludes_embed_includes_dense_and_densegeneral(mixed):
    model, params = mixed
    lp = ll.init(params, ll.LoraConfig(rank=2), key=KEY, fn=model.apply, args=(IDS,))
    assert sorted(lora_nodes(lp)) == [
        "params/head/kernel",
        "params/out/kernel",
        "params/qkv/kernel",
    ]


def test_all_linear_without_fn_takes_kernels(mlp):
    _, params = mlp
    params = {**params["params"], "emb": {"embedding": jnp.ones((10, 16))}}
    lp = ll.init(params, ll.LoraConfig(rank=2), key=KEY)
    assert sorted(lora_nodes(lp)) == ["fc1/kernel", "fc2/kernel", "head/kernel"]


def test_train_wraps_leaves_in_trainable(mlp):
    _, params = mlp
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="fc1", train=("head",)), key=KEY)
    assert isinstance(lp["params"]["head"]["kernel"], ll.Trainable)
    assert isinstance(lp["params"]["head"]["bias"], ll.Trainable)
    np.testing.assert_array_equal(
        lp["params"]["head"]["kernel"].value, params["params"]["head"]["kernel"]
    )


# ---------------------------------------------------------------- validation


def init_error(params, **kwargs):
    fn = kwargs.pop("fn", None)
    args = kwargs.pop("args", ())
    with pytest.raises(ValueError) as info:
        ll.init(params, ll.LoraConfig(**kwargs), key=KEY, fn=fn, args=args)
    return str(info.value)


def test_rank_larger_than_weight_names_the_path(mlp):
    _, params = mlp
    text = init_error(params, rank=3, targets=("fc1", "head"))
    assert "params/head/kernel: rank 3 > min(d_in=16, d_out=2)" in text
    assert "fc1" not in text
    text = init_error(params, rank=2, rank_pattern={"fc2": 17}, targets="fc2")
    assert "params/fc2/kernel: rank 17 > min(d_in=16, d_out=16)" in text


def test_pattern_matching_nothing_lists_closest_paths(mlp):
    _, params = mlp
    text = init_error(params, targets=("fc_1", "fc2"))
    assert "target 'fc_1' matches no adaptable leaf" in text
    closest = text.split("closest:")[1]
    assert closest.index("params/fc1/kernel") < closest.index("params/head/kernel")


def test_every_pattern_matching_nothing_lists_closest_paths(mlp):
    """A typo in train, exclude or a rank/alpha/axes key raises like one in targets."""
    _, params = mlp
    text = init_error(
        params,
        rank=2,
        targets=("fc1", "fc2"),
        exclude=("fc_3",),
        train=("haed",),
        rank_pattern={"fc_2": 3, "head": 1},  # head is not adapted
        alpha_pattern={"fc1/kernal": 4.0},
        axes={"fc_1": ("in", "out")},
    )
    lines = text.splitlines()[1:]
    expected = [
        "exclude 'fc_3' matches no adaptable leaf; closest: ['params/fc1/kernel'",
        "train 'haed' matches no leaf; closest: ['params/head/",
        "rank_pattern key 'fc_2' matches no adapted leaf; closest: ['params/fc2/kernel'",
        "rank_pattern key 'head' matches no adapted leaf; closest: [",
        "alpha_pattern key 'fc1/kernal' matches no adapted leaf; closest: ['params/fc1/kernel'",
        "axes key 'fc_1' matches no adapted leaf; closest: ['params/fc1/kernel'",
    ]
    assert len(lines) == len(expected), text
    for line, start in zip(lines, expected):
        assert line.strip().startswith(start), line


def test_init_refuses_a_tree_that_already_holds_lora_leaves(mlp):
    _, params = mlp
    config = ll.LoraConfig(rank=2, targets="fc1", train=("head",))
    lp = ll.init(params, config, key=KEY)
    for tree in (lp, ll.partition(lp)[0], ll.partition(lp)[1]):
        with pytest.raises(ValueError) as err:
            ll.init(tree, config, key=KEY)
        text = str(err.value)
        assert "params already hold LoRA leaves, which init would nest" in text
        for leaf in ("fc1/kernel (LoraWeight)", "head/bias (Trainable)", "head/kernel (Trainable)"):
            assert f"\n  params/{leaf}" in text


def test_pattern_naming_only_leaves_that_take_no_adapter():
    """Integer and 1-D leaves, and biases and norm scales of any rank, take no adapter."""
    params = {
        "fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
        "dg": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))},
        "norm": {"scale": jnp.ones((2, 4))},
        "step": jnp.zeros((2, 2), int),
    }
    targets = ("step", "fc/bias", "dg/bias", "norm")
    text = init_error(params, rank=2, targets=targets)
    for target, leaf in zip(targets, ("step", "fc/bias", "dg/bias", "norm/scale")):
        assert f"target '{target}' names only leaves that take no adapter ({leaf}); " in text
    expected = "adapters go on float arrays of rank >= 2 not named 'bias' or 'scale'"
    assert text.count(expected) == 4


def test_target_matching_only_excluded_leaves(mlp):
    _, params = mlp
    text = init_error(params, rank=2, targets="fc2", exclude=("params",))
    assert "target 'fc2' matches only excluded leaves (params/fc2/kernel)" in text


def test_leaf_both_adapted_and_trained(mlp):
    _, params = mlp
    text = init_error(params, rank=2, targets=("fc1", "fc2"), train=("fc.*",))
    assert "params/fc1/kernel: both adapted and trained in full" in text
    assert "params/fc2/kernel: both adapted and trained in full" in text


def test_ambiguous_leaf_without_fn_or_axes(mixed):
    _, params = mixed
    text = init_error(params, rank=2, targets=("qkv", "conv"))
    for path, shape in (("params/qkv/kernel", (8, 2, 4)), ("params/conv/kernel", (3, 8, 8))):
        assert f"{path}: shape {shape} has 3 axes" in text
    assert "pass fn= and args= to init" in text and "axes=" in text


def test_axes_override_with_wrong_arity(mixed):
    _, params = mixed
    text = init_error(params, rank=2, targets="qkv", axes={"qkv": ("in", "out")})
    assert "params/qkv/kernel: axes override ('in', 'out') has 2 roles for shape (8, 2, 4)" in text


def test_init_lists_every_problem_at_once(mixed):
    model, params = mixed
    text = init_error(params, rank=5, targets=("qkv", "nope", "head"), train=("head",))
    lines = text.splitlines()[1:]
    assert len(lines) == 4, text
    assert any("'nope' matches no adaptable leaf" in line for line in lines)
    assert any("params/head/kernel: both adapted" in line for line in lines)
    assert any("params/qkv/kernel: shape (8, 2, 4)" in line for line in lines)
    assert any("params/head/kernel: rank 5 > min(d_in=8, d_out=3)" in line for line in lines)


# ---------------------------------------------------------------- partition / combine

ARRAYS = st.builds(
    lambda n, v: np.full((n,), v, np.float32), st.integers(1, 3), st.floats(-2, 2, width=32)
)
LORA = st.builds(
    lambda n, v: ll.LoraWeight(
        np.full((n, 3), v, np.float32), np.full((n, 1), v + 1, np.float32), np.zeros((1, 3))
    ),
    st.integers(1, 3),
    st.floats(-2, 2, width=32),
)
TRAINABLE = st.builds(ll.Trainable, ARRAYS)
KEYS = st.text(alphabet="abcxyz", min_size=1, max_size=3)
TREES = st.recursive(
    st.one_of(ARRAYS, LORA, TRAINABLE, st.none()),
    lambda children: st.one_of(
        st.dictionaries(KEYS, children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=8,
)


def count_nodes(tree):
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=is_lora_node)
    n_lora = sum(isinstance(x, ll.LoraWeight) for x in nodes)
    n_train = sum(isinstance(x, ll.Trainable) for x in nodes)
    return n_lora, n_train, len(nodes) - n_lora - n_train


@settings(max_examples=25, deadline=None)
@given(tree=TREES)
def test_partition_combine_round_trip(tree):
    trainable, frozen = ll.partition(tree)
    chex.assert_trees_all_equal(ll.combine(trainable, frozen), tree, strict=True)
    chex.assert_trees_all_equal(ll.combine(frozen, trainable), tree, strict=True)
    n_lora, n_train, n_plain = count_nodes(tree)
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    names = [jax.tree_util.keystr(path).rsplit(".", 1)[-1] for path, _ in flat]
    assert sorted(names) == sorted(["a", "b"] * n_lora + ["value"] * n_train)
    assert len(jax.tree_util.tree_leaves(frozen)) == n_lora + n_plain
    for node in jax.tree_util.tree_leaves(frozen, is_leaf=is_lora_node):
        assert not isinstance(node, ll.LoraWeight) or (node.a is None and node.b is None)


@JIT
def test_partition_combine_under_jit(mixed, jit):
    model, params = mixed
    config = ll.LoraConfig(rank=2, targets=MIXED_TARGETS[1:], train=("emb",), bias="all")
    lp = ll.init(params, config, key=KEY, fn=model.apply, args=(IDS,))
    trainable, frozen = maybe_jit(ll.partition, jit)(lp)
    chex.assert_trees_all_equal(maybe_jit(ll.combine, jit)(trainable, frozen), lp, strict=True)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    assert n_trainable == ll.count(lp)["trainable"]


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "olora"])
def test_init_records_a_residual_base_on_each_adapter(mlp, init):
    _, params = mlp
    lp = ll.init(params, ll.LoraConfig(rank=2, targets=("fc1",), init=init), key=KEY)
    node = lp["params"]["fc1"]["kernel"]
    assert node.residual_init == (init if init in ("pissa", "olora") else None)
    if node.residual_init is not None:  # the base is not the original weight
        assert not np.array_equal(np.asarray(node.w), np.asarray(params["params"]["fc1"]["kernel"]))
