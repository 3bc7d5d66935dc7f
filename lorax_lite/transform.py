"""`lora(fn)`: evaluate ``fn`` with `LoraWeight` leaves, never forming ``w + s A B``.

``fn`` is traced once per input structure, shapes and dtypes (plain arrays stand in
for each `LoraWeight`), and its jaxpr is evaluated with the LoRA leaves carried as
lazy `rules.LoraValue`\\ s. Products, convolutions and lookups use the factors
directly (see `rules`); calls, ``remat``, ``cond``, ``while`` and ``scan`` are
entered (``remat`` stays around its block); ``custom_jvp``/``custom_vjp`` functions run
lazily forward, and by their own rule on the dense weight when differentiated; any
other use of a LoRA weight materializes that one weight and warns once, naming the
primitive and the leaf path (``strict=True`` raises instead).
"""

from __future__ import annotations

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
from .quant import QuantizedWeight
from .rules import LoraValue
from .targets import path_str
from .weight import Layout, LoraWeight, Trainable, is_node

_STRUCTURAL = {
    prim.convert_element_type_p: rules.convert,
    prim.transpose_p: rules.transpose,
    prim.reshape_p: rules.reshape,
    prim.squeeze_p: rules.squeeze,
    prim.rev_p: rules.rev,
    prim.broadcast_in_dim_p: rules.broadcast,
}
_SLICES = (prim.slice_p, prim.dynamic_slice_p)
# Casts of placement, type or differentiability: applied to w, A and B alike. ``pvary``
# (marking a value as varying over shard_map axes) has no public primitive object.
_PER_COMPONENT = frozenset({"copy", "device_put", "stop_gradient", "pvary"})
_ON_W_ONLY = (prim.sharding_constraint_p,)
_CUSTOM_DERIVATIVES = (prim.custom_jvp_call_p, prim.custom_vjp_call_p)


class MaterializationError(TypeError):
    """Raised in strict mode when a LoRA weight would have to be materialized."""


class _Context:
    """Per-evaluation state: the dropout key, a counter of sites, strictness, and the
    ``(primitive, path)`` pairs already warned about by this wrapped function."""

    def __init__(self, key: jax.Array | None, strict: bool, warned: set[tuple[str, str]]):
        self.key, self.strict, self.warned, self.sites = key, strict, warned, 0

    def next_key(self) -> jax.Array | None:
        """A fresh key for the next adapter site or nested block (None without dropout)."""
        if self.key is None:
            return None
        self.sites += 1
        return jax.random.fold_in(self.key, self.sites)

    def child(self, key: jax.Array | None) -> _Context:
        return _Context(key, self.strict, self.warned)


