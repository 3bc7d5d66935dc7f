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

# Primitives that pass a weight through unchanged (up to dtype or placement).
PASS_THROUGH = frozenset(
    {
        prim.convert_element_type_p,
        prim.copy_p,
        prim.sharding_constraint_p,
        prim.reduce_precision_p,
        prim.device_put_p,
    }
)


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
        values = iter(values)
        merged = [next(values) if arr else x for x, arr in zip(leaves, arrays)]
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
        p, first = eqn.primitive, tracked[0]
        if p in PASS_THROUGH or (p in (prim.slice_p, prim.dynamic_slice_p) and first):
            env[eqn.outvars[0]] = first
        elif p is prim.squeeze_p and first:
            # Indexing one entry of an axis (``w[i]``) makes that axis a stack of weights.
            gone = {d % len(first.axes) for d in views.dimensions(eqn)}
            kept = tuple(ax for i, ax in enumerate(first.axes) if i not in gone)
            stack = first.stack + tuple(first.axes[i] for i in sorted(gone))
            env[eqn.outvars[0]] = first._replace(axes=kept, stack=stack)
        elif p is prim.transpose_p and first:
            axes = tuple(first.axes[i] for i in views.permutation(eqn))
            env[eqn.outvars[0]] = first._replace(axes=axes)
        elif p is prim.dot_general_p:
            dot = views.dot(eqn)
            for t, contract, batch in zip(tracked, dot.contract, dot.batch):
                if t:
                    roles = {
                        ax: "in" if ax in contract else "stack" if ax in batch else "out"
                        for ax in range(len(t.axes))
                    }
                    _record(found, t, "dot", roles)
        elif p.name == views.RAGGED_DOT and len(tracked) > 1 and tracked[1]:
            ragged = views.ragged_dot(eqn)
            contract, batch = ragged.dot.contract[1], ragged.dot.batch[1]
            stacked = set(batch) | set(ragged.rhs_group)
            roles = {
                ax: "in" if ax in contract else "stack" if ax in stacked else "out"
                for ax in range(len(tracked[1].axes))
            }
            _record(found, tracked[1], "dot", roles)
        elif p is prim.conv_general_dilated_p and tracked[1]:
            out_axis = views.conv(eqn).kernel_spec[0]
            roles = {ax: "out" if ax == out_axis else "in" for ax in range(len(tracked[1].axes))}
            _record(found, tracked[1], "conv", roles)
        elif p is prim.gather_p and first:
            indexed = views.gather(eqn).dimension_numbers.start_index_map
            roles = {ax: "in" if ax in indexed else "out" for ax in range(len(first.axes))}
            _record(found, first, "gather", roles)
        else:
            for region in views.regions(eqn) or ():
                inner = region.inputs(tracked, slice_one=_sliced)
                _walk(region.jaxpr, _bind(region.jaxpr.invars, inner), found)


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
