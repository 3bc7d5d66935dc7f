"""Choosing leaves: their names, the one predicate builder, and which leaves are adapted or trained.

Every leaf is named by one string, its ``/``-joined key path
(``params/encoder/layer_0/attention/query/kernel``); every pattern, message and
report in the library uses that name. Every pattern option (`LoraConfig`'s
``targets``, ``exclude`` and ``train``, the keys of ``rank_pattern``, ``alpha_pattern``
and ``axes``, and `quantize`'s ``also``) goes through `to_predicate`, which turns a
regex, ``"all-linear"`` or a callable into a small frozen, hashable predicate object
``(path, leaf) -> bool`` that prints as it was built and, unless it wraps a user's
callable, serializes (`to_serial`, `from_serial`). `select` makes the choice `init`
applies: the adapted leaves with their layouts, ranks and alphas, and the trained ones.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .quant import is_quantized
from .weight import Layout

if TYPE_CHECKING:  # annotations only: config and usage import this module
    from .config import LoraConfig
    from .usage import Usage

Spec = str | Callable[[str, Any], bool]


def path_str(path: tuple) -> str:
    """The ``/``-joined name of a JAX key path.

    Example:
        >>> path_str((jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel")))
        'dense/kernel'
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``tree``, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(path), leaf) for path, leaf in flat]


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether regex ``pattern`` matches one or more whole components of ``path``.

    ``"query"`` matches ``attn/query/kernel`` but not ``attn/query_proj/kernel``;
    ``"layer_[0-3]/.*"`` and ``"attn/query"`` match across components.
    """
    return re.search(rf"(?:^|/)(?:{pattern})(?:/|$)", path) is not None


NOT_WEIGHTS = frozenset({"bias", "scale"})


def leaf_name(path: str) -> str:
    """The name of a leaf: its last path component, or the one before an NNX ``value``.

    ``nnx.split`` states name a kernel ``linear/kernel/value``; its name is ``kernel``.
    """
    parts = path.split("/")
    return parts[-2] if len(parts) > 1 and parts[-1] == "value" else parts[-1]


def is_adaptable(path: str, leaf: Any) -> bool:
    """A float array of rank >= 2 that is no bias or norm scale (a kernel, an embedding)."""
    return (
        leaf_name(path) not in NOT_WEIGHTS
        and hasattr(leaf, "shape")
        and len(leaf.shape) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)  # np.issubdtype rejects bfloat16
    )


def is_bias(path: str, leaf: Any) -> bool:
    """An array named ``bias`` (1-D, or more for DenseGeneral and stacked layers)."""
    return leaf_name(path) == "bias" and hasattr(leaf, "shape")


def module_of(path: str) -> str:
    """The path of the module holding a leaf (the path without the leaf's name)."""
    parts = path.split("/")
    n_name = 2 if len(parts) > 1 and parts[-1] == "value" else 1
    return "/".join(parts[:-n_name])


class Predicate(abc.ABC):
    """Base of the predicate objects: frozen, hashable ``(path, leaf) -> bool``."""

    @abc.abstractmethod
    def __call__(self, path: str, leaf: Any) -> bool:
        """Whether the leaf at ``path`` is selected."""

    @abc.abstractmethod
    def serial(self) -> Any:
        """A JSON-ready form that `from_serial` turns back into an equal predicate."""

    def bind(self, linear_paths: frozenset[str]) -> Predicate:
        """This predicate with ``"all-linear"`` decided by a trace (see `AllLinear`)."""
        return self


@dataclasses.dataclass(frozen=True, repr=False)
class Regex(Predicate):
    """Leaves whose path `pattern_matches` (whole components, searched anywhere).

    Example:
        >>> Regex("query")("attn/query/kernel", None), Regex("query")("query_proj/kernel", None)
        (True, False)
    """

    pattern: str

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Regex takes a string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {err}") from None

    def __call__(self, path: str, leaf: Any) -> bool:
        return pattern_matches(self.pattern, path)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"

    def serial(self) -> dict[str, str]:
        return {"regex": self.pattern}


@dataclasses.dataclass(frozen=True, repr=False)
class AllLinear(Predicate):
    """``"all-linear"``: the kernels a traced function uses as matmul weights (``paths``),
    or without a trace every leaf named ``kernel``, conv kernels included."""

    paths: frozenset[str] | None = None

    def __call__(self, path: str, leaf: Any) -> bool:
        return leaf_name(path) == "kernel" if self.paths is None else path in self.paths

    def __repr__(self) -> str:
        return "AllLinear()" if self.paths is None else f"AllLinear({len(self.paths)} traced)"

    def serial(self) -> dict[str, bool]:
        return {"all_linear": True}  # the trace is redone where the config is used

    def bind(self, linear_paths: frozenset[str]) -> AllLinear:
        return AllLinear(frozenset(linear_paths))


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class _Combination(Predicate):
    """Several predicates, each spec as `to_predicate` takes it; ``tag`` names the
    combination in its serial form."""

    predicates: tuple[Predicate, ...]
    tag: ClassVar[str]

    def __init__(self, *specs: Spec):
        object.__setattr__(self, "predicates", tuple(to_predicate(s) for s in specs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.predicates))})"

    def serial(self) -> dict[str, list]:
        return {self.tag: [p.serial() for p in self.predicates]}

    def bind(self, linear_paths: frozenset[str]) -> _Combination:
        return type(self)(*(p.bind(linear_paths) for p in self.predicates))


