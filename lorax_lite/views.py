"""Named views of JAX equations: the one place that reads primitives' parameters.

Primitive parameters are not a stable API (jax 0.12 replaced scan's ``num_consts`` /
``num_carry`` with ``ft_in``/``ft_out``), so the jaxpr walkers read equations only through
the NamedTuple views here, which know every supported JAX's spelling; one they cannot read
raises `UnsupportedEquationError`. `regions` lists a higher-order equation's sub-jaxprs with
their operands, and `PASS_THROUGH` names the primitives that pass a weight on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core.primitives as prim


class UnsupportedEquationError(TypeError):
    """An equation whose parameters this version of lorax_lite cannot read."""


def _error(eqn: Any, why: str) -> UnsupportedEquationError:
    return UnsupportedEquationError(
        f"lorax_lite cannot read a '{eqn.primitive.name}' equation on jax {jax.__version__}: "
        f"{why}; parameters seen: {sorted(eqn.params)}. This JAX spells the primitive in a "
        "way lorax_lite does not know: please report it, with the JAX version."
    )


def _get(eqn: Any, *names: str) -> tuple[Any, ...]:
    missing = [n for n in names if n not in eqn.params]
    if missing:
        raise _error(eqn, f"expected parameters {list(names)}, missing {missing}")
    return tuple(eqn.params[n] for n in names)


# ----- higher-order primitives ------------------------------------------------------------

CALLS = frozenset({prim.jit_p, prim.closed_call_p})
"""The call primitives (``jit``, ``closed_call``)."""
_CUSTOM = (prim.custom_jvp_call_p, prim.custom_vjp_call_p)


class Call(NamedTuple):
    """A call (``jit``, ``closed_call``): ``body`` runs on every operand."""

    body: Any  # Jaxpr
    consts: Sequence[Any]


class Remat(NamedTuple):
    """``jax.checkpoint``: ``body`` (no consts) runs on every operand."""

    body: Any  # Jaxpr
    prevent_cse: bool
    policy: Any


class Custom(NamedTuple):
    """A ``custom_jvp``/``custom_vjp`` call: ``body`` runs on every operand, of which
    the leading ``n_closed`` are values the function closed over."""

    body: Any  # ClosedJaxpr
    n_closed: int
    vjp: bool


class Scan(NamedTuple):
    """``scan``: ``body`` maps ``(consts, carry, x slices)`` to ``(carry, y slices)``."""

    body: Any  # ClosedJaxpr
    n_consts: int
    n_carry: int
    length: int
    reverse: bool
    unroll: int | bool

    def split(self, operands: Sequence[Any]) -> tuple[list, list, list]:
        """The operands as ``(consts, initial carry, scanned inputs)``."""
        ops = list(operands)
        k, c = self.n_consts, self.n_consts + self.n_carry
        return ops[:k], ops[k:c], ops[c:]


class While(NamedTuple):
    """``while``: operands are ``(cond consts, body consts, carry)``."""

    cond: Any  # ClosedJaxpr: cond consts, carry -> bool
    body: Any  # ClosedJaxpr: body consts, carry -> carry
    cond_nconsts: int
    body_nconsts: int

    def split(self, operands: Sequence[Any]) -> tuple[list, list, list]:
        """The operands as ``(cond consts, body consts, initial carry)``."""
        ops = list(operands)
        k, c = self.cond_nconsts, self.cond_nconsts + self.body_nconsts
        return ops[:k], ops[k:c], ops[c:]


class Cond(NamedTuple):
    """``cond``/``switch``: operand 0 picks a branch, the rest go to every branch."""

    branches: tuple[Any, ...]  # ClosedJaxprs


def call(eqn: Any) -> Call:
    """The view of a call-like equation (``jit``/``closed_call``).

    ``jit``'s ``jaxpr`` is a closed jaxpr on jax 0.10, a jaxpr without constants on
    newer versions; ``closed_call`` holds a closed ``call_jaxpr``.
    """
    for name in ("jaxpr", "call_jaxpr"):
        if name in eqn.params:
            inner = eqn.params[name]
            return Call(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()))
    raise _error(eqn, "no 'jaxpr' or 'call_jaxpr' parameter")


def remat(eqn: Any) -> Remat:
    """The view of a ``jax.checkpoint`` equation."""
    body, prevent_cse, policy = _get(eqn, "jaxpr", "prevent_cse", "policy")
    return Remat(getattr(body, "jaxpr", body), prevent_cse, policy)


def custom(eqn: Any) -> Custom:
    """The view of a ``custom_jvp_call``/``custom_vjp_call`` equation."""
    body, n_closed = _get(eqn, "call_jaxpr", "num_consts")
    return Custom(body, n_closed, eqn.primitive is prim.custom_vjp_call_p)


def scan(eqn: Any) -> Scan:
    """The view of a ``scan`` equation, in either spelling.

    jax 0.10 counts ``num_consts`` and ``num_carry``; newer versions (0.11.2, 0.12)
    group the operands in a flat tree ``ft_in`` of three children (consts, carry,
    scanned inputs).
    """
    body, length, reverse, unroll = _get(eqn, "jaxpr", "length", "reverse", "unroll")
    if "num_consts" in eqn.params and "num_carry" in eqn.params:
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    elif "ft_in" in eqn.params:
        groups = _unpack(eqn, eqn.params["ft_in"], 3)
        n_consts, n_carry = len(groups[0]), len(groups[1])
    else:
        raise _error(eqn, "no operand counts ('num_consts'/'num_carry' or 'ft_in')")
    view = Scan(body, n_consts, n_carry, length, reverse, unroll)
    n_body = len(body.jaxpr.invars)
    if n_body != len(eqn.invars) or len(body.jaxpr.outvars) != len(eqn.outvars):
        raise _error(eqn, f"the body takes {n_body} values for {len(eqn.invars)} operands")
    return view


def _unpack(eqn: Any, tree: Any, n: int) -> tuple[Any, ...]:
    try:
        groups = tuple(tree.unpack())
    except AttributeError as e:
        raise _error(eqn, f"'ft_in' is a {type(tree).__name__}, not a flat tree") from e
    if len(groups) != n:
        raise _error(eqn, f"'ft_in' has {len(groups)} groups, expected {n}")
    return groups


def while_loop(eqn: Any) -> While:
    """The view of a ``while`` equation."""
    names = ("cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts")
    return While(*_get(eqn, *names))


def cond(eqn: Any) -> Cond:
    """The view of a ``cond`` equation."""
    (branches,) = _get(eqn, "branches")
    return Cond(tuple(branches))


class Region(NamedTuple):
    """A sub-jaxpr of an equation: ``operands[i]`` is the index of the equation
    operand bound to the jaxpr's ``i``-th input, and ``sliced[i]`` says whether the
    region sees one slice of it along its leading axis (a scanned input); ``consts``
    are the values of the jaxpr's constants."""

    jaxpr: Any  # Jaxpr
    operands: tuple[int, ...]
    sliced: tuple[bool, ...]
    consts: Sequence[Any] = ()

    def inputs(
        self, operands: Sequence[Any], slice_one: Callable[[Any], Any] | None = None
    ) -> list[Any]:
        """The values bound to the jaxpr's inputs, given the equation's operands (in
        a loop, their values at this step); ``slice_one``, if given, maps a scanned
        operand to what one step sees of it."""
        return [
            slice_one(operands[i]) if sliced and slice_one else operands[i]
            for i, sliced in zip(self.operands, self.sliced)
        ]


