"""AdapterSet, combine_adapters, route and vmap_train_step, against dense and float64 references."""

import dataclasses
import functools
import re
import warnings

import chex
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import JIT, MLP, Stacked, dense_reference, randomize_b

import lorax_lite as ll
from lorax_lite.targets import named_leaves
from lorax_lite.weight import Gathered, is_lora_node

X = jnp.asarray(np.random.default_rng(0).normal(size=(7, 10)), jnp.float32)
MODELS = {"mlp": MLP((24, 6), ("fc1", "fc2")), "stacked": Stacked(10)}
PARAMS = {name: m.init(jax.random.key(0), X) for name, m in MODELS.items()}


@functools.cache
def make_adapter(model, seed, *, rank, alpha=None, targets="all-linear", **config):
    params = PARAMS[model]
    cfg = ll.LoraConfig(rank=rank, alpha=alpha or 2 * rank, targets=targets, **config)
    tree = ll.init(params, cfg, key=jax.random.key(seed), fn=MODELS[model].apply, args=(X,))
    return randomize_b(tree, jax.random.key(seed + 1000))


@functools.cache
def mixed_set(model="mlp"):
    """Ranks 2, 4, 3; adapter b has another scale; adapter c adapts fc1 only (MLP)."""
    only_first = ("fc1",) if model == "mlp" else "all-linear"
    trees = {
        "a": make_adapter(model, 1, rank=2),
        "b": make_adapter(model, 2, rank=4, alpha=2.0),
        "c": make_adapter(model, 3, rank=3, targets=only_first),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ll.AdapterSet.from_trees(trees), trees


def lora_nodes(tree):
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora_node) if is_lora_node(x)]


def dense_delta(node):
    """``scale * A @ B`` in float64, in the weight's axis order."""
    return dense_reference(node) - np.asarray(node.w, np.float64)


# --- AdapterSet ----------------------------------------------------------------------------


def test_padding_warns_records_and_get_returns_the_original_bits():
    trees = {"a": make_adapter("mlp", 1, rank=2), "b": make_adapter("mlp", 2, rank=4)}
    with pytest.warns(UserWarning, match=r"a: params/fc1/kernel rank 2 -> 4"):
        adapters = ll.AdapterSet.from_trees(trees)
    assert adapters.padding == {
        "a": {"params/fc1/kernel": (2, 4), "params/fc2/kernel": (2, 4)},
    }
    assert adapters.ranks == ((2, 2), (4, 4))
    for name, tree in trees.items():
        chex.assert_trees_all_equal(adapters.get(name), tree, strict=True)


def test_padded_and_rescaled_selection_keeps_outputs_exact():
    adapters, trees = mixed_set("mlp")
    apply = jax.jit(ll.lora(MODELS["mlp"].apply))
    for name, tree in trees.items():
        selected = adapters.select(name)
        assert lora_nodes(selected)[0].rank == 4  # padded
        expected = apply(tree, X)
        chex.assert_trees_all_close(apply(selected, X), expected, rtol=1e-6, atol=1e-7)
        # The dense weights agree too (float64 reference of the original adapter).
        for got, want in zip(lora_nodes(selected), lora_nodes(tree)):
            np.testing.assert_allclose(dense_reference(got), dense_reference(want), atol=1e-6)


def test_not_adapted_leaf_gets_zero_factors_and_comes_back_plain():
    adapters, trees = mixed_set("mlp")
    c = adapters.select("c")["params"]["fc2"]["kernel"]
    assert not np.asarray(c.b).any()
    assert adapters.padding["c"]["params/fc2/kernel"] == (0, 4)
    chex.assert_trees_all_equal(adapters.get("c"), trees["c"], strict=True)


