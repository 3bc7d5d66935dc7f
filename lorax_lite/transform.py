"""`lora(fn)`: ``fn``'s jaxpr evaluated with `LoraWeight` leaves kept lazy, one rule per primitive.

``fn`` is traced once per input structure, shapes and dtypes, with plain arrays standing in
for the adapted weights; its equations then run on lazy `lazy.LoraValue`\\ s through
`RULES`: the first-order rules of `lorax_lite.rules`, and here the higher-order ones (calls,
``remat``, custom derivatives, ``scan``, ``cond``, ``while``), which enter their bodies. A use
with no rule materializes that one weight, warning once (``strict=True`` raises).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.extend.core.primitives as prim
import numpy as np
from jax import lax

from . import rules, views
from .lazy import Context, LoraValue, dequantized, flatten_values, rebuilt_value
from .quant import QuantizedWeight
from .targets import path_str
from .usage import split_static
from .weight import Gathered, Layout, LoraWeight, Trainable, is_array, is_node


class MaterializationError(TypeError):
    """Raised in strict mode when a LoRA weight would have to be materialized."""


def lora(fn: Callable, *, strict: bool = False) -> Callable:
    """Makes ``fn`` accept trees holding `LoraWeight` and `Trainable` leaves.

    Args:
        fn: any function of pytrees of arrays, e.g. a Flax ``model.apply``.
        strict: raise `MaterializationError` instead of warning when a LoRA weight
            meets an operation with no low-rank rule.

    Returns:
        A function with ``fn``'s signature plus a keyword ``dropout_key``: with a key,
        each adapter site draws its own dropout mask on its input; without one, no
        adapter dropout. ``deterministic=True`` (Flax's flag, a Python bool, also passed
        on to ``fn``) turns adapter dropout off too. It composes with ``jax.jit``,
        ``grad``, ``vmap``, ``pmap`` and ``shard_map``.

    Raises:
        TypeError: if ``deterministic`` is given and is not a Python bool.
        MaterializationError: with ``strict``, where a weight meets an operation with
            no low-rank rule.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeight(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5)
        >>> lora(jnp.dot)(jnp.ones((1, 3)), w).tolist()
        [[4.5, 4.5]]
    """
    cache: dict[Any, tuple[Any, Any]] = {}
    warned: set[tuple[str, str]] = set()

    @functools.wraps(fn)
    def wrapped(*args: Any, dropout_key: jax.Array | None = None, **kwargs: Any) -> Any:
        deterministic = kwargs.get("deterministic", False)
        if not isinstance(deterministic, bool | np.bool_):
            raise TypeError(
                "deterministic= must be a Python bool: it decides, when tracing, whether "
                f"adapter dropout runs; got {type(deterministic).__name__}"
            )
        if deterministic:
            dropout_key = None
        nodes, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_node)
        values = [as_lazy_value(_arg_path(path), node) for path, node in nodes]
        standins = [_standin(v) for v in values]
        dynamic, rebuild, static = split_static(jax.tree_util.tree_unflatten(treedef, standins))
        # Abstract values keep weak types, shardings and shard_map's varying axes.
        avals = tuple(_aval(x) for x in dynamic)

        def flat_fn(*arrays):
            call_args, call_kwargs = rebuild(arrays)
            return fn(*call_args, **call_kwargs)

        cache_key = (static, avals)
        try:
            closed, out_shape = cache[cache_key]
        except (KeyError, TypeError):  # TypeError: an unhashable static argument
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
            # A trace that closed over an outer transformation's tracers is not reusable.
            if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
                try:
                    cache[cache_key] = closed, out_shape
                except TypeError:
                    pass
        ctx = Context(dropout_key, strict, warned)
        inputs = [v for v, x in zip(values, standins) if is_array(x, abstract=True)]
        outs = evaluate(closed.jaxpr, closed.consts, inputs, ctx)
        outs = [materialize(x, "output", ctx) for x in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _arg_path(path: tuple) -> str:
    """A leaf's name as `ll.summary` shows it: its path inside the first positional
    argument, or prefixed by ``args[i]`` or the keyword for other arguments."""
    (group, arg), inner = path[:2], path[2:]
    if group.idx == 0 and arg.idx == 0 and inner:
        return path_str(inner)
    head = f"args[{arg.idx}]" if group.idx == 0 else str(arg.key)
    return "/".join((head, path_str(inner))) if inner else head


def _standin(value: Any) -> Any:
    """What ``fn`` is traced with in place of a value: the weight of a `LoraValue`,
    the logical shape and dtype of a `QuantizedWeight`."""
    w = value.w if isinstance(value, LoraValue) else value
    return jax.ShapeDtypeStruct(w.shape, w.dtype) if isinstance(w, QuantizedWeight) else w


def _aval(x: Any) -> Any:
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)


def as_lazy_value(path: str, node: Any) -> Any:
    """What the evaluator holds for an argument leaf: a `LoraValue` for a `LoraWeight`
    (named by ``path``), the array of a `Trainable`, any other leaf as it is."""
    if isinstance(node, Trainable):
        return node.value
    if not isinstance(node, LoraWeight):
        return node
    if node.w is None or node.a is None or node.b is None or (node.dora and node.m is None):
        raise ValueError(
            f"{path}: LoraWeight is missing w, a, b or DoRA's m (a partition?); "
            "use ll.combine(trainable, frozen) before calling the model"
        )
    w, a, b, m = _same_varying_axes(node.w, node.a, node.b, node.m)
    return LoraValue(w, a, b, node.scale, node.layout, node.dropout, path, m, node.detach_norm)


def _varying_axes(x: jax.Array) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _same_varying_axes(*parts: Any) -> list[Any]:
    """Inside ``shard_map``, marks w (each array of a quantized w), A and B varying
    over the same mesh axes (their union), so that each rule sees the types the traced
    jaxpr expects of the weight."""
    union = frozenset().union(*(_varying_axes(x) for x in jax.tree_util.tree_leaves(parts)))
    cast = lambda x: lax.pcast(x, tuple(union - _varying_axes(x)), to="varying")
    return [jax.tree_util.tree_map(cast, part) for part in parts]


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
    """Evaluates ``jaxpr`` where some inputs are `LoraValue`\\ s."""
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, _apply(eqn, [read(v) for v in eqn.invars], ctx)))
    return [read(v) for v in jaxpr.outvars]


def _apply(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """Runs one equation: plain operands bind as they are; a LoRA or quantized operand
    goes through the primitive's rule in `RULES`, and where there is none or it does
    not apply, the equation runs on the materialized weight."""
    if not any(isinstance(x, LoraValue | QuantizedWeight) for x in operands):
        return views.bind_results(eqn, operands)
    name = eqn.primitive.name
    if name not in _PASS_GATHERED:
        operands = [_resolved(x) for x in operands]
    rule = RULES.get(name)
    outs = rule(eqn, operands, ctx) if rule else None
    if outs is None:
        outs = views.bind_results(eqn, [materialize(x, name, ctx) for x in operands])
    return outs


def _resolved(x: Any) -> Any:
    """``x`` with `Gathered` factors (`ll.route`'s) gathered: what every rule but the
    ones in `_PASS_GATHERED` sees."""
    if isinstance(x, LoraValue) and isinstance(x.a, Gathered):
        return x._replace(a=x.a.resolve(), b=x.b.resolve())
    return x


def materialize(x: Any, use: str, ctx: Context) -> Any:
    """``x`` as a plain array: a LoRA weight becomes ``w + s A B`` (warning once per
    ``(use, path)``; ``strict`` raises instead), a quantized weight is dequantized.

    A single row or column (no fan-in or no fan-out axes left, e.g. ``table[3]``)
    costs no more than a lookup and materializes silently.

    Raises:
        MaterializationError: in strict mode, for a weight with fan-in and fan-out axes.
    """
    if not isinstance(x, LoraValue):
        return dequantized(x)
    x = _resolved(x)
    if x.layout.fan_in and x.layout.fan_out:
        message = (
            f"lorax_lite: '{use}' has no low-rank rule; materializing LoRA weight "
            f"{x.path} {tuple(x.w.shape)} (w + s*A@B) for this use."
        )
        if ctx.strict:
            raise MaterializationError(message + " (strict=True)")
        if (use, x.path) not in ctx.warned:
            ctx.warned.add((use, x.path))
            warnings.warn(message, stacklevel=4)
    return x.materialize()


# ----- higher-order primitives: entered with the values as they are --------------------
# (a scan over layers slices a quantized stack layer by layer)


def _dense_outputs(
    region: views.Region, inputs: Sequence[Any], ctx: Context, key: Any, use: str
) -> list[Any]:
    """Evaluates a region with its own dropout ``key``; its LoRA outputs materialize
    (naming ``use``), since control flow carries arrays only."""
    outs = evaluate(region.jaxpr, region.consts, inputs, ctx.child(key))
    return [materialize(x, use, ctx) for x in outs]


def _call(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """``jit``/``closed_call``: the body runs inline, on the lazy values."""
    (region,) = views.body_regions(eqn)
    return evaluate(region.jaxpr, region.consts, region.inputs(operands), ctx)


def _remat(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """Keeps ``jax.checkpoint`` around the block, with the factors as its inputs."""
    view, (region,) = views.remat(eqn), views.body_regions(eqn)
    flat, rebuild = flatten_values(region.inputs(operands))
    block = lambda flat, key: _dense_outputs(region, rebuild(flat), ctx, key, "remat output")
    remat = jax.checkpoint(block, prevent_cse=view.prevent_cse, policy=view.policy)
    return remat(flat, ctx.next_key())


def _custom_derivative(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """A ``custom_jvp``/``custom_vjp`` function of a LoRA weight.

    The forward pass runs lazily on the factors. The user's derivative rule is written
    for the dense weight, so derivatives run the original call on the materialized
    weight (warning once per weight; ``strict=True`` raises when differentiated), and
    the weight's cotangent reaches ``A`` and ``B`` through the materialization. Adapter
    dropout is not applied inside such a function (the dense rule could not see it).

    A ``custom_vjp`` function's closed-over values (its leading ``num_consts``
    operands) stay closed over, as JAX keeps them: not differentiated.
    """
    view, (region,) = views.custom(eqn), views.body_regions(eqn)
    inputs = region.inputs(operands)
    n_closed = view.n_closed if view.vjp else 0
    closed, (flat, rebuild) = inputs[:n_closed], flatten_values(inputs[n_closed:])
    name = eqn.primitive.name

    def forward(flat):
        return _dense_outputs(region, [*closed, *rebuild(flat)], ctx, None, f"{name} output")

    def dense_call(flat):
        dense = [materialize(x, f"derivative of {name}", ctx) for x in [*closed, *rebuild(flat)]]
        return views.bind(eqn, dense)

    if view.vjp:
        by_vjp = jax.custom_vjp(forward)
        by_vjp.defvjp(lambda flat: jax.vjp(dense_call, flat), lambda pullback, ct: pullback(ct))
        return by_vjp(flat)
    by_jvp = jax.custom_jvp(forward)
    by_jvp.defjvp(lambda primals, tangents: jax.jvp(dense_call, primals, tangents))
    return by_jvp(flat)


def _unstacked(v: Any, ctx: Context) -> tuple[Any, Any]:
    """A scanned-over input: LoRA weights stacked on axis 0 stay lazy, and quantized
    weights stay quantized, sliced per step (unless their blocks run along the scanned
    axis).
    `Gathered` factors stay where they are: the step gathers its own layer (see
    `_sliced_value`), the scan slices the layer indices."""
    if isinstance(v, QuantizedWeight):
        return (v.dequantize() if 0 in v.blocked_axes else v), None
    if not isinstance(v, LoraValue):
        return v, None
    stack, fan_in, fan_out = v.layout
    if not stack or stack[0] != 0:
        return materialize(v, "scan over a non-stacked axis", ctx), None
    if isinstance(v.w, QuantizedWeight) and 0 in v.w.blocked_axes:
        v = dequantized(v)
    if isinstance(v.a, Gathered) and v.a.layer is not None:  # a scan inside a scan
        v = _resolved(v)
    down = lambda axes: tuple(i - 1 for i in axes)
    layout = Layout(down(stack[1:]), down(fan_in), down(fan_out))
    if isinstance(v.a, Gathered):
        layers = lax.iota(np.int32, v.w.shape[0])
        return (v.w, layers, layers, v.m), v._replace(w=None, m=None, layout=layout)
    return (v.w, v.a, v.b, v.m), v._replace(w=None, a=None, b=None, m=None, layout=layout)


def _sliced_value(meta: LoraValue, parts: Sequence[Any]) -> LoraValue:
    """A scan step's LoRA value from its static part and its slice ``(w, a, b, m)``,
    where a `Gathered` factor's slice is the step's layer index."""
    if isinstance(meta.a, Gathered):
        w, a, b, m = parts
        parts = w, dataclasses.replace(meta.a, layer=a), dataclasses.replace(meta.b, layer=b), m
    return rebuilt_value(meta, parts)


def _scan(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """``lax.scan`` again, its scanned LoRA stacks sliced per step as factors."""
    view, (region,) = views.scan(eqn), views.body_regions(eqn)
    consts, init, xs = view.split(operands)
    init = [materialize(x, "scan carry", ctx) for x in init]
    unstacked = [_unstacked(v, ctx) for v in xs]
    xs, metas = [x for x, _ in unstacked], [m for _, m in unstacked]
    key = ctx.next_key()
    keys = None if key is None else jax.random.split(key, view.length)

    def body(carry, sliced):
        x_slices, step_key = sliced
        x_vals = [_sliced_value(m, x) if m else x for x, m in zip(x_slices, metas)]
        inputs = region.inputs([*consts, *carry, *x_vals])
        outs = _dense_outputs(region, inputs, ctx, step_key, "scan output")
        return outs[: len(init)], outs[len(init) :]

    carry, ys = lax.scan(
        body, init, (xs, keys), length=view.length, reverse=view.reverse, unroll=view.unroll
    )
    return [*carry, *ys]


def _cond(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """``lax.switch`` again (operand 0 picks the branch), the factors as operands."""
    branches = views.body_regions(eqn)
    flat, rebuild = flatten_values(branches[0].inputs(operands))

    def branch_fn(region):
        return lambda flat, key: _dense_outputs(region, rebuild(flat), ctx, key, "cond output")

    return lax.switch(operands[0], [branch_fn(b) for b in branches], flat, ctx.next_key())


def _while(eqn: Any, operands: list[Any], ctx: Context) -> list[Any]:
    """``lax.while_loop`` again; a LoRA weight in the carry materializes."""
    cond_consts, body_consts, init = views.while_loop(eqn).split(operands)
    fixed = [*cond_consts, *body_consts]
    cond_region, body_region = views.body_regions(eqn)
    init = [materialize(x, "while carry", ctx) for x in init]

    def cond_fun(state):
        carry, _ = state
        inputs = cond_region.inputs([*fixed, *carry])
        return evaluate(cond_region.jaxpr, cond_region.consts, inputs, ctx.child(None))[0]

    def body_fun(state):
        carry, key = state
        step_key = None
        if key is not None:
            key, step_key = jax.random.split(key)
        inputs = body_region.inputs([*fixed, *carry])
        return _dense_outputs(body_region, inputs, ctx, step_key, "while output"), key

    carry, _ = lax.while_loop(cond_fun, body_fun, (init, ctx.next_key()))
    return carry


_PASS_GATHERED = frozenset({*(p.name for p in views.CALLS), prim.remat_p.name, prim.scan_p.name})
"""Primitives whose rules pass `Gathered` factors on unresolved (into a call's body,
``remat``'s block, a scan's steps), so the gather runs where the factor is used."""

RULES: dict[str, rules.Rule] = {
    **rules.RULES,
    **dict.fromkeys((p.name for p in views.CALLS), _call),
    prim.remat_p.name: _remat,
    prim.custom_jvp_call_p.name: _custom_derivative,
    prim.custom_vjp_call_p.name: _custom_derivative,
    prim.scan_p.name: _scan,
    prim.cond_p.name: _cond,
    prim.while_p.name: _while,
}
"""The registry, primitive name -> rule: `rules.RULES` and the higher-order rules."""
