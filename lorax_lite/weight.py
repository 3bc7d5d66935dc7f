"""`LoraWeight`, the pytree node that carries a frozen weight and its adapter."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .quant import QuantizedWeight


class Layout(NamedTuple):
    """Which axes of a weight are stacked, fan-in and fan-out.

    ``A`` holds ``(stack..., fan_in..., r)`` and ``B`` holds ``(r, ...)`` preceded by
    the stack axes and followed by the fan-out axes, each group in the order given
    here (not necessarily the weight's own axis order).
    """

    stack: tuple[int, ...]
    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]

    @classmethod
    def dense(cls) -> Layout:
        """The layout of a 2-D ``(in, out)`` kernel."""
        return cls((), (0,), (1,))

    @classmethod
    def from_roles(cls, roles: tuple[str, ...]) -> Layout:
        """From one role per axis: ``("stack", "in", "out", "out")``."""
        pick = lambda role: tuple(i for i, r in enumerate(roles) if r == role)
        return cls(pick("stack"), pick("in"), pick("out"))

    def roles(self) -> tuple[str, ...]:
        """One role per axis of the weight, inverse of `from_roles`."""
        ndim = len(self.stack) + len(self.fan_in) + len(self.fan_out)
        out = [""] * ndim
        for role, axes in zip(("stack", "in", "out"), self):
            for axis in axes:
                out[axis] = role
        return tuple(out)

    def factor_shapes(self, shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
        """The shapes of ``A`` and ``B`` for a weight of ``shape``."""
        dims = lambda axes: tuple(shape[i] for i in axes)
        stack = dims(self.stack)
        return stack + dims(self.fan_in) + (rank,), stack + (rank,) + dims(self.fan_out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight ``w`` with a low-rank adapter: ``w + scale * A @ B``.

    ``w`` is frozen; ``a`` and ``b`` train. ``scale``, ``layout`` and ``dropout``
    are static metadata. After `partition`, ``w`` or ``a``/``b`` may be ``None``.

    Example:
        >>> w = LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
        >>> bool((w.materialize() == 1).all())
        True
    """

    w: jax.Array | QuantizedWeight | None
    a: jax.Array | None
    b: jax.Array | None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    layout: Layout = dataclasses.field(default=Layout.dense(), metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        return self.a.shape[-1]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``scale * A @ B`` in the weight's axis order, computed in ``dtype``."""
        a, b = self.a.astype(dtype), self.b.astype(dtype)
        dense = _contract_rank(a, b, len(self.layout.stack))
        order = self.layout.stack + self.layout.fan_in + self.layout.fan_out
        # dense holds the weight's axis order[k] at position k; put them back in place.
        dense = jnp.transpose(dense, tuple(order.index(i) for i in range(len(order))))
        return self.scale * dense

    def materialize(self) -> jax.Array:
        """``w + scale * A @ B``, accumulated in float32 and cast to ``w.dtype`` (a
        quantized ``w`` is dequantized first)."""
        w = self.w.dequantize() if isinstance(self.w, QuantizedWeight) else self.w
        merged = w.astype(jnp.float32) + self.delta(jnp.float32)
        return merged.astype(w.dtype)


def _contract_rank(a: jax.Array, b: jax.Array, n_stack: int) -> jax.Array:
    """``A @ B`` over the rank axis, batched over the leading ``n_stack`` axes."""
    stack = tuple(range(n_stack))
    dims = (((a.ndim - 1,), (n_stack,)), (stack, stack))
    return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a leaf trained in full (a new head, a bias): it gets gradients and state.

    Example:
        >>> Trainable(jnp.zeros(3)).value.shape
        (3,)
    """

    value: jax.Array | None


def is_lora_node(x: Any) -> bool:
    """Whether ``x`` is a `LoraWeight` or a `Trainable` (the library's pytree nodes)."""
    return isinstance(x, LoraWeight | Trainable)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a node the library keeps whole when walking a tree: a
    `LoraWeight`, a `Trainable` or a `QuantizedWeight` (one frozen leaf)."""
    return is_lora_node(x) or isinstance(x, QuantizedWeight)


def init_factors(
    key: jax.Array, shape: tuple[int, ...], layout: Layout, rank: int, *, init: str, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """``A`` random and ``B`` zeros for a weight of ``shape``, so ``w' == w`` at start.

    ``"kaiming"`` draws ``A`` uniform in ``+-1/sqrt(fan_in)`` (kaiming-uniform with
    ``a = sqrt(5)``, as PEFT); ``"gaussian"`` draws it normal with std ``1/r``.
    """
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    fan_in = math.prod(shape[i] for i in layout.fan_in)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, minval=-bound, maxval=bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
    return a, jnp.zeros(b_shape, dtype)