def test_add_and_remove_return_new_sets():
    adapters, trees = mixed_set("mlp")
    extra = make_adapter("mlp", 9, rank=5)
    with pytest.warns(UserWarning, match=r"rank 4 -> 5"):
        bigger = adapters.add("d", extra)
    assert adapters.names == ("a", "b", "c") and bigger.names == ("a", "b", "c", "d")
    assert lora_nodes(adapters.select("a"))[0].rank == 4  # the old set is unchanged
    smaller = bigger.remove("d").remove("b")
    assert smaller.names == ("a", "c")
    assert smaller.ranks == ((2, 2), (3, 0))
    for name in ("a", "c"):
        chex.assert_trees_all_equal(smaller.get(name), trees[name], strict=True)
    with pytest.raises(ValueError, match="already in the set"):
        adapters.add("a", extra)
    with pytest.raises(KeyError, match=r"no adapter named 'z'.*\['a', 'b', 'c'\]"):
        adapters.remove("z")
    with pytest.raises(ValueError, match="only adapter"):
        smaller.remove("a").remove("c")


@JIT
def test_base_and_index_minus_one_are_the_base_model(jit):
    adapters, _ = mixed_set("mlp")
    model = MODELS["mlp"]
    expected = model.apply(PARAMS["mlp"], X)
    chex.assert_trees_all_equal(adapters.base(), PARAMS["mlp"], strict=True)
    fn = lambda s, i, x: ll.lora(model.apply)(s.select(i), x)
    fn = jax.jit(fn) if jit else fn
    chex.assert_trees_all_close(fn(adapters, jnp.int32(-1), X), expected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(fn(adapters, -1, X), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(IndexError, match=r"outside \[-1, 3\)"):
        adapters.select(3)


def test_switching_same_shape_adapters_does_not_recompile():
    adapters, trees = mixed_set("mlp")
    traces = []
    apply = ll.lora(MODELS["mlp"].apply)

    @jax.jit
    def forward(adapters, index, x):
        traces.append(1)
        return apply(adapters.select(index), x)

    for name in ("a", "b", "c", "a"):
        out = forward(adapters, jnp.int32(adapters.index(name)), X)
        chex.assert_trees_all_close(out, apply(trees[name], X), rtol=1e-6, atol=1e-7)
    forward(adapters, jnp.int32(-1), X)
    retrained = adapters.with_trainable(jax.tree_util.tree_map(lambda x: x + 1, adapters.stacked))
    forward(retrained, jnp.int32(1), X)
    assert len(traces) == 1


def test_structure_and_layout_problems_are_listed():
    mlp = make_adapter("mlp", 1, rank=2)
    other = {"params": {"fc1": mlp["params"]["fc1"]}}
    with pytest.raises(ValueError, match=r"adapter 'b': structure differs .*params/fc2/bias"):
        ll.AdapterSet.from_trees({"a": mlp, "b": other})
    node = mlp["params"]["fc1"]["kernel"]
    flipped = ll.LoraWeight(node.w, node.b.T, node.a.T, node.scale, ll.Layout((), (1,), (0,)))
    bad = jax.tree_util.tree_map(lambda x: x, mlp)
    bad["params"]["fc1"]["kernel"] = flipped
    with pytest.raises(ValueError, match=r"params/fc1/kernel: layouts differ"):
        ll.AdapterSet.from_trees({"a": mlp, "b": bad})
    trainable, _ = ll.partition(mlp)
    with pytest.raises(ValueError, match=r"params/fc1/kernel: no base weight"):
        ll.AdapterSet.from_trees({"a": trainable})
    ok = ll.AdapterSet.from_trees({"a": trainable}, base=PARAMS["mlp"])
    chex.assert_trees_all_equal(ok.get("a"), mlp, strict=True)


def test_names_that_are_not_strings_are_refused():
    """``{1: a, 0: b}`` would make ``select(0)`` (a position) serve adapter 1 while
    ``combine_adapters(s, {0: 1.0})`` (a name) reads adapter 0."""
    a, b = make_adapter("mlp", 1, rank=2), make_adapter("mlp", 2, rank=2)
    with pytest.raises(TypeError, match=r"must be strings .* got 1 \(int\), 0 \(int\)"):
        ll.AdapterSet.from_trees({1: a, 0: b})
    with pytest.raises(TypeError, match=r"got 0 \(int\)"):
        ll.combine_adapters({"a": a, 0: b}, {"a": 1.0})
    with pytest.raises(TypeError, match=r"got np.int64\(1\) \(int64\)"):
        ll.AdapterSet.from_trees({"a": a}).add(np.int64(1), b)


def test_adapters_of_another_base_are_refused():
    mlp = make_adapter("mlp", 1, rank=2)
    other_base = MODELS["mlp"].init(jax.random.key(5), X)
    cfg = ll.LoraConfig(rank=2, alpha=4, targets="all-linear")
    foreign = ll.init(other_base, cfg, key=jax.random.key(6), fn=MODELS["mlp"].apply, args=(X,))
    with pytest.raises(ValueError) as err:
        ll.AdapterSet.from_trees({"a": mlp, "b": foreign})
    message = str(err.value)
    for path in ("params/fc1/kernel", "params/fc2/kernel"):
        want = f"{path}: 'b' has another base weight than 'a' (same shape, different values)"
        assert want in message
    assert "bias" not in message  # both bases have zero biases
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS["mlp"])
    wrong_dtype = r"fc1/bias: 'a' has another base.*'base' \(\(24,\) float32 vs"
    with pytest.raises(ValueError, match=wrong_dtype):
        ll.AdapterSet.from_trees({"a": mlp}, base=half)
    adapters = ll.AdapterSet.from_trees({"a": mlp})
    with pytest.raises(ValueError, match="'c' has another base weight than 'base'"):
        adapters.add("c", foreign)


def test_select_checks_concrete_indices():
    adapters, _ = mixed_set("mlp")
    with pytest.raises(IndexError, match=r"adapter index 3 outside \[-1, 3\)"):
        adapters.select(jnp.int32(3))
    with pytest.raises(IndexError, match=r"adapter index -2 outside"):
        adapters.select(np.int64(-2))
    with pytest.raises(TypeError, match="integer scalar"):
        adapters.select(1.0)
    with pytest.raises(TypeError, match="integer scalar"):
        adapters.select(jnp.array([0, 1]))
    with pytest.raises(TypeError, match="integer scalar"):
        jax.jit(lambda i: adapters.select(i))(jnp.float32(0))


# --- leaves trained in full -----------------------------------------------------------------


def with_trained_biases(seed):
    tree = make_adapter("mlp", seed, rank=2, bias="all")
    noise = lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 7), x.shape)
    return jax.tree_util.tree_map(
        lambda n: ll.Trainable(noise(n.value)) if isinstance(n, ll.Trainable) else n,
        tree,
        is_leaf=is_lora_node,
    )


