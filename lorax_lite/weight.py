"""`LoraWeight`, the pytree node that carries a frozen weight and its adapter (and,
for DoRA, its trainable magnitude)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
        out = [""] * self.ndim
        for role, axes in zip(("stack", "in", "out"), self):
            for axis in axes:
                out[axis] = role
        return tuple(out)

    @property
    def ndim(self) -> int:
        """The number of axes of the weight."""
        return len(self.stack) + len(self.fan_in) + len(self.fan_out)

    def factor_axes(self) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
        """The weight axis each axis of ``A`` and ``B`` stands for (``None``: the rank).

        ``A`` is ``(stack..., fan_in..., r)`` and ``B`` is ``(stack..., r, fan_out...)``.
        """
        return (*self.stack, *self.fan_in, None), (*self.stack, None, *self.fan_out)

    def magnitude_axes(self) -> tuple[int, ...]:
        """The weight axis each axis of a DoRA magnitude ``m`` stands for:
        ``(stack..., fan_out...)``, one entry per output unit of each stacked weight."""
        return self.stack + self.fan_out

    def factor_shapes(
        self, shape: tuple[int, ...], rank: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``A`` and ``B`` for a weight of ``shape``."""
        a_axes, b_axes = self.factor_axes()
        pick = lambda axes: tuple(rank if i is None else shape[i] for i in axes)
        return pick(a_axes), pick(b_axes)

    def magnitude_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a DoRA magnitude ``m`` for a weight of ``shape``."""
        return tuple(shape[i] for i in self.magnitude_axes())


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight ``w`` with a low-rank adapter: ``w + scale * A @ B``.

    With a magnitude ``m`` (DoRA) the weight is ``m * V / ||V||`` with
    ``V = w + scale * A @ B``, the norm per output unit over the fan-in axes. All
    fields but ``w``, ``a``, ``b`` and ``m`` are static pytree data.

    Attributes:
        w: the frozen base (an array or a `QuantizedWeight`; ``None`` in a trainable
            partition).
        a: ``A``, ``(stack..., fan_in..., r)`` (``None`` in a frozen partition; a
            ``Gathered`` in `ll.route`'s tree).
        b: ``B``, ``(stack..., r, fan_out...)``.
        scale: ``s``, ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        layout: which axes of ``w`` are stacked, fan-in and fan-out.
        dropout: the dropout rate on the adapter's input.
        m: DoRA's magnitude, ``(stack..., fan_out...)``, trained, or ``None``.
        detach_norm: DoRA: ``||V||`` is a constant when differentiating (as PEFT).
        dora: whether ``m`` is a child (set whenever ``m`` is given), so a partition's
            ``None`` keeps its place; a plain weight has the children ``w, a, b`` only.
        residual_init: the init that replaced ``w`` by its residual ``W - s * A0 @ B0``
            (``"pissa"``, ``"olora"``, ``"loftq"``), or ``None``: ``w`` is the original
            weight (also in checkpoints written before this field existed).

    Example:
        >>> w = LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
        >>> bool((w.materialize() == 1).all())
        True
    """

    # The children hold arrays (their types in the docstring), or any other leaves in trees
    # of the same structure (masks, labels, shardings, vmap axes).
    w: Any
    a: Any
    b: Any
    scale: float = 1.0
    layout: Layout = Layout.dense()
    dropout: float = 0.0
    m: Any = None
    detach_norm: bool = True
    dora: bool = False
    residual_init: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dora", bool(self.dora) or self.m is not None)

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
        """``w + scale * A @ B`` (with DoRA, that times ``m / ||w + scale * A @ B||``),
        accumulated in float32 and cast to ``w.dtype`` (a quantized ``w`` is dequantized
        first). DoRA's norm is taken of the dense sum here, not from the factors, and
        is a constant for differentiation if ``detach_norm``, as in `lora`."""
        w = stored_value(self.w)
        merged = w.astype(jnp.float32) + self.delta(jnp.float32)
        if self.m is not None:
            squares = column_squares(merged, self.layout)
            ratio = magnitude_ratio(self.m, squares, self.detach_norm)
            merged = merged * to_weight_axes(ratio, self.layout)
        return merged.astype(w.dtype)


# The pytree's static data (the registration below; the children are `_child_names`).
_STATIC = ("scale", "layout", "dropout", "detach_norm", "dora", "residual_init")


def _child_names(node: LoraWeight) -> tuple[str, ...]:
    return ("w", "a", "b", "m") if node.dora else ("w", "a", "b")


