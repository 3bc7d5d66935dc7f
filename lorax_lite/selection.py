"""Selection: which leaves `init` adapts, with which layout, rank and alpha, and which it
trains in full.

`select` applies a `LoraConfig`'s patterns (through `lorax_lite.targets.to_predicate`) to the
named leaves of a parameter tree and to how a traced function uses them, and lists every
reason the choice cannot be applied instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import numpy as np

from .config import LoraConfig
from .quant import is_quantized
from .targets import (
    Predicate,
    Spec,
    is_adaptable,
    is_bias,
    module_of,
    most_specific,
    no_match,
    shown,
    to_predicate,
)
from .usage import Usage
from .weight import Layout


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
    targets = cast(tuple[Spec, ...], config.targets)  # LoraConfig makes every pattern a tuple
    targeted, problems = _targeted(named, adaptable, kept, targets, bound)
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
    groups: tuple[tuple[str, Any, str, list[tuple[str, Any]]], ...] = (
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
