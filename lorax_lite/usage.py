"""How a function uses its weights: traced once, abstractly, to learn each layout.

`init` calls `infer_usage` to find, for every weight, whether it is a matmul
kernel, a conv kernel or an embedding table, and which of its axes are fan-in,
fan-out and stacked (a scan-over-layers axis), without running any FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core.primitives as prim

from . import views
from .quant import is_quantized
from .targets import named_leaves
from .weight import Layout, is_array


class Usage(NamedTuple):
    """How a weight is first used: ``kind`` is ``"dot"`` (``dot_general``, or
    ``ragged_dot`` with the expert axis stacked), ``"conv"`` or ``"gather"``."""

    kind: str
    layout: Layout


class _Tracked(NamedTuple):
    path: str
    axes: tuple[int, ...]  # the original axis held at each axis of this value
    stack: tuple[int, ...]  # original axes sliced away by an enclosing scan


def split_static(tree: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any], tuple]:
    """Splits ``tree`` into its array leaves and a function rebuilding it from them.

    Non-array leaves (Python bools, strings, None-like flags) stay static; they are
    returned as a hashable key so that traces can be cached on them.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [is_array(x, abstract=True) for x in leaves]
    static = tuple(None if arr else x for x, arr in zip(leaves, arrays))
    dynamic = [x for x, arr in zip(leaves, arrays) if arr]

    def rebuild(values: Sequence[Any]) -> Any:
        it = iter(values)
        merged = [next(it) if arr else x for x, arr in zip(leaves, arrays)]
        return jax.tree_util.tree_unflatten(treedef, merged)

    return dynamic, rebuild, (treedef, static)


def infer_usage(fn: Callable, params: Any, args: Sequence[Any] = ()) -> dict[str, Usage]:
    """Traces ``fn(params, *args)`` abstractly and reports how each weight is used.

    A `QuantizedWeight` is one weight: ``fn`` is traced with a ``jax.ShapeDtypeStruct``
    of its logical shape and dtype in its place, as `lora` traces it.

    Args:
        fn: the model function, e.g. ``model.apply``.
        params: the parameter pytree (arrays, ``jax.ShapeDtypeStruct`` or `QuantizedWeight`).
        args: example arguments after ``params`` (arrays, shape structs or static values).

    Returns:
        ``{path: Usage}`` for every leaf reaching a ``dot_general``, a conv or a gather.
    """
    logical = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x
    params = jax.tree_util.tree_map(logical, params, is_leaf=is_quantized)
    named = named_leaves(params)
    dynamic, rebuild, _ = split_static(tuple(args))
    closed = jax.make_jaxpr(lambda p, d: fn(p, *rebuild(d)))(params, dynamic)
    env = {
        var: _Tracked(path, tuple(range(len(leaf.shape))), ())
        for var, (path, leaf) in zip(closed.jaxpr.invars, named)
    }
    found: dict[str, Usage] = {}
    _walk(closed.jaxpr, env, found)
    return found


def _walk(jaxpr: Any, env: dict, found: dict[str, Usage]) -> None:
    for eqn in jaxpr.eqns:
        tracked = [env.get(v) if not hasattr(v, "val") else None for v in eqn.invars]
        if not any(tracked):
            continue
        step = _STEPS.get(eqn.primitive.name)
        if step is not None:
            step(eqn, tracked, env, found)
            continue
        for region in views.regions(eqn) or ():
            inner = region.inputs(tracked, slice_one=_sliced)
            _walk(region.jaxpr, _bind(region.jaxpr.invars, inner), found)


Step = Callable[[Any, list[Any], dict, dict[str, Usage]], None]
"""The one calling convention of `_STEPS`: ``step(eqn, tracked, env, found)`` follows a
tracked weight through one equation (into ``env``) or records its use (into ``found``)."""


def _pass(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    """The weight passes on unchanged (a cast, a copy, a slice of it)."""
    if tracked[0]:
        env[eqn.outvars[0]] = tracked[0]


def _squeeze(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    """Indexing one entry of an axis (``w[i]``) makes that axis a stack of weights."""
    first = tracked[0]
    if first:
        gone = {d % len(first.axes) for d in views.dimensions(eqn)}
        kept = tuple(ax for i, ax in enumerate(first.axes) if i not in gone)
        stack = first.stack + tuple(first.axes[i] for i in sorted(gone))
        env[eqn.outvars[0]] = first._replace(axes=kept, stack=stack)


def _transpose(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    first = tracked[0]
    if first:
        axes = tuple(first.axes[i] for i in views.permutation(eqn))
        env[eqn.outvars[0]] = first._replace(axes=axes)


def _dot(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    dot = views.dot(eqn)
    for t, contract, batch in zip(tracked, dot.contract, dot.batch):
        if t:
            _record(found, t, "dot", _roles(len(t.axes), contract, batch))


def _ragged_dot(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    """The weight is the right operand, its group (expert) axis stacked."""
    if len(tracked) > 1 and tracked[1]:
        ragged = views.ragged_dot(eqn)
        stacked = (*ragged.dot.batch[1], *ragged.rhs_group)
        roles = _roles(len(tracked[1].axes), ragged.dot.contract[1], stacked)
        _record(found, tracked[1], "dot", roles)


def _conv(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    if tracked[1]:
        out_axis = views.conv(eqn).kernel_spec[0]
        roles = {ax: "out" if ax == out_axis else "in" for ax in range(len(tracked[1].axes))}
        _record(found, tracked[1], "conv", roles)


def _gather(eqn: Any, tracked: list[Any], env: dict, found: dict[str, Usage]) -> None:
    first = tracked[0]
    if first:
        indexed = views.gather(eqn).dimension_numbers.start_index_map
        roles = {ax: "in" if ax in indexed else "out" for ax in range(len(first.axes))}
        _record(found, first, "gather", roles)


def _roles(ndim: int, contract: Sequence[int], stacked: Sequence[int]) -> dict[int, str]:
    """A product's roles of a weight's axes: contracted fan-in, batch stacked, else fan-out."""
    return {
        ax: "in" if ax in contract else "stack" if ax in stacked else "out" for ax in range(ndim)
    }


_STEPS: dict[str, Step] = {
    **dict.fromkeys(views.PASS_THROUGH, _pass),
    prim.slice_p.name: _pass,
    prim.dynamic_slice_p.name: _pass,
    prim.squeeze_p.name: _squeeze,
    prim.transpose_p.name: _transpose,
    prim.dot_general_p.name: _dot,
    views.RAGGED_DOT: _ragged_dot,
    prim.conv_general_dilated_p.name: _conv,
    prim.gather_p.name: _gather,
}
"""The first-order steps, by primitive name; other equations are entered through their
sub-jaxprs (`views.regions`), if any."""


def _sliced(t: _Tracked | None) -> _Tracked | None:
    """A scanned input: the loop takes its leading axis away."""
    return t and _Tracked(t.path, t.axes[1:], t.stack + t.axes[:1])


def _bind(invars: Sequence[Any], tracked: Sequence[Any]) -> dict:
    return {var: t for var, t in zip(invars, tracked) if t}


def _record(found: dict[str, Usage], t: _Tracked, kind: str, roles: dict[int, str]) -> None:
    if t.path in found:
        return
    by_axis = {t.axes[ax]: role for ax, role in roles.items()}
    by_axis.update({ax: "stack" for ax in t.stack})
    layout = Layout.from_roles(tuple(by_axis[ax] for ax in range(len(by_axis))))
    if layout.fan_in and layout.fan_out:
        found[t.path] = Usage(kind, layout)