class AnyOf(_Combination):
    """Leaves any of ``specs`` selects.

    Example:
        >>> AnyOf("query", "value")
        AnyOf(Regex('query'), Regex('value'))
    """

    tag = "any"

    def __call__(self, path: str, leaf: Any) -> bool:
        return any(p(path, leaf) for p in self.predicates)


class AllOf(_Combination):
    """Leaves every one of ``specs`` selects.

    Example:
        >>> AllOf("layer_1", Not("query"))("layer_1/value/kernel", None)
        True
    """

    tag = "all"

    def __call__(self, path: str, leaf: Any) -> bool:
        return all(p(path, leaf) for p in self.predicates)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Not(Predicate):
    """Leaves ``spec`` does not select."""

    predicate: Predicate

    def __init__(self, spec: Spec):
        object.__setattr__(self, "predicate", to_predicate(spec))

    def __call__(self, path: str, leaf: Any) -> bool:
        return not self.predicate(path, leaf)

    def __repr__(self) -> str:
        return f"Not({self.predicate!r})"

    def serial(self) -> dict[str, Any]:
        return {"not": self.predicate.serial()}

    def bind(self, linear_paths: frozenset[str]) -> Not:
        return Not(self.predicate.bind(linear_paths))


@dataclasses.dataclass(frozen=True, repr=False)
class Function(Predicate):
    """A user's callable ``(path, leaf) -> bool``; it has no serial form."""

    fn: Callable[[str, Any], bool]

    def __call__(self, path: str, leaf: Any) -> bool:
        return bool(self.fn(path, leaf))

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
        return f"Function({getattr(self.fn, '__module__', None) or '?'}.{name})"

    def serial(self) -> Any:
        raise TypeError(
            f"{self!r} has no serial form; name the leaves with regexes or with the "
            "predicates of lorax_lite.targets (Regex, AllLinear, AnyOf, AllOf, Not), "
            "which serialize"
        )


def to_predicate(spec: Spec, *, linear_paths: Iterable[str] | None = None) -> Predicate:
    """Turns a pattern spec into one predicate object ``(path, leaf) -> bool``.

    Args:
        spec: a regex (see `pattern_matches`), ``"all-linear"``, a predicate object or
            any other callable ``(path, leaf) -> bool``.
        linear_paths: paths of leaves known to be used as matmul weights (from a
            trace of the model). Without them ``"all-linear"`` goes by name alone: every
            leaf named ``kernel``, conv kernels included (`init` then refuses any kernel
            of more than two axes as ambiguous unless ``axes`` names its roles).

    Returns:
        The predicate: `Regex`, `AllLinear`, the predicate object given, or `Function`.

    Raises:
        TypeError: if ``spec`` is none of these.
        ValueError: if a regex does not compile.

    Example:
        >>> to_predicate("all-linear"), to_predicate("q|v")
        (AllLinear(), Regex('q|v'))
    """
    if isinstance(spec, Predicate):
        predicate = spec
    elif isinstance(spec, str):
        predicate = AllLinear() if spec == "all-linear" else Regex(spec)
    elif callable(spec):
        predicate = Function(spec)
    else:
        raise TypeError(
            f"pattern {spec!r} must be a string (a regex) or a callable (path, leaf) -> bool"
        )
    return predicate if linear_paths is None else predicate.bind(frozenset(linear_paths))


def to_serial(spec: Spec) -> Any:
    """The JSON-ready form of a spec: a string as it is, a predicate object its `serial`.

    Raises:
        TypeError: for a user's callable, which has none.
    """
    return spec if isinstance(spec, str) else to_predicate(spec).serial()


def from_serial(data: Any) -> Spec:
    """Inverse of `to_serial`.

    Raises:
        ValueError: if ``data`` is no string or serial form of a predicate.
    """
    if isinstance(data, str):
        return data
    if isinstance(data, Mapping) and len(data) == 1:
        ((tag, arg),) = data.items()
        if tag == "regex" and isinstance(arg, str):
            return Regex(arg)
        if tag == "all_linear" and arg is True:
            return AllLinear()
        if tag in ("any", "all") and isinstance(arg, list):
            return (AnyOf if tag == "any" else AllOf)(*map(from_serial, arg))
        if tag == "not":
            return Not(from_serial(arg))
    raise ValueError(
        f"{data!r} is no pattern: expected a regex string or one of {{'regex': str}}, "
        "{'all_linear': true}, {'any': [...]}, {'all': [...]}, {'not': ...}"
    )


