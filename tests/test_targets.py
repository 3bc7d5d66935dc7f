"""Leaf naming and target selection: which leaves a pattern adapts."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorax_lite as ll
from lorax_lite.targets import (
    AllLinear,
    AllOf,
    AnyOf,
    Function,
    Not,
    Regex,
    closest_paths,
    from_serial,
    is_adaptable,
    is_bias,
    leaf_name,
    module_of,
    named_leaves,
    path_str,
    pattern_matches,
    to_predicate,
    to_serial,
)

KEY = jax.random.key(0)


def adapted_paths(tree):
    nodes = named_leaves(tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight | ll.Trainable))
    return sorted(p for p, x in nodes if isinstance(x, ll.LoraWeight))


def test_path_str_joins_dict_sequence_and_attribute_keys():
    tree = {"enc": [{"w": 1}, (2, {"v": 3})]}
    names = [p for p, _ in named_leaves(tree)]
    assert names == ["enc/0/w", "enc/1/0", "enc/1/1/v"]
    getattr_path = (jax.tree_util.GetAttrKey("layer"), jax.tree_util.DictKey("kernel"))
    assert path_str(getattr_path) == "layer/kernel"


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("query", "attn/query/kernel", True),
        ("query", "attn/query_proj/kernel", False),
        ("query", "attn/my_query/kernel", False),
        ("fc1", "fc1/kernel", True),
        ("attn/query", "layer_0/attn/query/kernel", True),
        ("layer_[0-1]/.*", "layer_1/attn/value/kernel", True),
        ("layer_[0-1]/.*", "layer_2/attn/value/kernel", False),
        ("q|v", "attn/v/kernel", True),
        ("kernel", "attn/query/kernel", True),
    ],
)
def test_pattern_matches_whole_components(pattern, path, expected):
    assert pattern_matches(pattern, path) is expected


def test_is_adaptable_keeps_float_weights_of_rank_two_or_more():
    assert is_adaptable("fc/kernel", jnp.zeros((3, 4)))
    assert is_adaptable("emb/embedding", jnp.zeros((10, 4), jnp.bfloat16))
    assert is_adaptable("conv/kernel", jnp.zeros((3, 3, 2, 4)))
    assert not is_adaptable("fc/bias", jnp.zeros((4,)))
    assert not is_adaptable("dg/bias", jnp.zeros((2, 4)))  # DenseGeneral bias is 2-D
    assert not is_adaptable("ln/scale", jnp.zeros((2, 4)))
    assert not is_adaptable("ids", jnp.zeros((3, 4), jnp.int32))
    assert not is_adaptable("fc/kernel/value", jnp.zeros((4,)))


def test_nnx_value_suffix_is_skipped_in_leaf_and_module_names():
    assert leaf_name("block/linear/kernel/value") == "kernel"
    assert leaf_name("fc/kernel") == "kernel"
    assert module_of("block/linear/bias/value") == "block/linear"
    assert module_of("fc/bias") == "fc"
    assert module_of("kernel") == ""
    assert not is_adaptable("linear/bias/value", jnp.zeros((2, 4)))
    assert is_bias("linear/bias/value", jnp.zeros(4))
    assert is_bias("dg/bias", jnp.zeros((2, 4)))
    assert not is_bias("fc/kernel", jnp.zeros((2, 4)))


def test_to_predicate_regex_callable_and_all_linear():
    leaf = jnp.zeros((2, 2))
    assert to_predicate("query")("a/query/kernel", leaf)
    assert not to_predicate("query")("a/query_proj/kernel", leaf)
    assert to_predicate(lambda p, x: x.ndim == 2)("anything", leaf)
    without_trace = to_predicate("all-linear")
    assert without_trace("fc/kernel", leaf) and without_trace("fc/kernel/value", leaf)
    assert not without_trace("emb/embedding", leaf)
    assert without_trace("conv/kernel", jnp.zeros((3, 8, 8)))  # by name: conv kernels too
    traced = to_predicate("all-linear", linear_paths=["emb/embedding"])
    assert traced("emb/embedding", leaf) and not traced("fc/kernel", leaf)


def test_closest_paths_ranks_similar_components_first():
    paths = ["enc/query/kernel", "enc/value/kernel", "enc/mlp/fc1/kernel", "head/kernel"]
    assert closest_paths("querry", paths, n=2)[0] == "enc/query/kernel"
    assert closest_paths("fc_1", paths, n=1) == ["enc/mlp/fc1/kernel"]


class TwoProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="query")(x) + nn.Dense(6, name="query_proj")(x)
        h = nn.LayerNorm(name="ln")(h)
        return nn.Dense(3, name="fc1")(h)


def linen_params():
    return TwoProj().init(KEY, jnp.ones((1, 5)))


def test_module_pattern_adapts_the_kernel_never_bias_or_scale():
    params = linen_params()
    lp = ll.init(params, ll.LoraConfig(rank=2, targets="fc1"), key=KEY)
    assert adapted_paths(lp) == ["params/fc1/kernel"]
    assert isinstance(lp["params"]["fc1"]["bias"], jax.Array)
    with pytest.raises(ValueError, match="target 'ln' names only leaves that take no adapter"):
        ll.init(params, ll.LoraConfig(rank=2, targets=("fc1", "ln")), key=KEY)


def test_query_does_not_adapt_query_proj():
    lp = ll.init(linen_params(), ll.LoraConfig(rank=2, targets="query"), key=KEY)
    assert adapted_paths(lp) == ["params/query/kernel"]


def test_exclude_removes_matches():
    config = ll.LoraConfig(rank=2, targets="all-linear", exclude=("query_proj",))
    lp = ll.init(linen_params(), config, key=KEY)
    assert adapted_paths(lp) == ["params/fc1/kernel", "params/query/kernel"]


def test_callable_target():
    config = ll.LoraConfig(rank=2, targets=lambda path, leaf: leaf.shape == (6, 3))
    assert adapted_paths(ll.init(linen_params(), config, key=KEY)) == ["params/fc1/kernel"]


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(8, 8, rngs=rngs)
        self.query_proj = nnx.Linear(8, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.query_proj(self.query(x)))


@pytest.mark.parametrize("with_fn", [False, True])
def test_nnx_split_state_paths(with_fn):
    graphdef, state = nnx.split(Attention(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(KEY, (3, 8))
    trace = dict(fn=apply, args=(x,)) if with_fn else {}
    config = ll.LoraConfig(rank=2, targets="query", bias="lora_only")
    lp = ll.init(state, config, key=KEY, **trace)
    assert adapted_paths(lp) == ["query/kernel/value"]
    assert isinstance(lp["query"]["bias"].get_value(), ll.Trainable)
    assert isinstance(lp["query_proj"]["bias"].get_value(), jax.Array)
    all_linear = ll.init(state, ll.LoraConfig(rank=2), key=KEY, **trace)
    assert adapted_paths(all_linear) == ["query/kernel/value", "query_proj/kernel/value"]
    np.testing.assert_array_equal(ll.lora(apply)(lp, x), apply(state, x))


def two_d(path, leaf):
    return leaf.ndim == 2


SERIALIZABLE = [
    Regex("query"),
    AllLinear(),
    AnyOf("query", "value"),
    AllOf("layer_1", Not("query"), AllLinear()),
    Not(AnyOf()),
]


def test_predicates_print_as_they_were_built():
    assert repr(to_predicate("q|v")) == "Regex('q|v')"
    assert repr(to_predicate("all-linear")) == "AllLinear()"
    assert repr(to_predicate("all-linear", linear_paths=["a/kernel", "b/kernel"])) == (
        "AllLinear(2 traced)"
    )
    assert repr(AllOf("layer_1", Not("query"))) == "AllOf(Regex('layer_1'), Not(Regex('query')))"
    assert repr(to_predicate(two_d)) == f"Function({__name__}.two_d)"


def test_predicates_are_frozen_hashable_and_equal_by_value():
    assert to_predicate("query") == Regex("query") and to_predicate(Regex("q")) == Regex("q")
    assert AnyOf("q", "v") == AnyOf(Regex("q"), "v") != AllOf("q", "v")
    assert Function(two_d) == to_predicate(two_d) != Function(lambda p, x: True)
    assert len({Regex("q"), Regex("q"), AnyOf("q"), AllOf("q"), Not("q"), AllLinear()}) == 5
    assert {AnyOf("q", "v"): 1}[AnyOf("q", "v")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        Regex("q").pattern = "v"


def test_combinations_select_and_all_linear_is_bound_inside_them():
    leaf = jnp.zeros((2, 2))
    both = AllOf("layer_1", Not("query"))
    assert both("layer_1/value/kernel", leaf)
    assert not both("layer_1/query/kernel", leaf) and not both("layer_0/value/kernel", leaf)
    assert AnyOf("query", two_d)("head/kernel", leaf) and not AnyOf()("head/kernel", leaf)
    traced = to_predicate(AnyOf(Not("all-linear")), linear_paths=["fc/kernel"])
    assert traced == AnyOf(Not(AllLinear(frozenset({"fc/kernel"}))))
    assert traced("emb/embedding", leaf) and not traced("fc/kernel", leaf)


@pytest.mark.parametrize("predicate", SERIALIZABLE, ids=repr)
def test_serial_form_round_trips_through_json(predicate):
    assert from_serial(json.loads(json.dumps(to_serial(predicate)))) == predicate


def test_strings_serialize_as_themselves_and_callables_not_at_all():
    assert to_serial("query") == "query" and from_serial("query") == "query"
    assert to_serial(Regex("query")) == {"regex": "query"}
    for spec in (two_d, AnyOf("query", two_d)):
        with pytest.raises(TypeError, match=r"Function\(.*two_d\) has no serial form"):
            to_serial(spec)
    for data in (3, {"regex": 3}, {"any": "q"}, {"regex": "q", "not": "v"}, {"xor": []}):
        with pytest.raises(ValueError, match="is no pattern: expected a regex string or one of"):
            from_serial(data)


def test_to_predicate_refuses_what_is_no_pattern():
    with pytest.raises(TypeError, match="pattern 3 must be a string"):
        to_predicate(3)
    with pytest.raises(ValueError, match="pattern 'q\\(' is not a valid regex"):
        AnyOf("v", "q(")


def test_every_pattern_option_takes_predicates_and_callables():
    exclude_proj = lambda path, leaf: leaf.shape == (5, 6) and "proj" in path
    config = ll.LoraConfig(
        rank=2,
        alpha=2.0,
        targets=AnyOf("query", Regex("fc1"), "query_proj"),
        exclude=exclude_proj,
        train=AllOf("ln", Not("bias")),
        rank_pattern={Function(lambda path, leaf: leaf.shape[1] == 3): 1},
        alpha_pattern={Not("fc1"): 4.0},
    )
    lp = ll.init(linen_params(), config, key=KEY)
    assert adapted_paths(lp) == ["params/fc1/kernel", "params/query/kernel"]
    fc1, query = lp["params"]["fc1"]["kernel"], lp["params"]["query"]["kernel"]
    assert (fc1.rank, fc1.scale, query.rank, query.scale) == (1, 2.0, 2, 2.0)
    assert isinstance(lp["params"]["ln"]["scale"], ll.Trainable)
    assert isinstance(lp["params"]["ln"]["bias"], jax.Array)
    params = {"moe": {"w": jnp.ones((4, 3, 5))}}
    roles = ll.LoraConfig(rank=2, targets="moe", axes={AnyOf(two_d, "w"): ("stack", "in", "out")})
    assert ll.init(params, roles, key=KEY)["moe"]["w"].layout == ll.Layout((0,), (1,), (2,))


def test_predicates_that_select_nothing_are_named_in_the_error():
    config = ll.LoraConfig(
        rank=2,
        targets=("fc1", AllOf("fc1", "query")),
        exclude=AnyOf("query_porj"),
        rank_pattern={Function(two_d): 1, Regex("quer"): 1},
    )
    with pytest.raises(ValueError) as info:
        ll.init(linen_params(), config, key=KEY)
    lines = [line.strip() for line in str(info.value).splitlines()[1:]]
    assert len(lines) == 3, info.value
    assert lines[0].startswith(
        "target AllOf(Regex('fc1'), Regex('query')) matches no adaptable leaf; closest: ["
    )
    assert lines[1].startswith(
        "exclude AnyOf(Regex('query_porj')) matches no adaptable leaf; "
        "closest: ['params/query_proj/kernel'"
    )
    assert lines[2] == (
        "rank_pattern key Regex('quer') matches no adapted leaf; closest: ['params/fc1/kernel']"
    )
