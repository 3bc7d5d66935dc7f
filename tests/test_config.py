"""LoraConfig: validation messages, per-leaf rank/alpha, scale, serialization."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll
from lorax_lite.targets import AllLinear, AllOf, AnyOf, Not, Regex


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be an int >= 1, got 0"),
        (dict(rank=-3), "rank must be an int >= 1, got -3"),
        (dict(rank=2.0), "rank must be an int >= 1, got 2.0"),
        (dict(rank=True), "rank must be an int >= 1, got True"),
        (dict(rank_pattern={"q": 0}), "rank_pattern['q'] must be an int >= 1, got 0"),
        (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
        (dict(alpha=-1.5), "alpha must be a finite number > 0, got -1.5"),
        (dict(alpha_pattern={"v": 0.0}), "alpha_pattern['v'] must be a finite number > 0, got 0.0"),
        (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
        (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
        (dict(dropout=True), "dropout must be in [0, 1), got True"),
        (dict(dropout=math.nan), "dropout must be in [0, 1), got nan"),
        (dict(alpha=math.inf), "alpha must be a finite number > 0, got inf"),
        (dict(rank=np.float64(4)), "rank must be an int >= 1, got "),
        (
            dict(init="xavier"),
            "init must be one of ('kaiming', 'gaussian', 'pissa', 'olora', 'loftq'), got 'xavier'",
        ),
        (dict(bias="some"), "bias must be 'none', 'all' or 'lora_only', got 'some'"),
        (dict(init="loftq", loftq_iter=0), "loftq_iter must be an int >= 1, got 0"),
        (dict(init="loftq", loftq_iter=2.0), "loftq_iter must be an int >= 1, got 2.0"),
        (dict(init="loftq", loftq_iter=True), "loftq_iter must be an int >= 1, got True"),
        (dict(loftq_iter=2), "loftq_iter is for init='loftq', not init='kaiming'"),
        (dict(init="pissa", loftq_iter=3), "loftq_iter is for init='loftq', not init='pissa'"),
        (dict(targets=()), "targets is empty"),
        (dict(targets=("q", "v"), exclude=("v",)), "patterns both targeted and excluded: ['v']"),
        (dict(targets="q(", exclude=()), "pattern 'q(' is not a valid regex"),
        (dict(train=("[head",)), "pattern '[head' is not a valid regex"),
        (dict(axes={"k": ("in", "sideways")}), "axes['k'] must name each axis one of"),
        (dict(axes={"k": ("stack", "in", "in")}), "with at least one 'in' and one 'out'"),
    ],
)
def test_each_invalid_field_is_reported(kwargs, message):
    with pytest.raises(ValueError) as info:
        ll.LoraConfig(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(use_rslora="yes"), "use_rslora must be True or False, got 'yes'"),
        (dict(dtype="int8"), "dtype must be a floating dtype such as 'float32', got 'int8'"),
        (dict(dtype="floaty"), "dtype must be a floating dtype such as 'float32', got 'floaty'"),
        (dict(dtype=None), "dtype must be a floating dtype such as 'float32', got None"),
        (dict(targets=5), "targets must be a regex, a callable or a sequence of them, got 5"),
        (
            dict(train={"head": 1}),
            "train must be a regex, a callable or a sequence of them, got {'head'",
        ),
        (dict(targets=("q", 3)), "targets must be regexes or callables, got 3"),
        (dict(train=("head", 3)), "pattern 3 must be a string"),
        (dict(rank_pattern=[("q", 2)]), "rank_pattern must be a dict {regex: value}, got [("),
        (dict(axes={"k": 5}), "axes['k'] must be a sequence of roles, got 5"),
    ],
)
def test_each_value_of_the_wrong_kind_is_reported(kwargs, message):
    """No raw TypeError from the normalisation, no silent truthy use_rslora or int factors."""
    with pytest.raises(ValueError) as info:
        ll.LoraConfig(**kwargs)
    assert message in str(info.value)


def test_from_dict_names_unknown_fields_and_refuses_non_dicts():
    with pytest.raises(ValueError, match=r"unknown fields 'rnak', 'extra'; expected some of \["):
        ll.LoraConfig.from_dict({"rank": 2, "rnak": 4, "extra": 1})
    with pytest.raises(TypeError, match="from_dict expects a dict, got list"):
        ll.LoraConfig.from_dict([("rank", 2)])
    config = ll.LoraConfig(dtype=jnp.bfloat16, use_rslora=np.True_)
    assert (config.dtype, config.use_rslora) == ("bfloat16", True)
    assert type(config.use_rslora) is bool
    assert ll.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_all_problems_are_listed_at_once():
    with pytest.raises(ValueError) as info:
        ll.LoraConfig(rank=0, alpha=-1, dropout=2.0, targets=("a", "b("), exclude=("a",))
    text = str(info.value)
    for part in ("rank must", "alpha must", "dropout must", "both targeted and excluded", "'b('"):
        assert part in text
    assert len(text.splitlines()) == 6  # header + five problems


def test_numpy_scalars_are_accepted_as_plain_python_numbers():
    config = ll.LoraConfig(
        rank=np.int64(4),
        alpha=np.float32(8),
        dropout=np.float64(0.1),
        rank_pattern={"q": np.int32(2)},
    )
    assert (config.rank, config.alpha, config.rank_pattern) == (4, 8.0, {"q": 2})
    assert type(config.rank) is int and type(config.dropout) is float
    assert ll.LoraConfig(dropout=np.float32(0.1)).dropout == 0.1  # as written, not 0.10000000149
    assert ll.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_loftq_iter_round_trips_and_defaults_to_one_for_configs_saved_before_it():
    config = ll.LoraConfig(init="loftq", loftq_iter=np.int64(3))
    assert config.loftq_iter == 3 and type(config.loftq_iter) is int
    data = json.loads(json.dumps(config.to_dict()))
    assert data["loftq_iter"] == 3 and ll.LoraConfig.from_dict(data) == config
    del data["loftq_iter"]  # a config written before the field existed
    assert ll.LoraConfig.from_dict(data) == dataclasses.replace(config, loftq_iter=1)
    assert ll.LoraConfig(init="kaiming", loftq_iter=1).loftq_iter == 1  # the default: any init


def test_dropout_zero_and_just_below_one_are_valid():
    assert ll.LoraConfig(dropout=0.0).dropout == 0.0
    assert ll.LoraConfig(dropout=0.999).dropout == 0.999


def test_single_strings_and_lists_become_tuples():
    config = ll.LoraConfig(targets="query", exclude=["x"], train="head")
    assert config.targets == ("query",)
    assert config.exclude == ("x",)
    assert config.train == ("head",)


def test_rank_and_alpha_pattern_longest_regex_wins():
    config = ll.LoraConfig(
        rank=4,
        alpha=8.0,
        rank_pattern={"layer_.*": 2, "layer_1/query": 6},
        alpha_pattern={"query": 3.0, "layer_1/query": 5.0},
    )
    assert config.rank_for("layer_1/query/kernel") == 6
    assert config.rank_for("layer_0/query/kernel") == 2
    assert config.rank_for("head/kernel") == 4
    assert config.alpha_for("layer_1/query/kernel") == 5.0
    assert config.alpha_for("layer_0/query/kernel") == 3.0
    assert config.alpha_for("head/kernel") == 8.0


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 16.0), (16, 8.0)])
def test_scale_is_alpha_over_rank_or_sqrt_rank(rank, alpha):
    assert ll.LoraConfig().scale_for(rank, alpha) == pytest.approx(alpha / rank)
    rs = ll.LoraConfig(use_rslora=True).scale_for(rank, alpha)
    assert rs == pytest.approx(alpha / math.sqrt(rank))


def test_to_dict_round_trip_and_callable_targets_refuse():
    config = ll.LoraConfig(
        rank=3, targets=("q", "v"), rank_pattern={"q": 2}, axes={"w": ("in", "out", "out")}
    )
    assert ll.LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="callable targets"):
        ll.LoraConfig(targets=lambda path, leaf: True).to_dict()


def test_config_is_frozen():
    config = ll.LoraConfig()
    with pytest.raises(AttributeError):
        config.rank = 3


def test_rank_pattern_matches_whole_components_like_targets():
    config = ll.LoraConfig(rank=4, rank_pattern={"query": 2}, alpha_pattern={"query": 1.0})
    assert config.rank_for("attn/query/kernel") == 2
    assert config.rank_for("attn/query_proj/kernel") == 4
    assert config.alpha_for("attn/query_proj/kernel") == 16.0


def test_predicate_objects_round_trip_through_json():
    config = ll.LoraConfig(
        rank=3,
        targets=(AnyOf("q", "v"), "k", AllLinear()),
        exclude=Not("layer_[0-3]"),
        train=(Regex("head"),),
        rank_pattern={AllOf("layer_1", "q"): 2, "v": 4},
        alpha_pattern={"q": 8.0},
        axes={Regex("w"): ("in", "out", "out")},
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["targets"] == [{"any": [{"regex": "q"}, {"regex": "v"}]}, "k", {"all_linear": True}]
    assert data["rank_pattern"] == [[{"all": [{"regex": "layer_1"}, {"regex": "q"}]}, 2], ["v", 4]]
    assert data["alpha_pattern"] == {"q": 8.0}  # string keys keep the JSON object form
    assert ll.LoraConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "option, value",
    [
        ("targets", lambda path, leaf: True),
        ("exclude", (AnyOf("q", lambda path, leaf: True),)),
        ("train", lambda path, leaf: True),
        ("rank_pattern", {lambda path, leaf: True: 2}),
        ("alpha_pattern", {Not(lambda path, leaf: True): 2.0}),
        ("axes", {lambda path, leaf: True: ("in", "out")}),
    ],
)
def test_callable_in_any_pattern_option_refuses_to_serialize_naming_it(option, value):
    config = ll.LoraConfig(**{"targets": "q", option: value})
    with pytest.raises(TypeError) as info:
        config.to_dict()
    text = str(info.value)
    assert f"LoraConfig.to_dict: callable {option} cannot be serialized: Function(" in text
    assert "has no serial form; name the leaves with regexes or with the predicates" in text


def test_save_adapter_with_a_callable_target_explains_and_writes_nothing(tmp_path):
    params = {"fc": {"kernel": jnp.ones((4, 3))}}
    config = ll.LoraConfig(rank=2, targets=lambda path, leaf: path.startswith("fc/"))
    tree = ll.init(params, config, key=jax.random.key(0))
    with pytest.raises(TypeError, match="callable targets cannot be serialized"):
        ll.save_adapter(tmp_path / "adapter", tree, config)
    assert not (tmp_path / "adapter").exists()
    ll.save_adapter(tmp_path / "adapter", tree, dataclasses.replace(config, targets=Regex("fc")))
    assert ll.adapter_metadata(tmp_path / "adapter")["config"]["targets"] == [{"regex": "fc"}]


def test_any_pattern_option_reports_a_value_that_is_no_pattern():
    with pytest.raises(ValueError) as info:
        ll.LoraConfig(rank_pattern={3: 2}, axes={"((": ("in", "out")})
    text = str(info.value)
    assert "rank_pattern must be regexes or callables, got 3: pattern 3 must be a string" in text
    assert "axes: pattern '((' is not a valid regex" in text


def test_rank_pattern_prefers_the_longest_regex_then_other_predicates_then_order():
    config = ll.LoraConfig(
        rank=4,
        rank_pattern={
            AnyOf("layer_1"): 1,
            Regex("query"): 2,
            lambda path, leaf: leaf is not None and leaf.ndim == 3: 3,
            Not("query"): 5,
        },
    )
    assert config.rank_for("layer_1/query/kernel") == 2  # a regex beats a predicate
    assert config.rank_for("layer_1/value/kernel") == 1  # the first of the predicates
    assert config.rank_for("layer_0/value/kernel", jnp.zeros((2, 2, 2))) == 3
    assert config.rank_for("layer_0/value/kernel") == 5