def most_specific(
    patterns: Mapping[Spec, Any],
    path: str,
    leaf: Any,
    default: Any,
    *,
    linear_paths: Iterable[str] | None = None,
) -> Any:
    """The value of the most specific key of ``patterns`` selecting ``(path, leaf)``.

    A regex key is as specific as it is long (the longest wins); every other predicate
    ranks below every regex; ties go to the first key in the mapping's order.
    """
    hits = [
        (predicate, key)
        for key in patterns
        if (predicate := to_predicate(key, linear_paths=linear_paths))(path, leaf)
    ]
    if not hits:
        return default
    specificity = lambda hit: len(hit[0].pattern) if isinstance(hit[0], Regex) else -1
    return patterns[max(hits, key=specificity)[1]]


def closest_paths(pattern: str, paths: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` paths with a component most similar to ``pattern``, for error messages."""

    def score(path: str) -> float:
        parts = path.split("/")
        return max(difflib.SequenceMatcher(None, pattern, part).ratio() for part in parts)

    return sorted(paths, key=score, reverse=True)[:n]


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``/``-joined leaf paths, the inverse of `named_leaves` on dicts.

    Example:
        >>> unflatten({"dense/kernel": 1, "dense/bias": 2})
        {'dense': {'kernel': 1, 'bias': 2}}
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return tree


class Adapter(NamedTuple):
    """How `select` adapts one leaf."""

    layout: Layout
    rank: int
    alpha: float


class Selection(NamedTuple):
    """The choice `select` makes: ``adapted`` maps each adapted path (in flattening
    order) to its `Adapter` (None where a problem is listed); ``trained`` holds the
    paths trained in full; ``problems`` lists every reason the choice cannot be applied."""

    adapted: dict[str, Adapter | None]
    trained: frozenset[str]
    problems: list[str]


def select(
    named: list[tuple[str, Any]], config: LoraConfig, usage: dict[str, Usage] | None
) -> Selection:
    """Which leaves `init` adapts (and how) and which it trains in full.

    Args:
        named: the ``(path, leaf)`` pairs of the parameters (`named_leaves`).
        config: the patterns, ranks and alphas.
        usage: how a traced function uses each weight (`lorax_lite.usage.infer_usage`),
            which decides ``"all-linear"`` and the layouts of weights of more than two
            axes; None without a trace.

    Returns:
        The `Selection`; its problems name every pattern that selects nothing (with
        the closest paths), every leaf both adapted and trained in full, every
        quantized leaf trained in full, and every adapted leaf whose layout is
        ambiguous or whose rank is too large for it.
    """
    linear = None if usage is None else frozenset(p for p, u in usage.items() if u.kind == "dot")
    bound = lambda specs: [to_predicate(s, linear_paths=linear) for s in specs]
    excluded = bound(config.exclude)
    adaptable = [(p, x) for p, x in named if is_adaptable(p, x)]
    kept = [(p, x) for p, x in adaptable if not any(e(p, x) for e in excluded)]
    targeted, problems = _targeted(named, adaptable, kept, config.targets, bound)
    trained = {p for p, x in named if any(t(p, x) for t in bound(config.train))}
    trained |= _trained_biases(named, config.bias, targeted)
    chosen = [(p, x) for p, x in named if p in targeted]
    problems += _unmatched(config, named, adaptable, chosen, bound)
    problems += [
        f"{p}: both adapted and trained in full (in `train`)" for p, _ in chosen if p in trained
    ]
    problems += [
        f"{p}: a QuantizedWeight cannot be trained in full (its codes have no gradient)"
        for p, x in named
        if p in trained and is_quantized(x)
    ]
    adapted = {}
    for path, leaf in chosen:
        adapter, problem = _adapter_for(path, leaf, config, usage, linear)
        adapted[path] = adapter
        problems += [problem] if problem else []
    return Selection(adapted, frozenset(trained), problems)


def _targeted(
    named: list[tuple[str, Any]],
    adaptable: list[tuple[str, Any]],
    kept: list[tuple[str, Any]],
    targets: tuple[Spec, ...],
    bound: Callable[[Iterable[Spec]], list[Predicate]],
) -> tuple[set[str], list[str]]:
    """The paths ``targets`` adapt, and a problem for each target that adapts nothing."""
    chosen, problems = set(), []
    for spec, predicate in zip(targets, bound(targets)):
        hits = [p for p, x in named if predicate(p, x)]
        kept_hits = [p for p, _ in kept if p in hits]
        if kept_hits:
            chosen.update(kept_hits)
            continue
        adaptable_hits = [p for p, _ in adaptable if p in hits]
        if hits and not adaptable_hits:
            problems.append(
                f"target {shown(spec)} names only leaves that take no adapter "
                f"({', '.join(hits[:3])}); adapters go on float arrays of rank >= 2 not named "
                "'bias' or 'scale'"
            )
        elif hits:
            problems.append(
                f"target {shown(spec)} matches only excluded leaves ({', '.join(adaptable_hits)})"
            )
        else:
            problems.append(no_match("target", spec, "adaptable leaf", [p for p, _ in adaptable]))
    return chosen, problems


def _trained_biases(named: list[tuple[str, Any]], bias: str, targeted: set[str]) -> set[str]:
    """The biases ``bias`` trains: ``"all"``, or ``"lora_only"`` those of adapted modules."""
    adapted_modules = {module_of(p) for p in targeted}
    return {
        p
        for p, x in named
        if is_bias(p, x)
        and (bias == "all" or (bias == "lora_only" and module_of(p) in adapted_modules))
    }


def _unmatched(
    config: LoraConfig,
    named: list[tuple[str, Any]],
    adaptable: list[tuple[str, Any]],
    chosen: list[tuple[str, Any]],
    bound: Callable[[Iterable[Spec]], list[Predicate]],
) -> list[str]:
    """A problem for each ``exclude``, ``train``, ``rank_pattern``, ``alpha_pattern`` and
    ``axes`` pattern that changes nothing (a typo would otherwise pass silently)."""
    groups = (
        ("exclude", config.exclude, "adaptable leaf", adaptable),
        ("train", config.train, "leaf", named),
        ("rank_pattern key", config.rank_pattern, "adapted leaf", chosen),
        ("alpha_pattern key", config.alpha_pattern, "adapted leaf", chosen),
        ("axes key", config.axes, "adapted leaf", chosen),
    )
    return [
        no_match(kind, spec, what, [p for p, _ in candidates])
        for kind, specs, what, candidates in groups
        for spec, predicate in zip(specs, bound(specs))
        if not any(predicate(p, x) for p, x in candidates)
    ]


def shown(spec: Spec) -> str:
    """How messages show a spec: a string as written, anything else as its predicate."""
    return repr(spec) if isinstance(spec, str) else repr(to_predicate(spec))


def no_match(kind: str, spec: Spec, what: str, paths: list[str]) -> str:
    """The message for a pattern that selects nothing, with the closest of ``paths``."""
    near = closest_paths(_hint(to_predicate(spec)), paths)
    return f"{kind} {shown(spec)} matches no {what}; closest: {near}"


def _hint(predicate: Predicate) -> str:
    """The first regex in ``predicate`` (not under a `Not`), to rank the closest paths by."""
    if isinstance(predicate, Regex):
        return predicate.pattern
    if isinstance(predicate, _Combination):
        return next(filter(None, map(_hint, predicate.predicates)), "")
    return ""


def _adapter_for(
    path: str,
    leaf: Any,
    config: LoraConfig,
    usage: dict[str, Usage] | None,
    linear: frozenset[str] | None,
) -> tuple[Adapter | None, str | None]:
    """The adapter of one targeted leaf, or a problem message."""
    roles = most_specific(config.axes, path, leaf, None, linear_paths=linear)
    if roles is not None:
        if len(roles) != leaf.ndim:
            return (
                None,
                f"{path}: axes override {roles} has {len(roles)} roles for shape {leaf.shape}",
            )
        layout = Layout.from_roles(roles)
    elif usage is not None and path in usage:
        layout = usage[path].layout
    elif leaf.ndim == 2:
        layout = Layout.dense()
    else:
        return None, (
            f"{path}: shape {leaf.shape} has {leaf.ndim} axes and its fan-in/fan-out/stacked "
            "axes are ambiguous; pass fn= and args= to init, or set "
            "LoraConfig(axes={pattern: ('stack'|'in'|'out', ...)})"
        )
    if config.use_dora and usage is not None and path in usage and usage[path].kind == "gather":
        return None, (
            f"{path}: use_dora needs a matmul or conv kernel (a norm per output unit); "
            "this weight is an embedding table (looked up by gather): exclude it"
        )
    rank = most_specific(config.rank_pattern, path, leaf, config.rank, linear_paths=linear)
    alpha = most_specific(config.alpha_pattern, path, leaf, config.alpha, linear_paths=linear)
    d_in = int(np.prod([leaf.shape[i] for i in layout.fan_in]))
    d_out = int(np.prod([leaf.shape[i] for i in layout.fan_out]))
    if rank > min(d_in, d_out):
        return None, f"{path}: rank {rank} > min(d_in={d_in}, d_out={d_out}) of shape {leaf.shape}"
    return Adapter(layout, rank, alpha), None