def test_trained_leaves_route_and_combine_as_task_vectors():
    trees = {"a": with_trained_biases(1), "b": with_trained_biases(2)}
    adapters = ll.AdapterSet.from_trees(trees, base=PARAMS["mlp"])
    model = MODELS["mlp"]
    ids = jnp.array([1, -1, 0, 1, -1, 0, 0])
    out = jax.jit(ll.route(model.apply))(adapters, ids, X)
    for k, i in enumerate(ids.tolist()):
        tree = PARAMS["mlp"] if i < 0 else ll.merge(trees[adapters.names[i]])
        np.testing.assert_allclose(out[k], model.apply(tree, X[k : k + 1])[0], atol=2e-6)
    combined = ll.combine_adapters(adapters, {"a": 0.5, "b": -2.0}, method="cat").tree
    base_bias = np.asarray(PARAMS["mlp"]["params"]["fc2"]["bias"], np.float64)
    bias = lambda t: np.asarray(t["params"]["fc2"]["bias"].value, np.float64)
    want = base_bias + 0.5 * (bias(trees["a"]) - base_bias) - 2.0 * (bias(trees["b"]) - base_bias)
    np.testing.assert_allclose(bias(combined), want, atol=1e-6)
    unknown = ll.AdapterSet.from_trees(trees)
    with pytest.raises(ValueError, match=r"params/fc1/bias', 'params/fc2/bias'.*base=params"):
        unknown.select(-1)
    with pytest.raises(ValueError, match=r"params/fc1/bias: trained in full, base value unknown"):
        ll.combine_adapters(unknown, {"a": 1.0}, method="cat")


# --- combine_adapters -------------------------------------------------------------------------


