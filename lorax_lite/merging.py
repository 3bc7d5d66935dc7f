"""`merge` and `unmerge`: adapters folded into the base for deployment, and back."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import is_float_dtype, raise_problems
from .quant import is_quantized, quantize_array
from .targets import named_leaves, path_str
from .transform import lora
from .trees import lora_tree
from .weight import LoraWeight, Trainable, is_hole_or_node, is_node


def merge(
    tree: Any,
    *,
    check: bool = False,
    probe: tuple[Callable, Sequence[Any]] | None = None,
    requantize: bool = False,
) -> Any:
    """The plain parameter tree ``w + scale * A @ B``, with the original structure and dtypes.

    Each merged weight is accumulated in float32 and cast to its base dtype; `Trainable`
    leaves are unwrapped; a quantized base is dequantized (re-quantized with
    ``requantize``). The checks need concrete arrays (outside ``jax.jit``).

    Args:
        tree: a LoRA tree from `init` (or `combine`), or a `TrainState` (its ``.tree``),
            as every writer takes.
        check: raise if a merged float leaf holds NaN or inf.
        probe: ``(fn, args)``: compare ``fn(merged, *args)`` with the unmerged
            ``lora(fn)(tree, *args)``; the largest absolute deviation is logged at INFO
            level on the ``"lorax_lite"`` logger.
        requantize: quantize each merged weight whose base was quantized again, with
            its kind, block, blocked axes and double quantization (plain quantized
            leaves stay as they are); the largest error this adds, relative to the
            weight's largest magnitude, is logged at INFO level on the ``"lorax_lite"``
            logger.

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
            again = quantize_array(dense, **q.options(), path=path)
            added[path] = _max_relative_error(again.dequantize(), dense)
            return again
        if isinstance(node, LoraWeight):
            return node.materialize()
        if is_quantized(node):
            return node if requantize else node.dequantize()
        return node.value if isinstance(node, Trainable) else node

    merged = jax.tree_util.tree_map_with_path(unwrap, tree, is_leaf=is_node)
    if added:
        worst = max(added, key=lambda path: added[path])
        logging.getLogger("lorax_lite").info(
            "merge: re-quantized %d weights; largest added error %.3g of the weight's "
            "largest magnitude (%s)",
            len(added),
            added[worst],
            worst,
        )
    if check:
        bad = [
            p
            for p, x in named_leaves(merged)
            if is_float_dtype(getattr(x, "dtype", None)) and not _host_all_finite(x)
        ]
        raise_problems("merge: non-finite values (NaN or inf) in merged leaves", bad)
    if probe is not None:
        _probe_deviation(tree, merged, *probe)
    return merged


def _max_relative_error(approx: jax.Array, exact: jax.Array) -> float:
    """``max |approx - exact| / max |exact|`` in float64."""
    reference = np.asarray(exact, np.float64)
    error = np.abs(np.asarray(approx, np.float64) - reference).max()
    return float(error / np.abs(reference).max())


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

    Where ``tree`` holds the base weight it is kept (exact); where it holds only the
    factors (a trainable partition), the base is ``merged - scale * A @ B`` in float32.
    Trained leaves and a partition's holes take their merged values.

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
    raise_problems(
        "unmerge: a DoRA weight m * V / ||V|| fixes only V's direction, so its base cannot "
        "be recovered from the merged weight and the factors; pass the full tree (with w) for",
        dora,
    )
    return jax.tree_util.tree_map(restore, tree, merged, is_leaf=is_hole_or_node)
