"""Stacking adapters of one base: align their trees node by node, check that they share
the base (shapes, dtypes, quantization, content, residual init), and stack each adapted
leaf's factors on a leading axis, zero-padded to the largest rank. `AdapterSet` is built
from the result.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .checks import raise_problems
from .fingerprints import content_hash, dtype_name, storage
from .quant import QuantizedWeight, is_quantized, quantize_array
from .targets import path_str
from .trees import base_leaf
from .weight import LoraWeight, Trainable, is_array, is_hole_or_node, is_lora_node


class Stacked(NamedTuple):
    """The fields of an `AdapterSet` (see there), as `stack` builds them."""

    frozen: Any
    stacked: Any
    names: tuple[str, ...]
    ranks: tuple[tuple[int, ...], ...]
    scales: tuple[tuple[float, ...], ...]


def flat_nodes(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Paths, nodes (`LoraWeight`, `Trainable`, arrays, ``None`` holes) and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_hole_or_node)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def stack(entries: list[tuple[str, Any]], base: Any) -> Stacked:
    """Aligns the adapters node by node, checks that they share one base, and stacks them."""
    # `select` reads an int as a position: an int name would mean two adapters.
    bad = [f"{name!r} ({type(name).__name__})" for name, _ in entries if not isinstance(name, str)]
    if bad:
        raise TypeError(
            f"AdapterSet: adapter names must be strings (an integer selects by position), "
            f"got {', '.join(bad)}"
        )
    paths, treedef, by_name, base_nodes = _align(entries, base)
    base_nodes = _quantized_like_adapters(paths, by_name, base_nodes)
    problems = _base_problems(paths, by_name, base_nodes) + _residual_problems(paths, by_name)
    raise_problems("AdapterSet: the adapters were not made from the same base", problems)
    columns = []
    for k, path in enumerate(paths):
        try:
            columns.append(_stack_node(path, [nodes[k] for _, nodes in by_name], base_nodes[k]))
        except _Unstackable as err:
            problems += err.args
    raise_problems("AdapterSet", problems)
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    adapted = [c for c in columns if c.ranks is not None]
    by_adapter = lambda field: tuple(
        tuple(getattr(c, field)[i] for c in adapted) for i in range(len(entries))
    )
    return Stacked(
        unflatten([c.frozen for c in columns]),
        unflatten([c.stacked for c in columns]),
        tuple(name for name, _ in entries),
        by_adapter("ranks"),
        by_adapter("scales"),
    )


def _align(entries: list[tuple[str, Any]], base: Any) -> tuple[list[str], Any, list, list]:
    """The paths and treedef of the first adapter, ``(name, nodes)`` of every adapter and
    the nodes of ``base`` (``None`` each without one).

    Raises:
        ValueError: naming every adapter (and the base) whose structure differs from the
            first adapter's.
    """
    problems = []
    flat = [(name, *flat_nodes(tree)) for name, tree in entries]
    paths, treedef = flat[0][1], flat[0][3]
    for name, p, _, t in flat[1:]:
        if t != treedef:
            diff = sorted(set(p) ^ set(paths)) or ["(same paths, different containers)"]
            problems.append(f"adapter {name!r}: structure differs from {entries[0][0]!r} at {diff}")
    base_nodes = [None] * len(paths)
    if base is not None:
        base_paths, base_nodes, base_def = flat_nodes(base)
        if base_def != treedef:
            problems.append(f"base: structure differs at {sorted(set(base_paths) ^ set(paths))}")
    raise_problems("AdapterSet", problems)
    return paths, treedef, [(name, nodes) for name, _, nodes, _ in flat], base_nodes


def _quantized_like_adapters(
    paths: list[str], adapters: list[tuple[str, list]], base: list
) -> list[Any]:
    """``base`` with each float weight the adapters hold quantized replaced by their
    `QuantizedWeight` where it quantizes to the same codes and scales (else by its own
    quantization, which `_base_problems` then reports as different values)."""
    out = list(base)
    for k, path in enumerate(paths):
        held = (base_leaf(nodes[k]) for _, nodes in adapters)
        ours = next((x for x in held if isinstance(x, QuantizedWeight)), None)
        x = base[k]
        if ours is None or is_hole_or_node(x):
            continue
        try:
            again = quantize_array(x, **ours.options(), path=path)
        except (TypeError, ValueError):
            continue  # another shape or dtype: `_base_problems` names it
        out[k] = ours if base_mismatch(again, ours) is None else again
    return out


def _residual_problems(paths: list[str], adapters: list[tuple[str, list]]) -> list[str]:
    """Every leaf where the adapters' `LoraWeight.residual_init` differ: each residual
    base is the residual of its own init, so they are different bases."""
    out = []
    for k, path in enumerate(paths):
        inits = {n: x[k].residual_init for n, x in adapters if isinstance(x[k], LoraWeight)}
        if len(set(inits.values())) > 1:
            out.append(f"{path}: adapters differ in residual_init {inits}")
    return out


def _base_problems(paths: list[str], adapters: list[tuple[str, list]], base: list) -> list[str]:
    """Every leaf where an adapter's base weight differs from ``base``'s or the first one's.

    Weights are compared by shape, dtype, quantization (kind, block, axis) and the
    `content_hash` (a strided sample) of every stored array, so a large base is never
    read whole.
    """
    problems = []
    for k, path in enumerate(paths):
        # Values trained in full are the adapter's own, not the base: skip them.
        seen = [("base", base[k])] + [
            (name, base_leaf(nodes[k]))
            for name, nodes in adapters
            if not isinstance(nodes[k], Trainable)
        ]
        seen = [(who, x) for who, x in seen if x is not None and not is_lora_node(x)]
        if not seen:
            continue
        ref_name, ref = seen[0]
        for who, x in seen[1:]:
            why = base_mismatch(x, ref)
            if why:
                problems.append(
                    f"{path}: {who!r} has another base weight than {ref_name!r} ({why})"
                )
    return problems


def base_mismatch(x: Any, ref: Any) -> str | None:
    """How base weight ``x`` differs from ``ref`` (shape, dtype and storage, then the
    `content_hash` of what it stores), or None when they agree."""
    if x is ref:
        return None
    got, want = _describe(x), _describe(ref)
    if got != want:
        return f"{got} vs {want}"
    return None if content_hash(x) == content_hash(ref) else "same shape, different values"


def _describe(x: Any) -> str:
    """Shape, dtype and, for a `QuantizedWeight`, its `storage`."""
    text = f"{tuple(np.shape(x))} {dtype_name(x)}"
    return f"{text} quantized {storage(x)}" if is_quantized(x) else text


class _Column(NamedTuple):
    """One leaf stacked across the adapters.

    Attributes:
        frozen: the shared base node (``LoraWeight(w, None, None)`` where adapted).
        stacked: the adapters' trainable nodes stacked on a leading axis (``None``:
            nothing trains here).
        ranks: at an adapted leaf, each adapter's rank (``0``: not adapted); else None.
        scales: at an adapted leaf, each adapter's scale; else None.
    """

    frozen: Any
    stacked: Any
    ranks: list[int] | None = None
    scales: list[float] | None = None


class _Unstackable(Exception):
    """Why one leaf cannot be stacked, one problem per argument; `stack` lists them all."""


def _stack_node(path: str, column: list[Any], base: Any) -> _Column:
    """Leaf ``path`` (``column``: each adapter's node there) stacked over the adapters.

    Raises:
        _Unstackable: naming what differs between the adapters at this leaf.
    """
    loras = [x for x in column if isinstance(x, LoraWeight)]
    trained = [x for x in column if isinstance(x, Trainable)]
    if loras and trained:
        raise _Unstackable(f"{path}: adapted in some adapters, trained in others")
    if loras:
        return _stack_lora(path, column, loras, base)
    if trained:
        if len(trained) != len(column):
            raise _Unstackable(f"{path}: trained in full in some adapters only")
        shapes = {tuple(x.value.shape) for x in trained}
        if len(shapes) > 1:
            raise _Unstackable(f"{path}: trained values of shapes {sorted(shapes)}")
        return _Column(Trainable(base), Trainable(jnp.stack([x.value for x in trained])))
    plain = base if base is not None else next((x for x in column if x is not None), None)
    if plain is None:
        raise _Unstackable(f"{path}: no base value (pass base=)")
    return _Column(plain, None)


def _stack_lora(path: str, column: list[Any], loras: list[LoraWeight], base: Any) -> _Column:
    """An adapted leaf: factors zero-padded to the largest rank (zero factors where an
    adapter does not adapt it) and stacked."""
    first = loras[0]
    layouts = sorted({x.layout for x in loras})
    w = base
    for x in column:
        w = x.w if w is None and isinstance(x, LoraWeight) else w
        w = x if w is None and (is_array(x) or isinstance(x, QuantizedWeight)) else w
    if len(layouts) > 1 or w is None:
        why = f"layouts differ: {layouts}" if w is not None else "no base weight (pass base=)"
        raise _Unstackable(f"{path}: {why}")
    if any(x.dora for x in loras):
        why = "a DoRA adapter (use_dora): its magnitude and norm do not stack or route"
        raise _Unstackable(f"{path}: {why}; merge it first (ll.merge)")
    full = max(x.rank for x in loras)
    dtype = jnp.result_type(*(x.a.dtype for x in loras))
    a_full, b_full = first.layout.factor_shapes(tuple(w.shape), full)
    n_stack = len(first.layout.stack)
    a_list, b_list, ranks, scales, problems = [], [], [], [], []
    for x in column:
        if not isinstance(x, LoraWeight):
            a_list.append(jnp.zeros(a_full, dtype))
            b_list.append(jnp.zeros(b_full, dtype))
            ranks.append(0)
            scales.append(first.scale)
            continue
        want = first.layout.factor_shapes(tuple(w.shape), x.rank)
        if (tuple(x.a.shape), tuple(x.b.shape)) != want:
            got = (tuple(x.a.shape), tuple(x.b.shape))
            problems.append(f"{path}: factor shapes {got}, expected {want} for {w.shape}")
            continue
        pad = full - x.rank
        a_list.append(jnp.pad(x.a.astype(dtype), [(0, 0)] * (x.a.ndim - 1) + [(0, pad)]))
        b_pad = [(0, 0)] * x.b.ndim
        b_pad[n_stack] = (0, pad)
        b_list.append(jnp.pad(x.b.astype(dtype), b_pad))
        ranks.append(x.rank)
        scales.append(x.scale)
    if problems:
        raise _Unstackable(*problems)
    meta: dict[str, Any] = dict(
        scale=first.scale,
        layout=first.layout,
        dropout=first.dropout,
        residual_init=first.residual_init,
    )
    stacked = LoraWeight(None, jnp.stack(a_list), jnp.stack(b_list), **meta)
    return _Column(LoraWeight(w, None, None, **meta), stacked, ranks, scales)