def weighted_target(adapters, trees, weights, index):
    """``sum_i w_i delta_i`` at the index-th adapted leaf, float64, from the original trees."""
    total = 0.0
    for name, weight in weights.items():
        nodes = [x for x in jax.tree_util.tree_leaves(trees[name], is_leaf=is_lora_node)]
        path_nodes = dict(zip(leaf_paths(trees[name]), nodes))
        node = path_nodes[adapters.lora_paths[index]]
        if isinstance(node, ll.LoraWeight):
            total = total + weight * dense_delta(node)
    return total


def leaf_paths(tree):
    return [p for p, _ in named_leaves(tree, is_leaf=is_lora_node)]


@pytest.mark.parametrize("model", MODELS)
def test_cat_is_the_exact_weighted_sum_of_deltas(model):
    adapters, trees = mixed_set(model)
    weights = {"a": 0.7, "b": -1.3, "c": 0.25}
    combined = ll.combine_adapters(adapters, weights, method="cat")
    for k, node in enumerate(lora_nodes(combined.tree)):
        target = weighted_target(adapters, trees, weights, k)
        assert node.scale == 1.0 and node.rank == sum(r[k] for r in adapters.ranks)
        np.testing.assert_allclose(dense_delta(node), target, rtol=0, atol=1e-6)
        assert float(combined.errors[adapters.lora_paths[k]]) == 0.0
    # On the forward path, unmerged, it runs all three adapters at once.
    targets = iter(
        [weighted_target(adapters, trees, weights, k) for k in range(len(adapters.lora_paths))]
    )
    dense = jax.tree_util.tree_map(
        lambda n: np.asarray(n.w, np.float64) + next(targets) if is_lora_node(n) else n,
        combined.tree,
        is_leaf=is_lora_node,
    )
    dense = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), dense)
    stacked_forward = ll.lora(MODELS[model].apply, strict=True)  # strict: nothing merged
    chex.assert_trees_all_close(
        stacked_forward(combined.tree, X),
        MODELS[model].apply(dense, X),
        rtol=1e-5,
        atol=1e-6,
    )


def test_combining_keeps_the_residual_init_and_refuses_mixed_ones():
    """Over a PiSSA residual base the combined adapter is still marked ``"pissa"`` (so
    `to_peft` refuses it as it refuses the adapters); adapters marked differently over
    one base cannot be combined, and the error names them."""
    pissa = {n: make_adapter("mlp", seed, rank=2, init="pissa") for n, seed in (("a", 1), ("b", 2))}
    assert {n.residual_init for n in lora_nodes(pissa["a"])} == {"pissa"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("cat", "svd"):
            combined = ll.combine_adapters(pissa, {"a": 0.5, "b": 0.5}, method=method, rank=2)
            assert {n.residual_init for n in lora_nodes(combined.tree)} == {"pissa"}, method
    unmarked = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, residual_init=None) if is_lora_node(n) else n,
        pissa["b"],
        is_leaf=is_lora_node,
    )
    with pytest.raises(ValueError, match=r"fc1\S*: adapters differ in residual_init") as e:
        ll.combine_adapters({"a": pissa["a"], "b": unmarked}, {"a": 0.5, "b": 0.5})
    assert "{'a': 'pissa', 'b': None}" in str(e.value)


@pytest.mark.parametrize("model", MODELS)
def test_svd_at_full_rank_is_the_weighted_sum(model):
    adapters, trees = mixed_set(model)
    weights = {"a": 1.0, "b": 0.5, "c": -0.5}
    combined = ll.combine_adapters(adapters, weights, method="svd", rank=64)
    nodes = lora_nodes(combined.tree)
    assert len(nodes) == len(adapters.lora_paths) > 0
    for k, node in enumerate(nodes):
        target = weighted_target(adapters, trees, weights, k)
        np.testing.assert_allclose(dense_delta(node), target, rtol=0, atol=2e-5)
        assert float(combined.errors[adapters.lora_paths[k]]) < 1e-5