def regions(eqn: Any) -> list[Region] | None:
    """The sub-jaxprs an equation runs, or ``None`` for a first-order primitive.

    Raises:
        UnsupportedEquationError: a higher-order primitive lorax_lite does not know
            (a parameter holds a jaxpr), or one whose parameters it cannot read.
    """
    p, n = eqn.primitive, len(eqn.invars)

    def whole(body: Any, ops: Sequence[int]) -> Region:
        """A region run on the given operands as they are; ``body`` a (closed) jaxpr."""
        consts = getattr(body, "consts", ())
        return Region(getattr(body, "jaxpr", body), tuple(ops), (False,) * len(ops), consts)

    if p in CALLS:
        view = call(eqn)
        return [Region(view.body, tuple(range(n)), (False,) * n, view.consts)]
    if p is prim.remat_p:
        return [whole(remat(eqn).body, range(n))]
    if p in _CUSTOM:
        return [whole(custom(eqn).body, range(n))]
    if p is prim.scan_p:
        loop = scan(eqn)
        fixed = loop.n_consts + loop.n_carry
        sliced = tuple(i >= fixed for i in range(n))
        return [Region(loop.body.jaxpr, tuple(range(n)), sliced, loop.body.consts)]
    if p is prim.while_p:
        wl = while_loop(eqn)
        carry = range(wl.cond_nconsts + wl.body_nconsts, n)
        return [
            whole(wl.cond, [*range(wl.cond_nconsts), *carry]),
            whole(wl.body, range(wl.cond_nconsts, n)),
        ]
    if p is prim.cond_p:
        return [whole(b, range(1, n)) for b in cond(eqn).branches]
    if p.name == "shard_map":  # no public primitive object; the body sees per-shard blocks
        return [whole(_get(eqn, "jaxpr")[0], range(n))]
    if any(_holds_jaxpr(v) for v in eqn.params.values()):
        raise _error(eqn, "a higher-order primitive lorax_lite does not enter")
    return None