def _flatten_with_keys(node: LoraWeight) -> tuple[list, tuple]:
    children = [(jax.tree_util.GetAttrKey(n), getattr(node, n)) for n in _child_names(node)]
    return children, tuple(getattr(node, n) for n in _STATIC)


def _flatten(node: LoraWeight) -> tuple[list, tuple]:
    return [getattr(node, n) for n in _child_names(node)], tuple(getattr(node, n) for n in _STATIC)


def _unflatten(static: tuple, children: Any) -> LoraWeight:
    w, a, b, *m = children
    return LoraWeight(w, a, b, **dict(zip(_STATIC, static)), m=m[0] if m else None)


jax.tree_util.register_pytree_with_keys(LoraWeight, _flatten_with_keys, _unflatten, _flatten)


def _contract_rank(a: jax.Array, b: jax.Array, n_stack: int) -> jax.Array:
    """``A @ B`` over the rank axis, batched over the leading ``n_stack`` axes."""
    stack = tuple(range(n_stack))
    dims = (((a.ndim - 1,), (n_stack,)), (stack, stack))
    return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST)


def column_squares(v: jax.Array, layout: Layout) -> jax.Array:
    """``||v||^2`` per output unit over the fan-in axes, in float32, shaped
    ``(stack..., fan_out...)`` in the layout's order."""
    squares = jnp.sum(jnp.square(v.astype(jnp.float32)), axis=layout.fan_in)
    axes = layout.magnitude_axes()
    kept = sorted(axes)  # the summed array's axes, in weight order
    return jnp.transpose(squares, [kept.index(i) for i in axes])


def column_norm(v: jax.Array, layout: Layout) -> jax.Array:
    """``||v||`` per output unit (`column_squares`): DoRA's initial magnitude."""
    return jnp.sqrt(column_squares(v, layout))


def magnitude_ratio(m: jax.Array, squares: jax.Array, detach_norm: bool) -> jax.Array:
    """DoRA's ``m / ||V||`` in float32, from ``||V||^2`` per output unit; the norm a
    constant for differentiation if ``detach_norm``.

    A unit with ``V = 0`` (a pruned or zero-initialised unit; ``m = 0`` at init) scales
    nothing, so any finite ratio gives it the right output, zero: it is divided by 1.
    The substitute goes in before the square root, whose gradient at 0 is infinite
    (times the ``where``'s zero, NaN), so gradients stay finite too.
    """
    empty = squares <= 0  # or below: rounding in `factored_squares`
    norm = jnp.sqrt(jnp.where(empty, 1.0, squares))
    norm = jax.lax.stop_gradient(norm) if detach_norm else norm
    return m.astype(jnp.float32) / norm


def spread(x: jax.Array, axes: Sequence[Any], target: Sequence[Any]) -> jax.Array:
    """``x``, whose axes are named by ``axes``, transposed and given size-1 axes to
    broadcast against an array whose axes are named by ``target``."""
    order = sorted(range(len(axes)), key=lambda k: list(target).index(axes[k]))
    x = jnp.transpose(x, order)
    return jnp.expand_dims(x, tuple(k for k, name in enumerate(target) if name not in axes))


def to_weight_axes(x: jax.Array, layout: Layout) -> jax.Array:
    """A ``(stack..., fan_out...)`` array (a magnitude, a ratio) laid out to broadcast
    against the weight."""
    return spread(x, layout.magnitude_axes(), range(layout.ndim))


def factored_squares(
    w: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: Layout
) -> jax.Array:
    """``||w + scale * A @ B||^2`` per output unit over the fan-in axes, from the factors.

    ``||w_j||^2 + 2 scale <(A^T w)_j, B_j> + scale^2 B_j^T (A^T A) B_j``: an
    ``(r, fan_out)`` product ``A^T w`` and an ``(r, r)`` Gram matrix per stacked
    weight, never the ``fan_in x fan_out`` sum. Float32, shaped ``(stack..., fan_out...)``.
    """
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    letters = iter("abcdefghijklmnopqtuvwxyz")  # r and s name the rank axes
    w_spec = [next(letters) for _ in range(w.ndim)]
    pick = lambda axes, rank="r": "".join(rank if i is None else w_spec[i] for i in axes)
    a_axes, b_axes = layout.factor_axes()
    a_spec, b_spec, stack = pick(a_axes), pick(b_axes), pick(layout.stack)
    einsum = lambda spec, *xs: jnp.einsum(spec, *xs, precision=hi, preferred_element_type=f32)
    a, b = a.astype(f32), b.astype(f32)
    w_squared = column_squares(w, layout)
    a_t_w = einsum(f"{a_spec},{''.join(w_spec)}->{b_spec}", a.astype(w.dtype), w)
    gram = einsum(f"{a_spec},{pick(a_axes, 's')}->{stack}rs", a, a)
    gram_b = einsum(f"{stack}rs,{pick(b_axes, 's')}->{b_spec}", gram, b)
    cross = jnp.sum(a_t_w * b, axis=len(layout.stack))
    low_rank = jnp.sum(gram_b * b, axis=len(layout.stack))
    # Rounding can take a (near) zero norm's square below zero (`magnitude_ratio`).
    return w_squared + 2 * scale * cross + scale**2 * low_rank