def test_svd_low_rank_error_matches_float64_reference():
    adapters, trees = mixed_set("mlp")
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    combined = ll.combine_adapters(adapters, weights, method="svd", rank=2)
    for k, node in enumerate(lora_nodes(combined.tree)):
        target = weighted_target(adapters, trees, weights, k)
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        error = np.sqrt((s[2:] ** 2).sum() / (s**2).sum())
        assert node.rank == 2 and error > 0.05  # a real truncation
        reported = float(combined.errors[adapters.lora_paths[k]])
        np.testing.assert_allclose(reported, error, rtol=1e-4, atol=1e-6)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(dense_delta(node), best, atol=1e-5)
    default = ll.combine_adapters(adapters, weights, method="svd").tree
    assert [n.rank for n in lora_nodes(default)] == [4, 4]  # the largest input rank


def test_linear_is_peft_linear_with_its_error_reported():
    trees = {"a": make_adapter("mlp", 1, rank=3), "b": make_adapter("mlp", 2, rank=3, alpha=3.0)}
    adapters = ll.AdapterSet.from_trees(trees)
    weights = {"a": 0.6, "b": -0.4}
    combined = ll.combine_adapters(trees, weights, method="linear")
    for k, node in enumerate(lora_nodes(combined.tree)):
        a_sum, b_sum = 0.0, 0.0
        for name, weight in weights.items():
            src = lora_nodes(trees[name])[k]
            c = np.sqrt(abs(weight) * src.scale)
            a_sum = a_sum + np.sign(weight) * c * np.asarray(src.a, np.float64)
            b_sum = b_sum + c * np.asarray(src.b, np.float64)
        np.testing.assert_allclose(dense_delta(node), a_sum @ b_sum, atol=1e-6)
        target = weighted_target(adapters, trees, weights, k)
        error = np.linalg.norm(a_sum @ b_sum - target) / np.linalg.norm(target)
        np.testing.assert_allclose(float(combined.errors[adapters.lora_paths[k]]), error, 1e-4)
    mixed, _ = mixed_set("mlp")
    with pytest.raises(ValueError, match=r"params/fc1/kernel: ranks \[2, 4\] differ"):
        ll.combine_adapters(mixed, {"a": 1.0, "b": 1.0}, method="linear")


def test_combine_argument_errors_are_listed():
    adapters, _ = mixed_set("mlp")
    with pytest.raises(ValueError, match=r"method must be.*unknown adapters \['z'\].*rank must"):
        ll.combine_adapters(adapters, {"z": 1.0}, method="ties_svd", rank=0)


def test_combine_refuses_weights_that_are_not_finite_numbers():
    adapters, _ = mixed_set("mlp")
    for method in ("cat", "linear", "svd"):
        bad = {"a": float("nan"), "b": np.float32("inf"), "c": "0.5"}
        with pytest.raises(ValueError, match=r"finite numbers, got \{'a': nan, 'b': .*inf.*'c'"):
            ll.combine_adapters(adapters, bad, method=method)
    combined = ll.combine_adapters(adapters, {"a": np.float32(0.5)}, method="svd", rank=np.int64(2))
    assert [n.rank for n in lora_nodes(combined.tree)] == [2, 2]


def test_combination_error_reads_nan_as_nan_and_exact_as_zero():
    nan_b = lambda node: dataclasses.replace(node, b=node.b.at[0, 0].set(jnp.nan))
    tree = jax.tree_util.tree_map(
        lambda x: nan_b(x) if is_lora_node(x) else x,
        make_adapter("mlp", 1, rank=2),
        is_leaf=is_lora_node,
    )
    errors = ll.combine_adapters({"a": tree}, {"a": 1.0}, method="svd").errors
    assert all(np.isnan(float(e)) for e in errors.values()), errors
    zero = ll.init(PARAMS["mlp"], ll.LoraConfig(rank=2), key=jax.random.key(1))  # B = 0
    errors = ll.combine_adapters({"a": zero}, {"a": 1.0}, method="svd").errors
    assert [float(e) for e in errors.values()] == [0.0, 0.0]


