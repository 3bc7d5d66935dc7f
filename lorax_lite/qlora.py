"""`quantize`: a LoRA tree's frozen base stored in 8 or 4 bits (QLoRA)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from .checks import raise_problems
from .quant import fan_in_axis, is_quantized, quantize_array
from .targets import Spec, named_leaves, no_match, to_predicate
from .weight import LoraWeight, is_node


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

    Adapters, `Trainable` leaves and other leaves keep their dtype; `lora` dequantizes
    each weight where it is used, inside the compiled function.

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
        >>> import jax.numpy as jnp
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
    raise_problems("lorax_lite.quantize found problems", problems)
    paths = iter(named)

    def replace(node):
        path, _ = next(paths)
        if path not in out:
            return node
        return dataclasses.replace(node, w=out[path]) if isinstance(node, LoraWeight) else out[path]

    return jax.tree_util.tree_map(replace, tree, is_leaf=is_node)


def _default_axis(node: Any) -> int | tuple[int, ...]:
    """A LoRA weight's blocked axes by `fan_in_axis`; the last axis of other leaves."""
    if isinstance(node, LoraWeight):
        return fan_in_axis(node.layout.fan_in, node.w.ndim)
    return -1