@functools.partial(jax.tree_util.register_dataclass, data_fields=["array"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class Cast:
    """A frozen base with a float cast deferred to the product that uses it (inside
    `ll.lora`), which then recomputes the cast in the backward pass instead of keeping
    the cast weight as a residual."""

    array: jax.Array
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return self.array.shape

    def dequantize(self) -> jax.Array:
        """The cast weight (named like `QuantizedWeight.dequantize`)."""
        return jax.lax.convert_element_type(self.array, self.dtype)


def stored_value(w: Any) -> Any:
    """A base weight as an array: a `QuantizedWeight` dequantized, a `Cast` applied,
    anything else as it is."""
    return w.dequantize() if isinstance(w, QuantizedWeight | Cast) else w


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gathered:
    """A factor gathered where it is used: ``table[index]`` (then ``[layer]``), times
    ``gain``, or ``fill`` where not ``keep``.

    `ll.route`'s per-example factors: ``index`` is each example's adapter, so the gather
    runs where `ll.lora` uses the factor (in a scan over layers, one layer per step).

    Attributes:
        table: the stacked factor, ``(adapters, *factor shape)``.
        index: the adapter, an integer in ``[0, adapters)``.
        gain: a scale to multiply by, or ``None``.
        keep: whether to keep the gathered value (a bool), or ``None`` (always).
        fill: the value where not ``keep``.
        layer: an index into the factor's first (stacked) axis, or ``None``.
    """

    table: jax.Array
    index: jax.Array
    gain: jax.Array | None = None
    keep: jax.Array | None = None
    fill: jax.Array | None = None
    layer: jax.Array | None = None

    def resolve(self) -> jax.Array:
        """The factor as an array."""
        x = self.table[self.index] if self.layer is None else self.table[self.index, self.layer]
        if self.gain is not None:
            x = x * jnp.asarray(self.gain, x.dtype)
        if self.keep is not None:
            x = jnp.where(self.keep, x, jnp.asarray(self.fill, x.dtype))
        return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a leaf trained in full (a new head, a bias): it gets gradients and state.

    Example:
        >>> Trainable(jnp.zeros(3)).value.shape
        (3,)
    """

    value: Any  # an array, or any leaf in a tree of the same structure (a mask, a label)


def is_lora_node(x: Any) -> bool:
    """Whether ``x`` is a `LoraWeight` or a `Trainable` (the library's pytree nodes)."""
    return isinstance(x, LoraWeight | Trainable)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a node the library keeps whole when walking a tree: a
    `LoraWeight`, a `Trainable` or a `QuantizedWeight` (one frozen leaf)."""
    return is_lora_node(x) or isinstance(x, QuantizedWeight)


def is_hole_or_node(x: Any) -> bool:
    """Whether ``x`` is a partition's ``None`` hole or an `is_node` node: the leaves of a
    walk over several trees, one of them partitioned."""
    return x is None or is_node(x)


def is_array(x: Any, *, abstract: bool = False) -> bool:
    """Whether ``x`` is a JAX or NumPy array (with ``abstract``, or a ``jax.ShapeDtypeStruct``)."""
    kinds = (jax.Array, np.ndarray) + ((jax.ShapeDtypeStruct,) if abstract else ())
    return isinstance(x, kinds)


def scale_from_alpha(alpha: float, rank: int, *, rslora: bool) -> float:
    """The adapter's scale ``s``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

    Example:
        >>> scale_from_alpha(16, 4, rslora=False), scale_from_alpha(16, 4, rslora=True)
        (4.0, 8.0)
    """
    return alpha / _rank_divisor(rank, rslora)


def alpha_from_scale(scale: float, rank: int, *, rslora: bool) -> float:
    """The ``alpha`` whose adapter of ``rank`` has ``scale`` (inverse of `scale_from_alpha`)."""
    return scale * _rank_divisor(rank, rslora)


def _rank_divisor(rank: int, rslora: bool) -> float:
    return math.sqrt(rank) if rslora else rank


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
