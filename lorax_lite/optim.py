"""`optimizer`: an optax transform that updates only the adapters and trained leaves,
optionally with LoRA+ (a larger learning rate for ``B``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from .checks import is_positive
from .trees import require_trainable, trainable_mask
from .weight import LoraWeight, is_node


def labels(tree: Any, *, separate_b: bool = False) -> Any:
    """``"train"`` at every ``a``, ``b`` and `Trainable` value, ``"freeze"`` elsewhere.

    With ``separate_b``, every ``b`` is labelled ``"train_b"`` instead (LoRA+).
    """
    marks = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", trainable_mask(tree))
    if not separate_b:
        return marks

    def relabel(node):
        if isinstance(node, LoraWeight) and node.b is not None:
            return dataclasses.replace(node, b="train_b")
        return node

    return jax.tree_util.tree_map(relabel, marks, is_leaf=is_node)


def optimizer(
    tx: optax.GradientTransformation,
    tree: Any = None,
    *,
    b_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
    """Wraps ``tx`` so that frozen leaves get zero updates and no optimizer state.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero``; the labels come from
    the tree passed to ``init``/``update``, so it works on the full tree and on its
    trainable partition. With ``b_lr_ratio`` (LoRA+), each ``B`` gets its own
    ``optax.chain(tx, optax.scale(ratio))``: ``ratio`` times ``A``'s learning rate for
    optimizers whose update is proportional to it (SGD, Adam, AdamW, Lion).

    Args:
        tx: the optimizer for the trainable leaves, e.g. ``optax.adamw(1e-3)``.
        tree: optional LoRA tree; when given, it is checked to contain something trainable.
        b_lr_ratio: LoRA+ ratio ``lr_B / lr_A`` (the paper suggests 2 to 16; PEFT's
            ``loraplus_lr_ratio``); ``None`` trains ``A`` and ``B`` alike.

    Returns:
        An ``optax.GradientTransformation``. With ``b_lr_ratio`` its state holds one
        inner state for ``"train"`` (``A``, `Trainable`) and one for ``"train_b"``.

    Raises:
        ValueError: if ``tree`` has no trainable leaf, or ``b_lr_ratio`` is not a
            finite number > 0.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_lite.weight import LoraWeight
        >>> lp = {"k": LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)))}
        >>> state = optimizer(optax.adam(1e-3)).init(lp)
        >>> state = optimizer(optax.adam(1e-4), lp, b_lr_ratio=16).init(lp)
    """
    if tree is not None:
        require_trainable(tree, "optimizer")
    if b_lr_ratio is None:
        return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    if not is_positive(b_lr_ratio):
        raise ValueError(f"optimizer: b_lr_ratio must be a finite number > 0, got {b_lr_ratio!r}")
    transforms = {
        "train": tx,
        "train_b": optax.chain(tx, optax.scale(float(b_lr_ratio))),
        "freeze": optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, lambda t: labels(t, separate_b=True))
