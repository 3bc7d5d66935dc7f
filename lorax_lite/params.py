"""The parameter transform: init, merge/unmerge, quantize, and counts."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import decompose
from .config import LoraConfig
from .deprecation import renamed_keywords
from .quant import is_quantized, quantize_array
from .selection import select
from .targets import Spec, named_leaves, no_match, path_str, to_predicate
from .transform import lora
from .trees import lora_tree, trainable_mask
from .usage import infer_usage
from .weight import (
    LoraWeight,
    Trainable,
    column_norm,
    init_factors,
    is_array,
    is_hole_or_node,
    is_lora_node,
    is_node,
    stored_value,
)


@renamed_keywords(quantize="quantization")
def init(
    params: Any,
    config: LoraConfig,
    *,
    key: jax.Array,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    quantization: str | Mapping[str, Any] | None = None,
) -> Any:
    """Wraps the targeted leaves of ``params`` in `LoraWeight` and marks trained leaves.

    Args:
        params: any parameter pytree (Flax variables, an NNX state, a dict of arrays).
        config: what to adapt and how.
        key: PRNG key, split into one fresh key per adapted leaf.
        fn: optional model function ``fn(params, *args)``; traced abstractly (no FLOPs)
            to learn the fan-in, fan-out and stacked axes of weights with more than two
            dimensions, and which kernels are linear for ``"all-linear"``.
        args: example arguments for ``fn`` after ``params``.
        quantization: quantize the frozen base in the same call (QLoRA): a kind such as
            ``"nf4"``, or the keywords of `quantize` (``dict(kind="int8", block=32)``).
            (``quantize=`` before, which shadowed `quantize`: warns ``DeprecationWarning``.)

    Returns:
        The same tree with targeted leaves replaced by ``LoraWeight(w, a, b, scale)``
        and fully trained leaves (``config.train``, biases) wrapped in `Trainable`. A
        `QuantizedWeight` already in ``params`` (a GGUF file's blocks) is one weight: a
        targeted one becomes the ``w`` of its `LoraWeight` as it is, with factors sized
        by its logical shape; the others stay quantized and frozen.
        With ``init="pissa"``/``"olora"`` each ``w`` is the residual ``W - s A B``
        (then quantized, with ``quantization``); save it with the adapter (`save_adapter`
        records its fingerprint and `load_adapter` refuses the original weights).

    Raises:
        ValueError: if ``params`` already holds `LoraWeight` or `Trainable` leaves (naming
            them all). Otherwise listing every problem at once: patterns matching nothing
            (``targets``, ``exclude``, ``train``, and ``rank_pattern``, ``alpha_pattern``
            and ``axes`` keys that match no adapted leaf; with the closest paths), ranks
            larger than a weight allows, leaves both adapted and trained in full,
            weights whose layout is ambiguous, quantized weights trained in full
            (their integer codes have no gradient).

    Example:
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> lp = init(params, LoraConfig(rank=2, targets="dense"), key=jax.random.key(0))
        >>> lp["dense"]["kernel"].a.shape
        (4, 2)
    """
    _refuse_lora_nodes(params)
    named = named_leaves(params, is_leaf=is_quantized)
    usage = infer_usage(fn, params, args) if fn is not None else None
    adapted, trained, problems = select(named, config, usage)
    problems += _residual_init_problems(named, config, adapted)
    if problems:
        raise ValueError("lorax_lite.init found problems:\n  " + "\n  ".join(problems))

    paths = iter(named)
    keys = iter(jax.random.split(key, max(len(adapted), 1)))

    def wrap(leaf):
        path, _ = next(paths)
        if path in adapted:
            layout, rank, alpha = adapted[path]
            scale = config.scale_for(rank, alpha)
            if config.init in decompose.RESIDUAL_INITS:
                a, b, leaf = decompose.residual_init(
                    leaf,
                    layout,
                    rank,
                    scale,
                    init=config.init,
                    dtype=config.dtype,
                    niter=config.pissa_niter,
                    key=next(keys),
                )
            else:
                a, b = init_factors(
                    next(keys), leaf.shape, layout, rank, init=config.init, dtype=config.dtype
                )
            return LoraWeight(leaf, a, b, scale, layout, config.dropout)
        return Trainable(leaf) if path in trained else leaf

    tree = _quantized(jax.tree_util.tree_map(wrap, params, is_leaf=is_quantized), quantization)
    return with_magnitudes(tree, config.dora_detach_norm) if config.use_dora else tree


def _residual_init_problems(
    named: list[tuple[str, Any]], config: LoraConfig, targeted: Collection[str]
) -> list[str]:
    """PiSSA and OLoRA decompose each weight's values: a problem for each targeted leaf
    that has none (a `QuantizedWeight` or a ``jax.ShapeDtypeStruct`` stand-in)."""
    if config.init not in decompose.RESIDUAL_INITS:
        return []
    return [
        f"{path}: init={config.init!r} decomposes the weight's values, found a "
        f"{type(leaf).__name__}; pass the float weights (for a quantized base, its "
        "dequantized weights, with quantization= to quantize the residual)"
        for path, leaf in named
        if path in targeted and not is_array(leaf)
    ]


def with_magnitudes(tree: Any, detach_norm: bool) -> Any:
    """DoRA: gives every `LoraWeight` a magnitude ``m = ||w + s A B||`` per output unit
    over the fan-in axes (``||w||`` at init, where ``B = 0``; a quantized base's
    dequantized weights), so that the model starts unchanged."""

    def add(node):
        if not isinstance(node, LoraWeight):
            return node
        merged = stored_value(node.w).astype(jnp.float32) + node.delta(jnp.float32)
        m = column_norm(merged, node.layout).astype(node.a.dtype)
        return dataclasses.replace(node, m=m, detach_norm=detach_norm)

    return jax.tree_util.tree_map(add, tree, is_leaf=is_node)


def _quantized(tree: Any, spec: str | Mapping[str, Any] | None) -> Any:
    if spec is None:
        return tree
    return quantize(tree, **({"kind": spec} if isinstance(spec, str) else dict(spec)))


def _refuse_lora_nodes(params: Any) -> None:
    """Raises naming every `LoraWeight` and `Trainable` already in ``params``: `init` would
    wrap their parts (``w``, ``a``, ``b``) in adapters of their own."""
    nodes = [
        f"{path} ({type(node).__name__})"
        for path, node in named_leaves(params, is_leaf=is_lora_node)
        if is_lora_node(node)
    ]
    if nodes:
        raise ValueError(
            "lorax_lite.init: params already hold LoRA leaves, which init would nest; pass "
            "the base parameters (ll.merge(tree) folds the adapters in) or train the tree "
            "as it is:\n  " + "\n  ".join(nodes)
        )


def merge(
    tree: Any,
    *,
    check: bool = False,
    probe: tuple[Callable, Sequence[Any]] | None = None,
    requantize: bool = False,
) -> Any:
    """The plain parameter tree ``w + scale * A @ B``, with the original structure and dtypes.

    Each merged weight is accumulated in float32 and cast to its base dtype;
    `Trainable` leaves are unwrapped. A quantized base is dequantized first, and the
    result is a float model unless ``requantize``. The checks need concrete arrays
    (call them outside ``jax.jit``).

    Args:
        tree: a LoRA tree from `init` (or `combine`), or a `TrainState` (its ``.tree``),
            as every writer takes.
        check: raise if a merged float leaf holds NaN or inf.
        probe: ``(fn, args)``: compare ``fn(merged, *args)`` with the unmerged
            ``lora(fn)(tree, *args)``; the largest absolute deviation is logged at INFO
            level on the ``"lorax_lite"`` logger.
        requantize: quantize each merged weight whose base was quantized again, with
            its kind, block and axis (plain quantized leaves stay as they are); the
            largest error this adds, relative to the weight's largest magnitude, is
            logged at INFO level on the ``"lorax_lite"`` logger.

    Returns:
        The merged parameter tree.

    Raises:
        ValueError: with ``check``, naming every merged leaf that is not finite; with
            ``requantize``, naming a merged weight to quantize that is not finite; with
            ``probe``, if the deviation between the two outputs is not finite.

    Example:
        >>> lp = {"k": LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5)}
        >>> merge(lp)["k"].tolist()
        [[1.5, 1.5], [1.5, 1.5]]
    """

    tree = lora_tree(tree)
    added = {}

    def unwrap(key_path, node):
        if isinstance(node, LoraWeight) and requantize and is_quantized(node.w):
            dense, q = node.materialize(), node.w
            path = path_str(key_path)
            again = quantize_array(dense, kind=q.kind, block=q.block, axis=q.axis, path=path)
            added[path] = _relative_error(again.dequantize(), dense)
            return again
        if isinstance(node, LoraWeight):
            return node.materialize()
        if is_quantized(node):
            return node if requantize else node.dequantize()
        return node.value if isinstance(node, Trainable) else node

    merged = jax.tree_util.tree_map_with_path(unwrap, tree, is_leaf=is_node)
    if added:
        worst = max(added, key=added.get)
        logging.getLogger("lorax_lite").info(
            "merge: re-quantized %d weights; largest added error %.3g of the weight's "
            "largest magnitude (%s)",
            len(added),
            added[worst],
            worst,
        )
    if check:
        bad = [p for p, x in named_leaves(merged) if _is_float(x) and not _host_all_finite(x)]
        if bad:
            raise ValueError(f"merge: non-finite values (NaN or inf) in merged leaves: {bad}")
    if probe is not None:
        _probe_deviation(tree, merged, *probe)
    return merged


def _relative_error(approx: jax.Array, exact: jax.Array) -> float:
    exact = np.asarray(exact, np.float64)
    return float(np.abs(np.asarray(approx, np.float64) - exact).max() / np.abs(exact).max())


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _host_all_finite(x: Any) -> bool:
    return bool(np.isfinite(np.asarray(x, np.float32)).all())


def _probe_deviation(tree: Any, merged: Any, fn: Callable, args: Sequence[Any]) -> None:
    """Logs the largest ``|fn(merged) - lora(fn)(tree)|`` over the outputs."""
    expected = jax.tree_util.tree_leaves(lora(fn)(tree, *args))
    pairs = zip(jax.tree_util.tree_leaves(fn(merged, *args)), expected)
    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)) for a, e in pairs]
    # np.max propagates NaN, unlike the builtin max.
    deviation = float(np.max([d.max(initial=0.0) for d in diffs], initial=0.0))
    logging.getLogger("lorax_lite").info("merge probe: max |merged - unmerged| = %.3g", deviation)
    if not np.isfinite(deviation):
        raise ValueError(
            f"merge: the merged model's output deviates by {deviation} from the unmerged one"
        )


def unmerge(merged: Any, tree: Any) -> Any:
    """Rebuilds the LoRA tree from merged parameters and the adapters in ``tree``.

    Where ``tree`` still holds the base weight it is returned as is (exact); where
    it holds only the factors (a trainable partition), the base is recovered as
    ``merged - scale * A @ B`` in float32 (exact up to rounding of the base dtype).
    Fully trained leaves and the holes of a partition take their merged values.
    A DoRA weight needs its base in ``tree``: the merged weight does not determine it.

    Args:
        merged: the output of `merge`.
        tree: the LoRA tree, or its trainable partition.

    Returns:
        A full LoRA tree shaped like the output of `init`.

    Raises:
        ValueError: naming every DoRA weight whose base ``tree`` lacks.
    """

    def restore(node, value):
        if isinstance(node, LoraWeight):
            if node.w is not None:
                return node
            base = value.astype(jnp.float32) - node.delta(jnp.float32)
            return dataclasses.replace(node, w=base.astype(value.dtype))
        return Trainable(value) if isinstance(node, Trainable) else value

    dora = [
        p
        for p, node in named_leaves(tree, is_leaf=is_hole_or_node)
        if isinstance(node, LoraWeight) and node.w is None and node.m is not None
    ]
    if dora:
        raise ValueError(
            "unmerge: a DoRA weight m * V / ||V|| fixes only V's direction, so its base "
            "cannot be recovered from the merged weight and the factors; pass the full tree "
            f"(with w) for: {dora}"
        )
    return jax.tree_util.tree_map(restore, tree, merged, is_leaf=is_hole_or_node)


def count(tree: Any) -> dict[str, int]:
    """Parameter and byte counts: ``trainable``, ``total``, ``trainable_bytes``, ``total_bytes``.

    A `QuantizedWeight` counts its logical entries and the bytes it is stored in.

    Args:
        tree: a LoRA tree (or any parameter tree: nothing in it trains).

    Returns:
        ``{"trainable", "total", "trainable_bytes", "total_bytes"}`` as Python ints.
    """
    mask = jax.tree_util.tree_leaves(trainable_mask(tree))
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    nbytes = [
        x.nbytes if is_quantized(x) else s * np.dtype(x.dtype).itemsize
        for s, x in zip(sizes, leaves)
    ]
    return {
        "trainable": sum(s for s, m in zip(sizes, mask) if m),
        "total": sum(sizes),
        "trainable_bytes": sum(b for b, m in zip(nbytes, mask) if m),
        "total_bytes": sum(nbytes),
    }


def quantize(
    tree: Any,
    *,
    kind: str,
    block: int = 64,
    axis: int | None = None,
    also: Spec | Sequence[Spec] = (),
    double_quant: bool = False,
) -> Any:
    """Quantizes the frozen base of a LoRA tree (QLoRA): each `LoraWeight`'s ``w``.

    The adapters, `Trainable` leaves and everything else keep their dtype. `lora`
    dequantizes inside the compiled function, where each weight is used, so no
    full-precision copy of a quantized weight is kept between steps; its integer
    codes have no gradient and take no optimizer state.

    Args:
        tree: a LoRA tree from `init`.
        kind: ``"int8"``, ``"int4"``, ``"int4-asym"`` or ``"nf4"`` (see `lorax_lite.quant`).
        block: entries per block (each block has its own scale).
        axis: the blocked axis of every quantized weight; by default a LoRA weight's
            last fan-in axis (the input features of an ``(in, out)`` kernel), with blocks
            running across the fan-in axes before it where ``block`` needs (a
            DenseGeneral kernel's ``(heads, head_dim)``), and the last axis of other
            leaves (an embedding's features, as GGUF blocks them).
        also: patterns (as in ``LoraConfig.targets``) naming frozen plain leaves to
            quantize too, e.g. an embedding table or a frozen output head.
        double_quant: quantize the block scales too (QLoRA's double quantization, see
            `lorax_lite.quant.quantize_array`): NF4 at block 64 stores about 4.127 bits
            a weight instead of 4.5.

    Returns:
        The same tree with `QuantizedWeight` bases.

    Raises:
        ValueError: listing every problem at once: an unknown kind, a block that is not
            a positive integer dividing a leaf's blocked axis (or odd for 4-bit kinds),
            an already quantized leaf, a leaf that is not a float array or holds NaN or
            inf (with the first such index), an ``also`` pattern that matches no frozen
            leaf.

    Example:
        >>> lp = {"k": LoraWeight(jnp.ones((64, 2)), jnp.ones((64, 1)), jnp.zeros((1, 2)))}
        >>> quantize(lp, kind="nf4")["k"].w.kind
        'nf4'
    """
    named = named_leaves(tree, is_leaf=is_node)
    plain = [(p, x) for p, x in named if not is_node(x) or is_quantized(x)]
    extra, problems = set(), []
    for pattern in (also,) if isinstance(also, str) or callable(also) else tuple(also):
        predicate = to_predicate(pattern)
        hits = [p for p, x in plain if predicate(p, x)]
        extra |= set(hits)
        problems += (
            [] if hits else [no_match("also", pattern, "frozen leaf", [p for p, _ in plain])]
        )
    out = {}
    for path, node in named:
        weight = node.w if isinstance(node, LoraWeight) else node if path in extra else None
        if weight is None:
            continue
        blocked = axis if axis is not None else _default_axis(node)
        try:
            out[path] = quantize_array(
                weight, kind=kind, block=block, axis=blocked, double_quant=double_quant, path=path
            )
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError("lorax_lite.quantize found problems:\n  " + "\n  ".join(problems))
    paths = iter(named)

    def replace(node):
        path, _ = next(paths)
        if path not in out:
            return node
        return dataclasses.replace(node, w=out[path]) if isinstance(node, LoraWeight) else out[path]

    return jax.tree_util.tree_map(replace, tree, is_leaf=is_node)


def _default_axis(node: Any) -> int | tuple[int, ...]:
    """A LoRA weight's fan-in axes when consecutive (blocks may run across them), else
    its last fan-in axis; the last axis of other leaves."""
    if isinstance(node, LoraWeight) and node.layout.fan_in:
        fan_in = [i - node.w.ndim for i in node.layout.fan_in]
        consecutive = fan_in == list(range(fan_in[0], fan_in[-1] + 1))
        return tuple(fan_in) if consecutive else fan_in[-1]
    return -1
