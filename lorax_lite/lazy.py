"""The lazy value `ll.lora`'s evaluator holds in place of a `LoraWeight`, and the context
every rule is called with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .weight import Layout, LoraWeight, factored_squares, magnitude_ratio, stored_value


class LoraValue(NamedTuple):
    """A weight held lazily inside the evaluator, with the leaf path it came from."""

    # Arrays, a quantized or `Cast` ``w``, `Gathered` factors; None in a static part.
    w: Any
    a: Any
    b: Any
    scale: float
    layout: Layout
    dropout: float
    path: str
    m: Any = None
    detach_norm: bool = True

    def materialize(self) -> jax.Array:
        """``w + scale * A @ B`` (with DoRA, times ``m / norm``), accumulated in float32,
        in ``w``'s dtype."""
        node = LoraWeight(stored_value(self.w), self.a, self.b, self.scale, self.layout,
                          m=self.m, detach_norm=self.detach_norm)  # fmt: skip
        return node.materialize()

    def magnitude_ratio(self) -> jax.Array:
        """DoRA's ``m / ||w + scale * A @ B||``, float32, ``(stack..., fan_out...)``; the
        norm from the factors, a constant for differentiation if ``detach_norm``."""
        squares = factored_squares(self.w, self.a, self.b, self.scale, self.layout)
        return magnitude_ratio(self.m, squares, self.detach_norm)

    def map_m(self, fn: Any) -> LoraValue:
        """The value with ``fn`` applied to ``m`` (nothing to do without DoRA)."""
        return self if self.m is None else self._replace(m=fn(self.m))

    def fan_in_size(self) -> int:
        """The number of fan-in entries per output unit (what DoRA's norm sums over)."""
        return math.prod(self.w.shape[i] for i in self.layout.fan_in)


def dequantized(x: Any) -> Any:
    """``x`` with a quantized weight (itself, or a LoRA weight's base) dequantized and a
    LoRA weight's deferred `Cast` applied."""
    if isinstance(x, LoraValue):
        return x._replace(w=stored_value(x.w))
    return stored_value(x)


class Context:
    """What every rule is called with besides the equation and its operands: the
    dropout key, strictness, and the ``(primitive, path)`` pairs already warned
    about by this wrapped function."""

    def __init__(self, key: jax.Array | None, strict: bool, warned: set[tuple[str, str]]):
        self.key, self.strict, self.warned, self.sites = key, strict, warned, 0
        self._shared: dict[tuple, tuple[Any, Any]] = {}

    def shared(self, fn: Callable, x: Any, *static: Any) -> Any:
        """``fn(x, *static)``, computed once per traced value ``x`` in this block.

        Products of one input (q, k and v of one hidden state) then read one prepared
        copy of it, which the backward pass of a scan keeps once per layer, not once per
        product.
        """
        key = (id(x), fn, static)
        hit = self._shared.get(key)
        if hit is None or hit[0] is not x:  # an id is only unique while its object lives
            hit = self._shared[key] = (x, fn(x, *static))
        return hit[1]

    def next_key(self) -> jax.Array | None:
        """A fresh key for the next adapter site or nested block (None without dropout)."""
        if self.key is None:
            return None
        self.sites += 1
        return jax.random.fold_in(self.key, self.sites)

    def child(self, key: jax.Array | None) -> Context:
        """The context of a nested block (a loop body, a branch) drawing from ``key``."""
        return Context(key, self.strict, self.warned)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter input; identity without a key or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def flatten_values(
    values: Sequence[Any],
) -> tuple[list[Any], Callable[[Sequence[Any]], list[Any]]]:
    """LoRA values as ``(w, a, b, m)`` tuples (to pass through a traced function), and back."""
    meta = [
        v._replace(w=None, a=None, b=None, m=None) if isinstance(v, LoraValue) else None
        for v in values
    ]
    flat = [(v.w, v.a, v.b, v.m) if m else v for v, m in zip(values, meta)]

    def rebuild(arrays: Sequence[Any]) -> list[Any]:
        return [rebuilt_value(m, x) if m else x for x, m in zip(arrays, meta)]

    return flat, rebuild


def rebuilt_value(meta: LoraValue, parts: Sequence[Any]) -> LoraValue:
    """A LoRA value from its static part and its ``(w, a, b, m)`` arrays."""
    return meta._replace(w=parts[0], a=parts[1], b=parts[2], m=parts[3])
