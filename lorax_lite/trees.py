"""Tree surgery on LoRA trees: the trainable/frozen partition, the base under the adapters.

`partition` and `combine` split a LoRA tree into what trains and what stays frozen and put it
back together; a `TrainState` carries that partition through training. `base_of` recovers the
plain base and `cast_base` changes its dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import is_float_dtype
from .quant import QuantizedWeight
from .weight import LoraWeight, Trainable, is_node


def trainable_mask(tree: Any) -> Any:
    """A tree of bools shaped like ``tree``: True at ``a``, ``b``, DoRA's ``m`` and
    `Trainable` values."""

    def mark(node):
        if isinstance(node, LoraWeight):
            return dataclasses.replace(
                node,
                w=_mark_present(node.w, False),
                a=_mark_present(node.a, True),
                b=_mark_present(node.b, True),
                m=_mark_present(node.m, True),
            )
        if isinstance(node, Trainable):
            return Trainable(_mark_present(node.value, True))
        return False

    return jax.tree_util.tree_map(mark, tree, is_leaf=is_node)


def _mark_present(x: Any, flag: bool) -> bool | None:
    return None if x is None else flag


def require_trainable(tree: Any, caller: str) -> None:
    """Raises ``ValueError`` if ``tree`` has nothing to train (no adapter factor, no
    `Trainable`): a step over it would run and never learn."""
    if not any(jax.tree_util.tree_leaves(trainable_mask(tree))):
        raise ValueError(f"{caller}: the tree has no trainable leaf; did you call ll.init?")


def partition(tree: Any) -> tuple[Any, Any]:
    """Splits ``tree`` into ``(trainable, frozen)`` with ``None`` holes.

    ``trainable`` holds every ``a``, ``b``, DoRA ``m`` and `Trainable` value; ``frozen`` holds
    every base weight and untouched leaf. `combine` is the exact inverse.

    Args:
        tree: a LoRA tree.

    Returns:
        ``(trainable, frozen)``, each of ``tree``'s structure.

    Example:
        >>> lp = {"k": LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)))}
        >>> trainable, frozen = partition(lp)
        >>> trainable["k"].w is None and frozen["k"].a is None
        True
    """
    mask = trainable_mask(tree)
    trainable = jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)
    frozen = jax.tree_util.tree_map(lambda m, x: None if m else x, mask, tree)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Fills the ``None`` holes of the first tree from the others (inverse of `partition`).

    Args:
        *trees: trees of one structure; each leaf is the first of them that is not ``None``.

    Returns:
        The combined tree.
    """

    def first(*xs):
        return next((x for x in xs if x is not None), None)

    return jax.tree_util.tree_map(first, *trees, is_leaf=lambda x: x is None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes, as a pytree.

    Attributes:
        step: the number of steps taken (int32 scalar).
        trainable: the trainable partition (adapters ``a``/``b`` and `Trainable` values).
        frozen: the frozen partition (base weights); never updated, never donated.
        opt_state: the optimizer state, for the trainable partition only.
        key: the PRNG key; step ``t`` draws dropout with ``fold_in(key, t)``.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    key: jax.Array

    @property
    def tree(self) -> Any:
        """The full LoRA tree, ``combine(trainable, frozen)``."""
        return combine(self.trainable, self.frozen)


def lora_tree(tree: Any) -> Any:
    """What every writer (`save_adapter`, `to_peft`, `merge`) writes: a `TrainState`'s full
    tree, or ``tree`` itself (a LoRA tree, or for `to_peft` its trainable partition)."""
    return tree.tree if isinstance(tree, TrainState) else tree


def base_leaf(node: Any) -> Any:
    """The base under a node: ``w`` of a `LoraWeight`, the value of a `Trainable`, else the node."""
    if isinstance(node, LoraWeight):
        return node.w
    return node.value if isinstance(node, Trainable) else node


def base_of(tree: Any) -> Any:
    """The plain base tree: each `LoraWeight` replaced by ``w``, each `Trainable` unwrapped."""
    return jax.tree_util.tree_map(base_leaf, tree, is_leaf=is_node)


def cast_base(tree: Any, dtype: Any) -> Any:
    """The frozen base weights cast to ``dtype`` (e.g. ``jnp.bfloat16``); adapters untouched.

    Casts ``LoraWeight.w`` and plain float leaves; ``a``, ``b``, `Trainable` values and
    integer leaves keep their dtype; a `QuantizedWeight` keeps its codes and dequantizes
    to ``dtype``. Given a `TrainState`, casts its ``frozen`` part only.

    Args:
        tree: a LoRA tree, its frozen partition, or a `TrainState`.
        dtype: the dtype for the base.

    Returns:
        The same structure with the base in ``dtype``.

    Raises:
        TypeError: if ``dtype`` is not a floating dtype (casting would truncate the
            weights to integers; `quantize` stores an 8- or 4-bit base).

    Example:
        >>> lp = {"k": LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)))}
        >>> cast_base(lp, jnp.bfloat16)["k"].w.dtype, cast_base(lp, jnp.bfloat16)["k"].a.dtype
        (dtype(bfloat16), dtype('float32'))
    """
    if not is_float_dtype(dtype):
        raise TypeError(
            f"cast_base: dtype must be a floating dtype such as jnp.bfloat16, got {dtype!r}; "
            'for an 8- or 4-bit base use ll.quantize(tree, kind="int8") (or "int4", "nf4")'
        )
    if isinstance(tree, TrainState):
        return dataclasses.replace(tree, frozen=cast_base(tree.frozen, dtype))

    def cast_float(x: Any) -> Any:
        if isinstance(x, QuantizedWeight):
            return dataclasses.replace(x, dtype=np.dtype(dtype))
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    def cast(node: Any) -> Any:
        if isinstance(node, LoraWeight):
            return dataclasses.replace(node, w=None if node.w is None else cast_float(node.w))
        return node if isinstance(node, Trainable) else cast_float(node)

    return jax.tree_util.tree_map(cast, tree, is_leaf=is_node)