def test_selected_and_combined_adapters_merge_for_export():
    adapters, trees = mixed_set("mlp")
    merged = ll.merge(adapters.select("b"))
    for node, leaf in zip(lora_nodes(trees["b"]), jax.tree_util.tree_leaves(merged)[1::2]):
        np.testing.assert_allclose(leaf, dense_reference(node), atol=1e-6)
    combined = ll.combine_adapters(adapters, {"a": 0.5, "c": 0.5}, method="svd").tree
    model = MODELS["mlp"]
    chex.assert_trees_all_close(
        model.apply(ll.merge(combined), X),
        ll.lora(model.apply)(combined, X),
        rtol=1e-5,
        atol=1e-6,
    )


# --- route ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, jit", [("mlp", False), ("mlp", True), ("stacked", True)], ids=["eager", "jit", "scan"]
)
def test_routing_matches_each_example_run_with_its_own_adapter(model, jit):
    adapters, trees = mixed_set(model)
    ids = jnp.array([2, 0, -1, 1, 1, -1, 0])
    routed = ll.route(MODELS[model].apply)
    routed = jax.jit(routed) if jit else routed
    out = routed(adapters, ids, X)
    assert out.shape == (7, MODELS[model].apply(PARAMS[model], X).shape[1])
    apply = ll.lora(MODELS[model].apply)
    for k, i in enumerate(ids.tolist()):
        x = X[k : k + 1]
        alone = MODELS[model].apply(PARAMS[model], x) if i < 0 else apply(trees["abc"[i]], x)
        np.testing.assert_allclose(out[k], alone[0], rtol=1e-5, atol=1e-6)
        dense = PARAMS[model] if i < 0 else ll.merge(trees["abc"[i]])  # the dense reference
        np.testing.assert_allclose(out[k], MODELS[model].apply(dense, x)[0], atol=2e-6)


def hlo_sizes(compiled_text):
    """Element counts of every array shape in an HLO module's text."""
    shapes = re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]*)\]", compiled_text)
    return [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]


def test_routing_keeps_the_base_weight_unbatched_in_the_compiled_program():
    adapters, _ = mixed_set("mlp")
    model = MODELS["mlp"]
    x = jnp.tile(X, (4, 1))  # 28 examples
    ids = jnp.arange(28) % 4 - 1
    per_example_weight = 28 * 10 * 24  # fc1 kernel (10, 24) broadcast over the examples
    routed = jax.jit(ll.route(model.apply)).lower(adapters, ids, x).compile().as_text()
    assert max(hlo_sizes(routed)) < per_example_weight

    # The check can fail: merging per example does broadcast the weight.
    naive = jax.vmap(lambda i, xi: model.apply(ll.merge(adapters.select(i)), xi[None])[0])
    naive = jax.jit(naive).lower(ids, x).compile().as_text()
    assert max(hlo_sizes(naive)) >= per_example_weight


@pytest.mark.parametrize("model", ["mlp", "stacked"])
def test_per_example_gives_each_example_its_selected_tree(model):
    adapters, _ = mixed_set(model)
    ids = jnp.array([2, 0, -1, 1, 1, -1, 0])
    tree, axes = adapters.per_example(ids)
    factors = [x for n in lora_nodes(tree) if isinstance(n, ll.LoraWeight) for x in (n.a, n.b)]
    assert factors and all(isinstance(x, Gathered) for x in factors)  # gathered where used
    is_gathered = lambda x: isinstance(x, Gathered)
    resolve = lambda t: jax.tree_util.tree_map(
        lambda x: x.resolve() if is_gathered(x) else x, t, is_leaf=is_gathered
    )
    every = jax.vmap(resolve, in_axes=(axes,))(tree)
    for k, i in enumerate(ids.tolist()):
        example = jax.tree_util.tree_map(lambda x, k=k: x[k], every)
        chex.assert_trees_all_equal(example, adapters.select(i))


