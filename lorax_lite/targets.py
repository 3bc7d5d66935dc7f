"""Leaf names and patterns: every leaf's path, and the one predicate builder all patterns use.

Every leaf is named by one string, its ``/``-joined key path
(``params/encoder/layer_0/attention/query/kernel``); every pattern, message and
report in the library uses that name. Every pattern option (`LoraConfig`'s
``targets``, ``exclude`` and ``train``, the keys of ``rank_pattern``, ``alpha_pattern``
and ``axes``, and `quantize`'s ``also``) goes through ``to_predicate``, which turns a
regex, ``"all-linear"`` or a callable into a small frozen, hashable predicate object
``(path, leaf) -> bool`` that prints as it was built and, unless it wraps a user's
callable, serializes (``to_serial``, ``from_serial``). ``lorax_lite.selection`` applies them.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

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
    """Leaves whose path ``pattern_matches`` (whole components, searched anywhere).

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
