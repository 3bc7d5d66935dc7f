"""`summary`: trainable and total parameters, like PEFT's print_trainable_parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .quant import is_quantized
from .targets import named_leaves
from .trees import trainable_mask
from .weight import LoraWeight, Trainable, is_lora_node


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


def summary(tree: Any, *, per_leaf: bool = False) -> str:
    """A printable summary of a LoRA tree.

    Args:
        tree: a tree from `lorax_lite.init`.
        per_leaf: add a table of every adapted or trained leaf: path, shape, layout
            roles, rank, trainable parameters (``A``, ``B`` and DoRA's ``m``).

    Returns:
        The text; its first line reads (for float32 parameters)
        ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330
        (trainable 4.8 KiB of 22.2 KiB)``, bytes as stored. A tree with a quantized
        base adds a line ``quantized base: 3 weights (nf4), 2.3 KiB stored, 8.0 KiB
        dequantized``.

    Example:
        >>> import jax.numpy as jnp
        >>> lp = {"k": LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 1)), jnp.zeros((1, 4)))}
        >>> print(summary(lp))
        trainable params: 8 || all params: 24 || trainable%: 33.3333 (trainable 32 B of 96 B)
    """
    c = count(tree)
    percent = 100.0 * c["trainable"] / max(c["total"], 1)
    lines = [
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {percent:.4f} (trainable {_bytes(c['trainable_bytes'])} "
        f"of {_bytes(c['total_bytes'])})"
    ]
    quantized = [
        x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized) if is_quantized(x)
    ]
    if quantized:
        kinds = ", ".join(sorted({q.kind for q in quantized}))
        stored = sum(q.nbytes for q in quantized)
        dense = sum(int(np.prod(q.shape)) * q.dtype.itemsize for q in quantized)
        lines.append(
            f"quantized base: {len(quantized)} weights ({kinds}), {_bytes(stored)} stored, "
            f"{_bytes(dense)} dequantized"
        )
    if per_leaf:
        rows = [("path", "shape", "axes (A: stack,in,r; B: stack,r,out)", "rank", "trainable")]
        for path, node in named_leaves(tree, is_leaf=is_lora_node):
            if isinstance(node, LoraWeight | Trainable):
                rows.append((path, *_leaf_row(node)))
        lines.append(text_table(rows))
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` as text: columns left-aligned, two spaces apart, no trailing spaces.

    Example:
        >>> print(text_table([("path", "rank"), ("a/kernel", "8")]))
        path      rank
        a/kernel  8
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _leaf_row(node: LoraWeight | Trainable) -> tuple[str, str, str, str]:
    """Shape, axes, rank and trainable size of a node; a partition's holes show as ``-``."""
    size = lambda x: 0 if x is None else int(np.size(x))
    if isinstance(node, Trainable):
        shape = "-" if node.value is None else str(np.shape(node.value))
        return shape, "full", "-", f"{size(node.value):,}"
    shape = "-" if node.w is None else str(tuple(node.w.shape))
    if node.a is not None:
        rank = str(node.a.shape[-1])
    else:
        rank = "-" if node.b is None else str(node.b.shape[len(node.layout.stack)])
    trained = size(node.a) + size(node.b) + size(node.m)  # m: DoRA's magnitude
    return shape, ",".join(node.layout.roles()), rank, f"{trained:,}"


def _bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.0f} {units[power]}" if power == 0 else f"{n:.1f} {units[power]}"