def lora(fn: Callable, *, strict: bool = False) -> Callable:
    """Makes ``fn`` accept trees holding `LoraWeight` and `Trainable` leaves.

    Args:
        fn: any function of pytrees of arrays, e.g. a Flax ``model.apply``.
        strict: raise `MaterializationError` instead of warning when a LoRA weight
            meets an operation with no low-rank rule.

    Returns:
        A function with ``fn``'s signature plus a keyword ``dropout_key``: with a key,
        each adapter site draws its own dropout mask on the adapter input (rates from
        the `LoraWeight`\\ s); without one (evaluation), there is no dropout. A
        keyword ``deterministic=True`` (Flax's evaluation flag, a Python bool, passed
        on to ``fn`` like every other argument) turns adapter dropout off too, whatever
        the key. The function composes with ``jax.jit``, ``grad``, ``vmap``, ``pmap``
        and ``shard_map``.

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
        values = [_lazy(_arg_path(path), node) for path, node in nodes]
        standins = [_standin(v) for v in values]
        dynamic = [isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct) for x in standins]
        static = tuple(None if d else x for x, d in zip(standins, dynamic))
        # Abstract values keep weak types, shardings and shard_map's varying axes.
        avals = tuple(_aval(x) for x, d in zip(standins, dynamic) if d)

        def flat_fn(*arrays):
            it = iter(arrays)
            leaves = [next(it) if d else x for x, d in zip(standins, dynamic)]
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(*call_args, **call_kwargs)

        cache_key = (treedef, static, avals)
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
        ctx = _Context(dropout_key, strict, warned)
        inputs = [v for v, d in zip(values, dynamic) if d]
        outs = evaluate(closed.jaxpr, closed.consts, inputs, ctx)
        outs = [_dense(x, "output", ctx) for x in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    wrapped.trace_cache = cache
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


def _lazy(path: str, node: Any) -> Any:
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
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


def _same_varying_axes(*parts: Any) -> list[Any]:
    """Inside ``shard_map``, marks w (each array of a quantized w), A and B varying
    over the same mesh axes (their union), so that each rule sees the types the traced
    jaxpr expects of the weight."""
    union = frozenset().union(*(_varying_axes(x) for x in jax.tree_util.tree_leaves(parts)))
    cast = lambda x: lax.pcast(x, tuple(union - _varying_axes(x)), to="varying")
    return [jax.tree_util.tree_map(cast, part) for part in parts]


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: _Context) -> list[Any]:
    """Evaluates ``jaxpr`` where some inputs are `LoraValue`\\ s."""
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, LoraValue | QuantizedWeight) for x in invals):
            outs = _apply(eqn, invals, ctx)
        else:
            outs = views.bind(eqn, invals)
        env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
    return [read(v) for v in jaxpr.outvars]


def _apply(eqn: Any, invals: list[Any], ctx: _Context) -> Any:
    """Runs one equation with a LoRA or quantized operand through its rule.

    Calls, ``remat``, custom derivatives and loops are entered with the values as
    they are (a scan over layers slices a quantized stack layer by layer). Any other
    primitive dequantizes its quantized operands first, inside the compiled function,
    then runs its low-rank rule, else materializes the LoRA weight.
    """
    p = eqn.primitive
    if p is prim.remat_p:
        return _remat(views.remat(eqn), invals, ctx)
    if p in _CUSTOM_DERIVATIVES:
        return _custom_derivative(eqn, invals, ctx)
    if p in views.CALLS:
        call = views.call(eqn)
        return evaluate(call.body, call.consts, invals, ctx)
    if p is prim.scan_p:
        return _scan(views.scan(eqn), invals, ctx)
    if p is prim.cond_p:
        return _cond(views.cond(eqn), invals, ctx)
    if p is prim.while_p:
        return _while(views.while_loop(eqn), invals, ctx)
    invals = [_dequantized(x) for x in invals]
    lora_in = [isinstance(x, LoraValue) for x in invals]
    if not any(lora_in):  # only quantized operands, now dequantized
        return views.bind(eqn, invals)
    out = None
    if p in _STRUCTURAL:
        out = _same_norm(invals[0], _STRUCTURAL[p](eqn, invals[0]))
    elif p.name == "split":  # no public primitive object either
        out = _same_norm(invals[0], rules.split(eqn, invals[0]))
    elif p.name in _PER_COMPONENT and lora_in == [True]:
        one = (
            (lambda x: views.bind(eqn, [x])[0])
            if p.multiple_results
            else (lambda x: views.bind(eqn, [x]))
        )
        lora = invals[0].map_m(one)
        out = lora._replace(w=one(lora.w), a=one(lora.a), b=one(lora.b))
        out = [out] if p.multiple_results else out
    elif p in _ON_W_ONLY and lora_in[0]:
        out = invals[0]._replace(w=views.bind(eqn, [invals[0].w]))
    elif p in _SLICES and lora_in[0] and not any(lora_in[1:]):
        out = _same_norm(invals[0], rules.slice_any(eqn, *invals))
    elif p is prim.dot_general_p and sum(lora_in) == 1:
        lora = invals[lora_in.index(True)]
        out = rules.dot_general(eqn, *invals, ctx.next_key() if lora.dropout else None)
    elif p is prim.conv_general_dilated_p and lora_in == [False, True]:
        out = rules.conv(eqn, *invals, ctx.next_key() if invals[1].dropout else None)
    elif p.name == views.RAGGED_DOT and lora_in == [False, True, False]:
        out = rules.ragged_dot(eqn, *invals, ctx.next_key() if invals[1].dropout else None)
    elif p is prim.gather_p and lora_in == [True, False]:
        out = rules.gather(eqn, *invals)
    if out is None:
        out = views.bind(eqn, [_dense(x, p.name, ctx) for x in invals])
    return out


def _same_norm(before: LoraValue, after: Any) -> Any:
    """A structural rule's result, or None (the dense fallback) where it would change a
    DoRA weight's norm: an op that cuts or repeats fan-in entries (slicing rows, say)
    acts on ``m * V / ||V||`` with the norm of the whole weight, which the cut value
    could not recompute."""
    if before.m is None or after is None:
        return after
    pieces = after if isinstance(after, list) else [after]
    return after if all(v.fan_in_size() == before.fan_in_size() for v in pieces) else None


def _dequantized(x: Any) -> Any:
    """``x`` with a quantized weight (itself, or a LoRA weight's base) dequantized."""
    if isinstance(x, QuantizedWeight):
        return x.dequantize()
    if isinstance(x, LoraValue) and isinstance(x.w, QuantizedWeight):
        return x._replace(w=x.w.dequantize())
    return x


def _dense(x: Any, primitive: str, ctx: _Context) -> Any:
    """Materializes ``x`` if it is a LoRA weight, warning once per (primitive, path).

    A single row or column (no fan-in or no fan-out axes left, e.g. ``table[3]``)
    costs no more than a lookup and materializes silently.
    """
    if not isinstance(x, LoraValue):
        return _dequantized(x)
    if x.layout.fan_in and x.layout.fan_out:
        message = (
            f"lorax_lite: '{primitive}' has no low-rank rule; materializing LoRA weight "
            f"{x.path} {tuple(x.w.shape)} (w + s*A@B) for this use."
        )
        if ctx.strict:
            raise MaterializationError(message + " (strict=True)")
        if (primitive, x.path) not in ctx.warned:
            ctx.warned.add((primitive, x.path))
            warnings.warn(message, stacklevel=4)
    return x.materialize()


def _flatten(values: Sequence[Any]) -> tuple[list[Any], Callable[[Sequence[Any]], list[Any]]]:
    """LoRA values as ``(w, a, b, m)`` tuples (to pass through control flow), and back."""
    meta = [
        v._replace(w=None, a=None, b=None, m=None) if isinstance(v, LoraValue) else None
        for v in values
    ]
    flat = [(v.w, v.a, v.b, v.m) if m else v for v, m in zip(values, meta)]

    def rebuild(arrays: Sequence[Any]) -> list[Any]:
        return [_rebuilt(m, x) if m else x for x, m in zip(arrays, meta)]

    return flat, rebuild


def _rebuilt(meta: LoraValue, parts: Sequence[Any]) -> LoraValue:
    """A LoRA value from its static part and its ``(w, a, b, m)`` arrays."""
    return meta._replace(w=parts[0], a=parts[1], b=parts[2], m=parts[3])


def _remat(view: views.Remat, invals: list[Any], ctx: _Context) -> list[Any]:
    """Keeps ``jax.checkpoint`` around the block, with the factors as its inputs."""
    flat, rebuild = _flatten(invals)

    def block(flat, key):
        outs = evaluate(view.body, [], rebuild(flat), ctx.child(key))
        return [_dense(x, "remat output", ctx) for x in outs]

    remat = jax.checkpoint(block, prevent_cse=view.prevent_cse, policy=view.policy)
    return remat(flat, ctx.next_key())


def _custom_derivative(eqn: Any, invals: list[Any], ctx: _Context) -> list[Any]:
    """A ``custom_jvp``/``custom_vjp`` function of a LoRA weight.

    The forward pass runs lazily on the factors. The user's derivative rule is written
    for the dense weight, so derivatives run the original call on the materialized
    weight (warning once per weight; ``strict=True`` raises when differentiated), and
    the weight's cotangent reaches ``A`` and ``B`` through the materialization. Adapter
    dropout is not applied inside such a function (the dense rule could not see it).

    A ``custom_vjp`` function's closed-over values (its leading ``num_consts``
    operands) stay closed over, as JAX keeps them: not differentiated.
    """
    view = views.custom(eqn)
    n_closed = view.n_closed if view.vjp else 0
    closed, (flat, rebuild) = invals[:n_closed], _flatten(invals[n_closed:])
    body, name = view.body, f"derivative of {eqn.primitive.name}"

    def forward(flat):
        outs = evaluate(body.jaxpr, body.consts, [*closed, *rebuild(flat)], ctx.child(None))
        return [_dense(x, f"{eqn.primitive.name} output", ctx) for x in outs]

    def dense_call(flat):
        return views.bind(eqn, [_dense(x, name, ctx) for x in [*closed, *rebuild(flat)]])

    if view.vjp:
        call = jax.custom_vjp(forward)
        call.defvjp(lambda flat: jax.vjp(dense_call, flat), lambda pullback, ct: pullback(ct))
    else:
        call = jax.custom_jvp(forward)
        call.defjvp(lambda primals, tangents: jax.jvp(dense_call, primals, tangents))
    return call(flat)


def _unstacked(v: Any, ctx: _Context) -> tuple[Any, Any]:
    """A scanned-over input: LoRA weights stacked on axis 0 stay lazy, and quantized
    weights stay quantized, sliced per step (unless blocked along the scanned axis)."""
    if isinstance(v, QuantizedWeight):
        return (v.dequantize() if v.ndim + v.axis == 0 else v), None
    if not isinstance(v, LoraValue):
        return v, None
    stack, fan_in, fan_out = v.layout
    if not stack or stack[0] != 0:
        return _dense(v, "scan over a non-stacked axis", ctx), None
    if isinstance(v.w, QuantizedWeight) and v.w.ndim + v.w.axis == 0:
        v = _dequantized(v)
    down = lambda axes: tuple(i - 1 for i in axes)
    meta = v._replace(w=None, a=None, b=None, m=None)
    return (v.w, v.a, v.b, v.m), meta._replace(
        layout=Layout(down(stack[1:]), down(fan_in), down(fan_out))
    )


def _scan(view: views.Scan, invals: list[Any], ctx: _Context) -> list[Any]:
    consts, init, xs = view.split(invals)
    init = [_dense(x, "scan carry", ctx) for x in init]
    unstacked = [_unstacked(v, ctx) for v in xs]
    xs, metas = [x for x, _ in unstacked], [m for _, m in unstacked]
    key = ctx.next_key()
    keys = None if key is None else jax.random.split(key, view.length)
    n_carry = len(init)

    def body(carry, sliced):
        x_slices, step_key = sliced
        x_vals = [_rebuilt(m, x) if m else x for x, m in zip(x_slices, metas)]
        inputs = [*consts, *carry, *x_vals]
        outs = evaluate(view.body.jaxpr, view.body.consts, inputs, ctx.child(step_key))
        outs = [_dense(x, "scan output", ctx) for x in outs]
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        body, init, (xs, keys), length=view.length, reverse=view.reverse, unroll=view.unroll
    )
    return [*carry, *ys]