def test_routing_gathers_scanned_factors_per_layer_without_copies():
    """Each scan step gathers its own layer's factors: the routed program moves about
    0.35x the bytes of a per-example select under ``jax.vmap`` (which gathers every
    layer's factors example-major, then the scan copies them layer-major) on jax 0.10
    to 0.12; gathering every layer up front, laid out for the scan, gave 0.6x."""
    adapters, _ = mixed_set("stacked")
    model, ids = MODELS["stacked"], jnp.array([2, 0, -1, 1, 1, -1, 0])
    apply = ll.lora(model.apply)
    per_select = jax.vmap(lambda i, xi: apply(adapters.select(i), xi[None])[0])

    def bytes_accessed(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

    routed = bytes_accessed(ll.route(model.apply), adapters, ids, X)
    assert routed < 0.5 * bytes_accessed(per_select, ids, X)


def test_routing_gradients_equal_those_of_each_example_run_alone():
    """Through the gathers inside the scan, each adapter's factors get the sum of the
    gradients of the examples routed to it."""
    adapters, _ = mixed_set("stacked")
    model, ids = MODELS["stacked"], jnp.array([2, 0, -1, 1, 1, -1, 0])
    with_stacked = lambda stacked: dataclasses.replace(adapters, stacked=stacked)

    def routed_loss(stacked):
        return jnp.sum(ll.route(model.apply)(with_stacked(stacked), ids, X) ** 2)

    def separate_loss(stacked):
        apply = ll.lora(model.apply)
        outs = [apply(with_stacked(stacked).select(i), X[k : k + 1]) for k, i in enumerate(ids)]
        return sum(jnp.sum(out**2) for out in outs)

    routed = jax.jit(jax.grad(routed_loss))(adapters.stacked)
    chex.assert_trees_all_close(routed, jax.grad(separate_loss)(adapters.stacked), atol=1e-5)


def test_routing_draws_dropout_per_example_and_checks_ids():
    trees = {n: make_adapter("mlp", s, rank=2, dropout=0.5) for n, s in (("a", 1), ("b", 2))}
    adapters = ll.AdapterSet.from_trees(trees)
    routed = jax.jit(ll.route(MODELS["mlp"].apply))
    x = jnp.tile(X[:1], (4, 1))  # four copies of one example, one adapter
    ids = jnp.zeros(4, jnp.int32)
    plain = routed(adapters, ids, x)
    dropped = routed(adapters, ids, x, dropout_key=jax.random.key(3))
    np.testing.assert_allclose(plain, jnp.tile(plain[:1], (4, 1)), atol=1e-6)
    assert not np.allclose(dropped[0], dropped[1])  # own masks per example
    assert not np.allclose(dropped[0], plain[0])
    with pytest.raises(ValueError, match="one id per example"):
        routed(adapters, jnp.zeros(3, jnp.int32), x)


@pytest.mark.parametrize("model", ["mlp", "stacked"])
def test_routing_rejects_bad_ids_and_marks_traced_ones_nan(model):
    adapters, trees = mixed_set(model)
    routed = ll.route(MODELS[model].apply)
    with pytest.raises(ValueError, match=r"adapter_ids \[-2, 3\] outside \[-1, 3\)"):
        routed(adapters, jnp.array([0, 3, -2, 3, 0, 0, 0]), X)
    with pytest.raises(TypeError, match="must be integers"):
        routed(adapters, jnp.zeros(7), X)
    with pytest.raises(ValueError, match=r"one id per example; got shape \(7, 1\)"):
        routed(adapters, jnp.zeros((7, 1), jnp.int32), X)
    with pytest.raises(TypeError, match="expected an AdapterSet"):
        routed(trees["a"], jnp.zeros(7, jnp.int32), X)
    out = jax.jit(routed)(adapters, jnp.array([0, 3, -1, 1, -5, 2, 0]), X)
    bad = np.isnan(np.asarray(out)).all(axis=1)
    assert bad.tolist() == [False, True, False, False, True, False, False]
    assert np.isfinite(np.asarray(out)[~bad]).all()


def primitive_counts(jaxpr):
    """``{primitive name: count}`` over a jaxpr and every jaxpr nested in its equations."""
    counts = {}
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jex.jaxprs_in_params(eqn.params):
            for name, n in primitive_counts(sub).items():
                counts[name] = counts.get(name, 0) + n
    return counts


def test_routing_program_does_not_grow_with_the_number_of_adapters():
    """Gathers and batched matmuls: the same program for 2 adapters as for 6."""
    model, x = MODELS["mlp"], jnp.tile(X, (2, 1))
    ids = jnp.arange(14) % 3 - 1
    counts = []
    for n in (2, 6):
        adapters = ll.AdapterSet.from_trees(
            {f"t{i}": make_adapter("mlp", 20 + i, rank=3) for i in range(n)}
        )
        jaxpr = jax.make_jaxpr(ll.route(model.apply))(adapters, ids, x).jaxpr
        counts.append(primitive_counts(jaxpr))
        batched = [
            e for e in jaxpr.eqns if e.primitive.name == "dot_general"
            and e.params["dimension_numbers"][1][0]  # batch dimensions: one matrix per example
        ]  # fmt: skip
        assert len(batched) >= 4  # x@A and (x@A)@B for fc1 and fc2
        assert counts[-1].get("gather", 0) >= 4  # each example's A and B
        assert not {"while", "scan", "cond"} & set(counts[-1])
    assert counts[0] == counts[1]


# --- vmap_train_step -------------------------------------------------------------------------


def mse_loss(tree, batch, key):
    x, y = batch
    pred = ll.lora(MODELS["mlp"].apply)(tree, x, dropout_key=key)
    return jnp.mean((pred - y) ** 2)


SINGLE = ll.train_step(mse_loss, optax.adam(1e-2))


@pytest.mark.parametrize("batch_axis", [None, 0], ids=["same-batch", "own-batches"])
def test_vmapped_training_equals_separate_trainings(batch_axis):
    trees = {n: make_adapter("mlp", s, rank=2, dropout=0.1) for n, s in zip("ab", (1, 2))}
    adapters = ll.AdapterSet.from_trees(trees)
    keys = jax.random.split(jax.random.key(42), 2)
    rng = np.random.default_rng(1)
    batches = [
        (rng.normal(size=(2, 8, 10)).astype(np.float32), rng.normal(size=(2, 8, 6)).astype("f4"))
        for _ in range(2)
    ]
    pick = (lambda b, i: (b[0][i], b[1][i])) if batch_axis == 0 else lambda b, i: (b[0][0], b[1][0])
    shared = (lambda b: b) if batch_axis == 0 else lambda b: (b[0][0], b[1][0])

    init, step = ll.vmap_train_step(mse_loss, optax.adam(1e-2), batch_axis=batch_axis)
    state = init(adapters, keys)
    for batch in batches:
        state, metrics = step(state, shared(batch))
    assert metrics["loss"].shape == (2,)
    trained = adapters.with_trainable(state.trainable)

    for i, name in enumerate("ab"):
        alone = SINGLE.init(trees[name], keys[i])
        for batch in batches:
            alone, alone_metrics = SINGLE.step(alone, pick(batch, i))
        np.testing.assert_allclose(metrics["loss"][i], alone_metrics["loss"], rtol=1e-5)
        chex.assert_trees_all_close(trained.get(name), alone.tree, rtol=1e-5, atol=1e-6)
        moved = lora_nodes(trained.get(name))[0].b - lora_nodes(trees[name])[0].b
        assert np.abs(moved).max() > 1e-3  # it trained


def test_vmap_train_step_rejects_mixed_scales_and_bad_keys():
    adapters, _ = mixed_set("mlp")
    init, _ = ll.vmap_train_step(mse_loss, optax.adam(1e-2))
    with pytest.raises(ValueError, match=r"params/fc1/kernel: scales \[0.5, 2.0\] differ"):
        init(adapters, jax.random.split(jax.random.key(0), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = ll.AdapterSet.from_trees(
            {"a": make_adapter("mlp", 1, rank=2), "d": make_adapter("mlp", 4, rank=4, alpha=8)}
        )
    with pytest.raises(ValueError, match=r"a: params/fc1/kernel is padded from rank 2 to 4"):
        init(padded, jax.random.split(jax.random.key(0), 2))
    one = ll.AdapterSet.from_trees({"a": make_adapter("mlp", 1, rank=2)})
    with pytest.raises(ValueError, match=r"keys of shape \(2,\), expected \(1,\)"):
        init(one, jax.random.split(jax.random.key(0), 2))
