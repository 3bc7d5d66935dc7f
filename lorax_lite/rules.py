"""The registry of first-order rules: primitive name -> rule, all called one way.

`RULES` maps a primitive's name to ``rule(eqn, operands, ctx)``, which returns the
equation's outputs as a list, or ``None`` (the evaluator then materializes the weight).
The rules wrap the products (`lorax_lite.products`) and structural ops
(`lorax_lite.structural`): operands are dequantized first; a product with a quantized
operand, or a base whose float cast was deferred (`weight.Cast`), runs under
`jax.checkpoint` so that the backward pass recomputes the weight instead of keeping it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core.primitives as prim
import jax.numpy as jnp

from . import views
from .lazy import Context, LoraValue, dequantized, flatten_values
from .products import conv, dot_general, gather, ragged_dot
from .quant import QuantizedWeight
from .structural import broadcast, convert, reshape, rev, slice_any, split, squeeze, transpose
from .weight import Cast, stored_value

Rule = Callable[[Any, list[Any], Context], list[Any] | None]
"""The one calling convention of every rule: ``rule(eqn, operands, ctx)`` returns the
equation's outputs as a list, or ``None`` where it has no low-rank form (the
evaluator then materializes the weight)."""


def _which_lazy(operands: list[Any]) -> tuple[bool, ...]:
    return tuple(isinstance(x, LoraValue) for x in operands)


def _first_order(rule: Rule) -> Rule:
    """``rule`` on dequantized operands; an equation left with no LoRA operand (a plain
    quantized weight) binds as it is."""

    @functools.wraps(rule)
    def run(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        operands = [dequantized(x) for x in operands]
        if not any(_which_lazy(operands)):
            return views.bind_results(eqn, operands)
        return rule(eqn, operands, ctx)

    return run


def _listed(out: Any) -> list[Any] | None:
    return out if out is None or isinstance(out, list) else [out]


def _product(op: Callable, *patterns: tuple[bool, ...], recompute: bool = True) -> Rule:
    """The rule of a product ``op(eqn, *operands, key, ctx)`` whose LoRA operands sit as
    one of ``patterns`` says; each site draws its own dropout key.

    With a quantized operand and ``recompute``, the product runs under `jax.checkpoint`
    with the codes as its inputs: the backward pass dequantizes the weight again instead
    of keeping it in float as a residual (per layer, under a scan), so a quantized base
    saves memory without the user's remat. ``recompute=False`` where the product's
    derivative does not read the weight (a gather's).
    """

    def rule(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        lazy = _which_lazy(operands)
        if any(lazy) and lazy not in patterns:
            return None
        dropout = any(lazy) and operands[lazy.index(True)].dropout
        key = ctx.next_key() if dropout else None

        run = _first_order(lambda eqn, ops, ctx: _listed(op(eqn, *ops, key, ctx)))
        if not (recompute and any(map(_recomputed, operands))):
            return run(eqn, operands, ctx)
        flat, rebuild = flatten_values(operands)
        return jax.checkpoint(lambda flat: run(eqn, rebuild(flat), ctx))(flat)

    return rule


def _recomputed(x: Any) -> bool:
    """Whether a product recomputes ``x``'s weight in the backward pass: a quantized
    weight, or a LoRA base with a deferred `Cast`."""
    w = x.w if isinstance(x, LoraValue) else x
    return isinstance(w, QuantizedWeight | Cast)


def _structural(op: Callable) -> Rule:
    """The rule of a structural op ``op(eqn, lora, *others)`` of the first operand,
    the only lazy one: the result stays lazy."""

    @_first_order
    def rule(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        if any(_which_lazy(operands)[1:]):
            return None
        return _listed(_same_norm(operands[0], op(eqn, *operands)))

    return rule


def _cast(rule: Rule) -> Rule:
    """``rule`` for a cast, except for a float cast of a weight that a product can
    recompute (see `_product`) instead of keeping the cast weight as a residual:

    * a quantized weight dequantizing to float32 (alone, or the base of a LoRA weight
      without DoRA) is retyped to dequantize to the new dtype: exact, since dequantizing
      computes in float32, so casting its float32 result and dequantizing to the new
      dtype round once alike;
    * the float base of a LoRA weight without DoRA (a bfloat16 base in a float32 model)
      becomes a `Cast`, applied where it is used.
    """

    def run(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
        dtype = jnp.dtype(views.new_dtype(eqn))
        (x,) = operands
        w = x.w if isinstance(x, LoraValue) and x.m is None else x
        if not jnp.issubdtype(dtype, jnp.floating):
            return rule(eqn, operands, ctx)
        retyped: QuantizedWeight | Cast
        if isinstance(w, QuantizedWeight) and jnp.dtype(w.dtype) == jnp.float32:
            retyped = dataclasses.replace(w, dtype=dtype)
        elif w is not x and jnp.dtype(w.dtype) != dtype:
            retyped = Cast(stored_value(w), dtype)  # a cast of a `Cast` applies the first
        else:
            return rule(eqn, operands, ctx)
        if w is x:
            return [retyped]
        return [x._replace(w=retyped, a=x.a.astype(dtype), b=x.b.astype(dtype))]

    return run


def _same_norm(before: LoraValue, after: Any) -> Any:
    """A structural rule's result, or None (the dense fallback) where it would change a
    DoRA weight's norm: an op that cuts or repeats fan-in entries (slicing rows, say)
    acts on ``m * V / ||V||`` with the norm of the whole weight, which the cut value
    could not recompute."""
    if before.m is None or after is None:
        return after
    pieces = after if isinstance(after, list) else [after]
    return after if all(v.fan_in_size() == before.fan_in_size() for v in pieces) else None


@_first_order
def _per_component(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
    """A cast of placement, type or differentiability of one operand: applied to w, A,
    B (and m) alike."""
    if len(operands) != 1:
        return None
    one = lambda x: views.bind_results(eqn, [x])[0]
    lora = operands[0].map_m(one)
    return [lora._replace(w=one(lora.w), a=one(lora.a), b=one(lora.b))]


@_first_order
def _on_w_only(eqn: Any, operands: list[Any], ctx: Context) -> list[Any] | None:
    """A sharding constraint: it places the weight; the small factors stay as they are."""
    (lora,) = operands
    return [lora._replace(w=views.bind(eqn, [lora.w]))]


RULES: dict[str, Rule] = {
    **dict.fromkeys(views.PASS_THROUGH, _per_component),
    prim.convert_element_type_p.name: _cast(_structural(convert)),
    prim.sharding_constraint_p.name: _on_w_only,
    prim.dot_general_p.name: _product(dot_general, (True, False), (False, True)),
    prim.conv_general_dilated_p.name: _product(conv, (False, True)),
    views.RAGGED_DOT: _product(ragged_dot, (False, True, False)),
    prim.gather_p.name: _product(gather, (True, False), recompute=False),
    prim.transpose_p.name: _structural(transpose),
    prim.reshape_p.name: _structural(reshape),
    prim.squeeze_p.name: _structural(squeeze),
    prim.rev_p.name: _structural(rev),
    prim.broadcast_in_dim_p.name: _structural(broadcast),
    prim.slice_p.name: _structural(slice_any),
    prim.dynamic_slice_p.name: _structural(slice_any),
    "split": _structural(split),  # no public primitive object
}
"""The first-order rules, by primitive name; `lorax_lite.transform` adds the
higher-order ones (calls, ``remat``, custom derivatives, loops, ``cond``)."""