def _cond(view: views.Cond, invals: list[Any], ctx: _Context) -> list[Any]:
    flat, rebuild = _flatten(invals[1:])

    def branch_fn(branch):
        def run(flat, key):
            outs = evaluate(branch.jaxpr, branch.consts, rebuild(flat), ctx.child(key))
            return [_dense(x, "cond output", ctx) for x in outs]

        return run

    branches = [branch_fn(b) for b in view.branches]
    return lax.switch(invals[0], branches, flat, ctx.next_key())


def _while(view: views.While, invals: list[Any], ctx: _Context) -> list[Any]:
    cond_consts, body_consts, init = view.split(invals)
    init = [_dense(x, "while carry", ctx) for x in init]

    def cond_fun(state):
        carry, _ = state
        inputs = [*cond_consts, *carry]
        return evaluate(view.cond.jaxpr, view.cond.consts, inputs, ctx.child(None))[0]

    def body_fun(state):
        carry, key = state
        step_key = None
        if key is not None:
            key, step_key = jax.random.split(key)
        inputs = [*body_consts, *carry]
        outs = evaluate(view.body.jaxpr, view.body.consts, inputs, ctx.child(step_key))
        return [_dense(x, "while output", ctx) for x in outs], key

    carry, _ = lax.while_loop(cond_fun, body_fun, (init, ctx.next_key()))
    return carry
