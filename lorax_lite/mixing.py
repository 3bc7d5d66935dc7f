"""Adapter mixing: one adapter made from a weighted combination of several.

`combine_adapters` combines the adapters of an `AdapterSet` leaf by leaf: ``cat`` (exact,
the ranks add up), ``linear`` (PEFT's, same rank, approximate) or ``svd`` (the weighted sum
re-factored at a chosen rank), and PEFT's pruning merges ``ties``, ``dare_linear``,
``dare_ties`` and ``magnitude_prune``, reporting each leaf's error against the exact
weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .adapter_set import AdapterSet, adapter_factors
from .checks import is_int, raise_problems
from .decompose import HIGHEST, as_matrices, split_svd, truncated_svd
from .stacking import flat_nodes
from .weight import Layout, LoraWeight, Trainable


class Combined(NamedTuple):
    """The result of `combine_adapters`.

    Attributes:
        tree: a full LoRA tree (scale 1: the weights and scales are in the factors).
        errors: ``{path: relative Frobenius error}`` of each combined delta against
            the weighted sum of the adapters' deltas (``0`` for ``cat``, exact).
    """

    tree: Any
    errors: dict[str, jax.Array]


def combine_adapters(
    adapters: AdapterSet | Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
    dare_mask: Callable[[jax.Array, float], jax.Array] | None = None,
) -> Combined:
    """One adapter from a weighted combination of several over the same base.

    The target is ``sum_i weight_i * delta_i`` at each leaf (``delta = scale * A @ B``).

    * ``"cat"``: concatenate the factors along the rank, the weight and scale applied
      to ``B``: exactly the target, rank ``sum_i r_i``. Serving this tree runs all the
      adapters at once on the forward path, without merging them into the base.
    * ``"linear"``: ``A = sum_i sign(w_i) c_i A_i``, ``B = sum_i c_i B_i`` with
      ``c_i = sqrt(|w_i| scale_i)`` (PEFT's ``linear``, extended to negative weights);
      same rank, not the target in general (cross terms), see ``errors``.
    * ``"svd"``: the target summed densely in float32, re-factored by truncated SVD
      to ``rank``, the singular values split as ``sqrt`` between ``A`` and ``B``.
    * ``"magnitude_prune"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` (PEFT's
      ``add_weighted_adapter``, same rank): ``linear``'s weighted sum of the ``A`` s and
      of the ``B`` s, each factor first pruned to a fraction ``density`` of its entries
      (per stacked slice): its largest magnitudes (``magnitude_prune``, TIES, Yadav et
      al. 2023) or a random keep mask rescaled by ``1 / density`` (DARE, Yu et al.
      2024). The ``ties`` kinds then keep, entry by entry, only the adapters whose
      sign agrees with the majority (``majority_sign_method``: the sign of the sum,
      ``"total"``, or the most frequent sign, ``"frequency"``) and average them.

    Leaves trained in full combine as task vectors: ``base + sum_i w_i (v_i - base)``.

    Args:
        adapters: an `AdapterSet`, or ``{name: tree}`` to make one.
        weights: ``{name: weight}`` of the adapters to combine.
        method: ``"cat"``, ``"linear"`` or ``"svd"``.
        rank: the rank for ``"svd"`` (default: the largest input rank at each leaf),
            capped at ``min(d_in, d_out)``.
        density: the fraction of each factor's entries the pruning methods keep, in
            ``[0, 1]`` (1 keeps all).
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` kinds.
        key: the PRNG key of DARE's random masks.
        dare_mask: instead of ``key``, ``(factor, density) -> keep mask`` (boolean,
            the factor's shape), called for each adapter's ``A`` and ``B``: a fixed
            mask, e.g. to compare with another library's merge.

    Returns:
        `Combined` ``(tree, errors)``; merge the tree with `ll.merge` for export. Its
        LoRA weights keep the adapters' `LoraWeight.residual_init`.

    Raises:
        ValueError: for an unknown method or name, a weight that is not a finite
            number, a bad rank, density or sign method, DARE without ``key`` or
            ``dare_mask``, ``"linear"`` or a pruning method over different ranks,
            leaves trained in full without base values (naming every such leaf), or
            trees whose adapters differ in `LoraWeight.residual_init` (naming them).

    Example:
        >>> tree, errors = combine_adapters(adapters, {"a": 0.7, "b": 0.3}, method="svd",
        ...                                 rank=8)  # doctest: +SKIP
    """
    if not isinstance(adapters, AdapterSet):
        adapters = AdapterSet.from_trees(adapters)
    _check_combination(adapters, weights, method, rank)
    options = _options(method, rank, density, majority_sign_method, key, dare_mask)
    chosen = [(adapters.index(n), float(w)) for n, w in weights.items()]
    paths, stacked, treedef = flat_nodes(adapters.stacked)
    _, frozen, _ = flat_nodes(adapters.frozen)
    out, errors, problems, lora_k = [], {}, [], 0
    for path, node, base in zip(paths, stacked, frozen):
        if isinstance(node, LoraWeight):
            parts = _parts(adapters, node, lora_k, chosen)
            lora_k += 1
            if not parts:
                out.append(base.w)
                continue
            if method not in ("cat", "svd") and len({r for _, _, r in parts}) > 1:
                problems.append(f"{path}: ranks {[r for _, _, r in parts]} differ")
                out.append(None)
                continue
            a, b, errors[path] = _COMBINERS[method](parts, node.layout, options)
            init = node.residual_init
            out.append(LoraWeight(base.w, a, b, 1.0, node.layout, node.dropout, residual_init=init))
        elif isinstance(node, Trainable):
            if base.value is None:
                problems.append(f"{path}: trained in full, base value unknown (pass base=)")
            out.append(_task_vector(node.value, base.value, chosen))
        else:
            out.append(base)
    raise_problems(f"combine_adapters(method={method!r})", problems)
    return Combined(jax.tree_util.tree_unflatten(treedef, out), errors)


def _check_combination(
    adapters: AdapterSet, weights: Mapping[str, float], method: str, rank: int | None
) -> None:
    problems = []
    if method not in _COMBINERS:
        problems.append(f"method must be one of {sorted(_COMBINERS)}, got {method!r}")
    if not weights:
        problems.append("no weights given")
    unknown = [n for n in weights if n not in adapters.names]
    if unknown:
        problems.append(f"unknown adapters {unknown}; the set holds {list(adapters.names)}")
    bad = {n: w for n, w in weights.items() if not _is_finite(w)}
    if bad:
        problems.append(f"weights must be finite numbers, got {bad}")
    if rank is not None and not is_int(rank, 1):
        problems.append(f"rank must be a positive int or None, got {rank!r}")
    if problems:
        raise ValueError("combine_adapters: " + "; ".join(problems))


class _Options(NamedTuple):
    rank: int | None
    density: float
    sign_method: str
    mask: Callable[[jax.Array, float], jax.Array] | None


def _options(
    method: str,
    rank: int | None,
    density: float | None,
    sign_method: str,
    key: jax.Array | None,
    dare_mask: Callable | None,
) -> _Options:
    """The pruning options, checked where ``method`` uses them."""
    problems: list[str] = []
    mask: Callable[[jax.Array, float], jax.Array] | None = None
    if method in _PRUNING:
        if density is None or not _is_finite(density) or not 0 <= float(density) <= 1:
            problems.append(f"density must be a number in [0, 1], got {density!r}")
        if sign_method not in ("total", "frequency"):
            problems.append(
                f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}"
            )
    if method.startswith("dare"):
        if dare_mask is not None:
            mask = dare_mask
        elif key is not None:
            mask = _random_masks(key)
        else:
            problems.append("DARE's random masks need key= (or dare_mask=)")
    raise_problems(f"combine_adapters(method={method!r})", problems)
    return _Options(rank, 1.0 if density is None else float(density), sign_method, mask)


def _random_masks(key: jax.Array) -> Callable[[jax.Array, float], jax.Array]:
    """Bernoulli keep masks, a fresh key for each factor."""
    count = iter(range(2**31))
    return lambda x, p: jax.random.bernoulli(jax.random.fold_in(key, next(count)), p, x.shape)


def _is_finite(weight: Any) -> bool:
    """Whether ``weight`` is a finite number (a Python, NumPy or 0-d JAX scalar)."""
    if isinstance(weight, str | bytes):
        return False  # float() would parse "nan" or "0.5"
    try:
        return math.isfinite(float(weight))
    except (TypeError, ValueError):
        return False


def _parts(adapters: AdapterSet, node: LoraWeight, k: int, chosen: list) -> list[tuple]:
    """``(weight * scale, (A, B) trimmed to the adapter's rank, rank)`` per chosen adapter."""
    parts = []
    for i, weight in chosen:
        r = adapters.ranks[i][k]
        if r:
            parts.append((weight * adapters.scales[i][k], adapter_factors(node, i, r), r))
    return parts


def _task_vector(values: jax.Array, base: jax.Array | None, chosen: list) -> Trainable:
    if base is None:
        return Trainable(None)
    total = base.astype(jnp.float32)
    for i, weight in chosen:
        total = total + weight * (values[i].astype(jnp.float32) - base.astype(jnp.float32))
    return Trainable(total.astype(base.dtype))


def _factor_matrices(a: jax.Array, b: jax.Array, layout: Layout) -> tuple[jax.Array, jax.Array]:
    """``A`` as ``(stack..., d_in, r)`` and ``B`` as ``(stack..., r, d_out)`` in float32."""
    n_stack = len(layout.stack)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return as_matrices(a, n_stack, len(layout.fan_in)), as_matrices(b, n_stack, 1)


def _from_matrices(
    a: jax.Array, b: jax.Array, like_a: jax.Array, like_b: jax.Array, layout: Layout
) -> tuple[jax.Array, jax.Array]:
    """The inverse of `_factor_matrices` at a new rank, in the factors' dtype."""
    n_stack, rank = len(layout.stack), a.shape[-1]
    a = a.reshape(*like_a.shape[:-1], rank).astype(like_a.dtype)
    b = b.reshape(*like_b.shape[:n_stack], rank, *like_b.shape[n_stack + 1 :])
    return a, b.astype(like_b.dtype)


def _target(parts: list[tuple], layout: Layout) -> jax.Array:
    """``sum_i w_i s_i A_i @ B_i`` as ``(stack..., d_in, d_out)`` in float32."""
    total = jnp.zeros((), jnp.float32)
    for coef, (a, b), _ in parts:
        a, b = _factor_matrices(a, b, layout)
        total = total + coef * jnp.matmul(a, b, precision=HIGHEST)
    return total


def _relative_error(target: jax.Array, a: jax.Array, b: jax.Array, layout: Layout) -> jax.Array:
    a, b = _factor_matrices(a, b, layout)
    norm = jnp.linalg.norm(target)
    residual = jnp.linalg.norm(target - jnp.matmul(a, b, precision=HIGHEST))
    # Exact is 0 even for a zero target; a NaN anywhere stays NaN, never reads as 0.
    return jnp.where(residual == 0, 0.0, residual / norm)


def _combine_cat(parts: list[tuple], layout: Layout, options: _Options) -> tuple:
    n_stack = len(layout.stack)
    a = jnp.concatenate([a for _, (a, _), _ in parts], axis=-1)
    bs = [(coef * b.astype(jnp.float32)).astype(b.dtype) for coef, (_, b), _ in parts]
    return a, jnp.concatenate(bs, axis=n_stack), jnp.zeros((), jnp.float32)


def _combine_linear(parts: list[tuple], layout: Layout, options: _Options) -> tuple:
    a_sum = b_sum = jnp.zeros((), jnp.float32)
    for coef, (a, b), _ in parts:
        c = math.sqrt(abs(coef))
        a_sum = a_sum + math.copysign(c, coef) * a.astype(jnp.float32)
        b_sum = b_sum + c * b.astype(jnp.float32)
    like_a, like_b = parts[0][1]
    a, b = a_sum.astype(like_a.dtype), b_sum.astype(like_b.dtype)
    return a, b, _relative_error(_target(parts, layout), a, b, layout)


def _combine_svd(parts: list[tuple], layout: Layout, options: _Options) -> tuple:
    target = _target(parts, layout)
    keep = min(options.rank or max(r for _, _, r in parts), *target.shape[-2:])
    a, b = split_svd(*truncated_svd(target, keep))
    like_a, like_b = parts[0][1]
    a, b = _from_matrices(a, b, like_a, like_b, layout)
    return a, b, _relative_error(target, a, b, layout)


def _pruned_merge(method: str) -> Callable:
    """A PEFT pruning merge: each factor pruned, then summed (or TIES' disjoint mean)
    with ``linear``'s coefficients."""
    random, ties = method.startswith("dare"), method.endswith("ties")

    def combine(parts: list[tuple], layout: Layout, options: _Options) -> tuple:
        n_stack, density, mask = len(layout.stack), options.density, options.mask
        coefs = [coef for coef, _, _ in parts]
        roots = [math.sqrt(abs(c)) for c in coefs]
        factors = []
        for k, signed in ((0, True), (1, False)):
            xs = [f[k].astype(jnp.float32) for _, f, _ in parts]
            if mask is not None and density < 1:  # DARE's (only they have a mask)
                xs = [x * mask(x, density) / density for x in xs]
            # One row per stacked slice: PEFT prunes each layer's factor on its own.
            stacked = jnp.stack([as_matrices(x, n_stack, 0) for x in xs])
            if not random:
                stacked = _keep_largest(stacked, density)
            c = [math.copysign(r, w) if signed else r for r, w in zip(roots, coefs)]
            weighted = stacked * jnp.asarray(c, jnp.float32).reshape(-1, *[1] * n_stack, 1, 1)
            if ties:
                agree = _majority_sign_mask(stacked, options.sign_method)
                count = jnp.maximum(agree.sum(0), 1)
                merged = (weighted * agree).sum(0) / count
            else:
                merged = weighted.sum(0)
            like = parts[0][1][k]
            factors.append(merged.reshape(like.shape).astype(like.dtype))
        a, b = factors
        return a, b, _relative_error(_target(parts, layout), a, b, layout)

    return combine


def _keep_largest(x: jax.Array, density: float) -> jax.Array:
    """``x`` (matrices ``(..., 1, n)``) with all but its ``int(density * n)`` largest
    magnitudes of each matrix zeroed (``density >= 1`` keeps all, as PEFT)."""
    if density >= 1:
        return x
    k = int(density * x.shape[-1])
    if k == 0:
        return jnp.zeros_like(x)
    threshold = jax.lax.top_k(jnp.abs(x), k)[0][..., -1:]
    return jnp.where(jnp.abs(x) >= threshold, x, 0.0)


def _majority_sign_mask(x: jax.Array, method: str) -> jax.Array:
    """Where each adapter's entry (axis 0) has the majority's sign: that of the sum
    (``"total"``) or the more frequent one (``"frequency"``), ties to ``+``."""
    sign = jnp.sign(x)
    votes = (x if method == "total" else sign).sum(0)
    return sign == jnp.where(votes >= 0, 1.0, -1.0)


_PRUNING = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
_COMBINERS: dict[str, Callable] = {
    "cat": _combine_cat,
    "linear": _combine_linear,
    "svd": _combine_svd,
    **{method: _pruned_merge(method) for method in _PRUNING},
}
