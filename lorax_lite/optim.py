"""`optimizer`: an optax transform that updates only the adapters and trained leaves."""

from __future__ import annotations

from typing import Any

import jax
import optax

from .params import trainable_mask


def labels(tree: Any) -> Any:
    """``"train"`` at every ``a``, ``b`` and `Trainable` value, ``"freeze"`` elsewhere."""
    return jax.tree_util.tree_map(lambda m: "train" if m else "freeze", trainable_mask(tree))


def optimizer(tx: optax.GradientTransformation, tree: Any = None) -> optax.GradientTransformation:
    """Wraps ``tx`` so that frozen leaves get zero updates and no optimizer state.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero`` for frozen leaves.
    The labels are computed from the tree passed to ``init``/``update``, so the
    same optimizer works on the full LoRA tree and on its trainable partition.

    Args:
        tx: the optimizer for the trainable leaves, e.g. ``optax.adamw(1e-3)``.
        tree: optional LoRA tree; when given, it is checked to contain something trainable.

    Returns:
        An ``optax.GradientTransformation``.

    Raises:
        ValueError: if ``tree`` has no trainable leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_lite.weight import LoraWeight
        >>> lp = {"k": LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)))}
        >>> state = optimizer(optax.adam(1e-3)).init(lp)
    """
    if tree is not None and not any(jax.tree_util.tree_leaves(trainable_mask(tree))):
        raise ValueError("optimizer: the tree has no trainable leaf; did you call ll.init?")
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