def body_regions(eqn: Any) -> list[Region]:
    """`regions` of an equation known to be higher-order.

    Raises:
        UnsupportedEquationError: if this JAX spells it without sub-jaxprs.
    """
    found = regions(eqn)
    if found is None:
        raise _error(eqn, "expected sub-jaxprs (a higher-order primitive)")
    return found


def _holds_jaxpr(value: Any) -> bool:
    values = value if isinstance(value, tuple | list) else (value,)
    return any(hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns") for v in values)


# ----- first-order primitives -------------------------------------------------------------


class Dot(NamedTuple):
    """``dot_general``: contracting and batch axes of each side, and the options."""

    contract: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    precision: Any
    preferred_element_type: Any


class Conv(NamedTuple):
    """``conv_general_dilated``: the kernel's axes (out, in, spatial...), the output's
    feature axis, and whether the convolution is grouped."""

    kernel_spec: tuple[int, ...]
    out_feature: int
    grouped: bool


class Gather(NamedTuple):
    """``gather``: its dimension numbers, slice sizes and out-of-bounds handling."""

    dimension_numbers: Any
    slice_sizes: tuple[int, ...]
    mode: Any
    fill_value: Any
    indices_are_sorted: bool
    unique_indices: bool


class Slice(NamedTuple):
    """``slice`` (``sizes`` is None) or ``dynamic_slice`` (``start``... are None)."""

    start: tuple[int, ...] | None
    limit: tuple[int, ...] | None
    strides: tuple[int, ...] | None
    sizes: tuple[int, ...] | None


RAGGED_DOT = "ragged_dot_general"
"""The name of the primitive ``lax.ragged_dot`` and ``lax.ragged_dot_general`` bind (no
public primitive object in any supported JAX)."""


PASS_THROUGH = frozenset(
    {
        prim.convert_element_type_p.name,
        prim.copy_p.name,
        prim.device_put_p.name,
        prim.reduce_precision_p.name,
        prim.sharding_constraint_p.name,
        "stop_gradient",  # no public primitive object
        "pvary",  # varying over shard_map axes; no public primitive object
    }
)
"""The names of the primitives that pass a weight through unchanged up to its dtype,
precision, placement or differentiability."""


class RaggedDot(NamedTuple):
    """``ragged_dot_general``: a `Dot`'s axes, the ragged axes of the left operand and
    the group (expert) axes of the right one; ``group_offset`` is None unless given."""

    dot: Dot
    lhs_ragged: tuple[int, ...]
    rhs_group: tuple[int, ...]
    group_offset: Any


def ragged_dot(eqn: Any) -> RaggedDot:
    """The view of a ``ragged_dot_general`` equation."""
    (dims,) = _get(eqn, "ragged_dot_dimension_numbers")
    try:
        dot = _dot(eqn, dims.dot_dimension_numbers)
        lhs_ragged, rhs_group = dims.lhs_ragged_dimensions, dims.rhs_group_dimensions
    except (AttributeError, TypeError, ValueError) as e:
        raise _error(eqn, f"unreadable ragged_dot_dimension_numbers {dims!r}") from e
    return RaggedDot(dot, tuple(lhs_ragged), tuple(rhs_group), eqn.params.get("group_offset"))


def dot(eqn: Any) -> Dot:
    """The view of a ``dot_general`` equation."""
    return _dot(eqn, _get(eqn, "dimension_numbers")[0])


def _dot(eqn: Any, dimension_numbers: Any) -> Dot:
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    return Dot(
        (tuple(contract_l), tuple(contract_r)),
        (tuple(batch_l), tuple(batch_r)),
        eqn.params.get("precision"),
        eqn.params.get("preferred_element_type"),
    )


def conv(eqn: Any) -> Conv:
    """The view of a ``conv_general_dilated`` equation."""
    dims, features, batches = _get(
        eqn, "dimension_numbers", "feature_group_count", "batch_group_count"
    )
    return Conv(tuple(dims.rhs_spec), dims.out_spec[1], features != 1 or batches != 1)


def gather(eqn: Any) -> Gather:
    """The view of a ``gather`` equation."""
    names = ("dimension_numbers", "slice_sizes", "mode", "fill_value")
    dims, sizes, mode, fill = _get(eqn, *names)
    sorted_, unique = (eqn.params.get(k, False) for k in ("indices_are_sorted", "unique_indices"))
    return Gather(dims, tuple(sizes), mode, fill, sorted_, unique)


def slicing(eqn: Any) -> Slice:
    """The view of a ``slice`` or ``dynamic_slice`` equation."""
    if eqn.primitive is prim.dynamic_slice_p:
        (sizes,) = _get(eqn, "slice_sizes")
        return Slice(None, None, None, tuple(sizes))
    start, limit, strides = _get(eqn, "start_indices", "limit_indices", "strides")
    return Slice(tuple(start), tuple(limit), strides and tuple(strides), None)


def permutation(eqn: Any) -> tuple[int, ...]:
    """The axis order of a ``transpose`` equation."""
    return tuple(_get(eqn, "permutation")[0])


def dimensions(eqn: Any) -> tuple[int, ...]:
    """The axes a ``squeeze`` removes or a ``rev`` reverses."""
    return tuple(_get(eqn, "dimensions")[0])


def new_dtype(eqn: Any) -> Any:
    """The target dtype of a ``convert_element_type`` equation."""
    return _get(eqn, "new_dtype")[0]


class Reshape(NamedTuple):
    """``reshape``: the new shape; ``dimensions`` (a transpose first) is None or empty."""

    new_sizes: tuple[int, ...]
    dimensions: tuple[int, ...] | None


def reshape(eqn: Any) -> Reshape:
    """The view of a ``reshape`` equation."""
    (new_sizes,) = _get(eqn, "new_sizes")
    dims = eqn.params.get("dimensions")
    return Reshape(tuple(new_sizes), None if dims is None else tuple(dims))


class Broadcast(NamedTuple):
    """``broadcast_in_dim``: the output shape and where each operand axis goes."""

    shape: tuple[int, ...]
    kept: tuple[int, ...]


def broadcast(eqn: Any) -> Broadcast:
    """The view of a ``broadcast_in_dim`` equation."""
    shape, kept = _get(eqn, "shape", "broadcast_dimensions")
    return Broadcast(tuple(shape), tuple(kept))


class Split(NamedTuple):
    """``split``: the axis and the sizes of the pieces."""

    axis: int
    sizes: tuple[int, ...]


def split(eqn: Any) -> Split:
    """The view of a ``split`` equation."""
    axis, sizes = _get(eqn, "axis", "sizes")
    return Split(axis, tuple(sizes))


def bind(eqn: Any, operands: Sequence[Any]) -> Any:
    """Binds ``eqn``'s primitive with its own parameters to other operands."""
    return eqn.primitive.bind(*operands, **eqn.primitive.get_bind_params(eqn.params))


def bind_results(eqn: Any, operands: Sequence[Any]) -> list[Any]:
    """`bind`'s results as a list, whether the primitive has one result or several."""
    out = bind(eqn, operands)
    return list(out) if eqn.primitive.multiple_results else [out]
