"""Adapter slots for serving: a fixed number of adapters, swapped without recompiling.

`AdapterSlots` holds ``capacity`` adapters of one frozen base in tables of fixed
shapes (every factor zero-padded to one capacity rank, every scale an array entry), so a
compiled step over it (`ll.route`) runs whatever the slots hold: `load` and `remove`
write one slot's rows in place and change no shape, dtype or static field, so the
step's compiled program is reused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import is_int, raise_problems
from .stacking import base_mismatch, flat_nodes
from .trees import base_leaf
from .weight import Gathered, LoraWeight, Trainable, column_norm, factored_squares, stored_value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSlots:
    """``capacity`` adapter slots over one shared frozen base, for `ll.route`.

    Slot ``i`` holds one adapter's factors, zero-padded to the set's rank (zero columns
    of ``A``, zero rows of ``B``: the delta is unchanged), and its scale; an empty slot
    holds zeros (the base model). Ids ``-1`` run the base model. Every field is an
    array of a fixed shape (one more row than ``capacity``: the base model's), so `load`
    and `remove` return a set with the same pytree structure, shapes and dtypes, and a
    jitted step compiled for one set runs every other without recompiling.

    What padding costs: every sequence's adapter path runs at the set's rank, so an
    adapter of rank ``r`` in a set of rank ``R`` reads and multiplies ``R / r`` times its
    own factors (``R * (fan_in + fan_out)`` elements and ``2 * R * (fan_in + fan_out)``
    flops per token per adapted weight, whatever ``r``).

    A DoRA set (``dora=True``) holds each slot's magnitude too; a plain LoRA adapter
    loaded there gets the magnitude that makes its DoRA ratio one, so it runs as LoRA.
    Every sequence of a DoRA set computes its norm ``||w + scale A B||`` from the factors
    at each call (``A^T w`` per sequence: about ``R`` times one token's base product), so
    make a set DoRA only to serve DoRA adapters.

    Attributes:
        frozen: the shared base: ``LoraWeight(w, None, None)`` at the slot leaves (float
            or `ll.quantize`'d ``w``), other leaves as they are.
        stacked: at the slot leaves, ``LoraWeight(None, a, b, m=m)`` with ``a`` of shape
            ``(capacity + 1, *A.shape)`` at the set's rank (``m`` with DoRA only); row
            ``capacity`` is the base model's (zeros; DoRA: the base's norms).
        scales: one ``(capacity + 1,)`` float32 array per slot leaf (in ``flat_nodes``
            order): each slot's adapter scale, 0 for an empty slot.

    Example:
        >>> slots = AdapterSlots.create(lora_tree, capacity=16, rank=16)  # doctest: +SKIP
        >>> slots = slots.load(3, tree_code)                              # doctest: +SKIP
        >>> logits = jax.jit(ll.route(model.apply))(slots, ids, tokens)   # doctest: +SKIP
    """

    frozen: Any
    stacked: Any
    scales: tuple[jax.Array, ...]

    @classmethod
    def create(cls, template: Any, *, capacity: int, rank: int, dora: bool = False) -> AdapterSlots:
        """Empty slots for adapters shaped like ``template``'s.

        Args:
            template: a LoRA tree (e.g. from `ll.init`): its `LoraWeight` leaves become the
                slot leaves (their layouts and factor dtype), its base weights (float or
                quantized) the shared base. Its own factors are not loaded.
            capacity: the number of slots.
            rank: the largest adapter rank the slots take (every factor is padded to it).
            dora: whether slots hold DoRA magnitudes (plain LoRA adapters load too).

        Returns:
            The set, every slot empty.

        Raises:
            ValueError: a capacity or rank that is not a positive integer, a template
                without LoRA weights or base weights, or with leaves trained in full
                (merge those into the base: slots hold factors only).
        """
        problems = [
            f"{name} must be an integer >= 1, got {value!r}"
            for name, value in (("capacity", capacity), ("rank", rank))
            if not is_int(value, 1)
        ]
        paths, nodes, treedef = flat_nodes(template)
        loras = [(p, x) for p, x in zip(paths, nodes) if isinstance(x, LoraWeight)]
        if not loras:
            problems.append("template has no LoraWeight leaves (make it with ll.init)")
        problems += [
            f"{p}: no base weight (pass a full LoRA tree)" for p, x in loras if x.w is None
        ]
        problems += [
            f"{p}: trained in full; slots hold adapter factors only (merge it into the base)"
            for p, x in zip(paths, nodes)
            if isinstance(x, Trainable)
        ]
        raise_problems("AdapterSlots.create", problems)
        frozen: list[Any] = []
        stacked: list[LoraWeight | None] = []
        scales: list[jax.Array] = []
        for node in nodes:
            if not isinstance(node, LoraWeight):
                frozen.append(node)
                stacked.append(None)
                continue
            meta: dict[str, Any] = dict(layout=node.layout, dora=dora)
            frozen.append(LoraWeight(node.w, None, None, **meta))
            a_shape, b_shape = node.layout.factor_shapes(tuple(node.w.shape), rank)
            dtype = node.a.dtype
            m = None
            if dora:
                norm = column_norm(stored_value(node.w), node.layout)
                m = jnp.broadcast_to(norm, (capacity + 1, *norm.shape))
            a, b = (jnp.zeros((capacity + 1, *s), dtype) for s in (a_shape, b_shape))
            stacked.append(LoraWeight(None, a, b, m=m, **meta))
            scales.append(jnp.zeros((capacity + 1,), jnp.float32))
        unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
        return cls(unflatten(frozen), unflatten(stacked), tuple(scales))

    @property
    def capacity(self) -> int:
        """The number of slots."""
        return self.scales[0].shape[0] - 1

    @property
    def rank(self) -> int:
        """The rank every slot's factors are padded to."""
        return next(x.a.shape[-1] for x in self._stacked_loras())

    @property
    def dora(self) -> bool:
        """Whether the slots hold DoRA magnitudes."""
        return next(x.dora for x in self._stacked_loras())

    def __len__(self) -> int:
        return self.capacity

    def _stacked_loras(self) -> list[LoraWeight]:
        return [x for x in flat_nodes(self.stacked)[1] if isinstance(x, LoraWeight)]

    def load(self, slot: int, tree: Any) -> AdapterSlots:
        """A set with ``tree``'s adapter in ``slot`` (replacing what was there).

        Only the adapter's rows are written (a jitted, donated in-place update): this
        set's tables are donated and must not be used again; use the returned set.

        Args:
            slot: the slot, in ``[0, capacity)``.
            tree: a LoRA tree of the same base (a full tree, whose base weights are
                compared with the set's by ``content_hash``, or its trainable partition,
                checked by shapes only); it may adapt some of the slot leaves only.

        Returns:
            The new set, of the same structure, shapes and dtypes.

        Raises:
            IndexError: for a slot outside ``[0, capacity)``.
            ValueError: naming every leaf whose structure, layout, factor shapes or base
                weight differ from the set's, whose rank is above the set's, or that is
                DoRA in a set made without ``dora=True`` or trained in full.
        """
        self._check_slot(slot)
        rows = self._rows(tree)
        stacked, scales = _write(self.stacked, self.scales, jnp.int32(slot), rows)
        return dataclasses.replace(self, stacked=stacked, scales=scales)

    def remove(self, slot: int) -> AdapterSlots:
        """A set with ``slot`` emptied (zero factors: its ids run the base model).

        Like `load`, donates this set's tables.

        Raises:
            IndexError: for a slot outside ``[0, capacity)``.
        """
        self._check_slot(slot)
        base_row = jnp.int32(self.capacity)
        rows = jax.tree_util.tree_map(lambda t: t[base_row], (self._factor_tables(), self.scales))
        stacked, scales = _write(self.stacked, self.scales, jnp.int32(slot), rows)
        return dataclasses.replace(self, stacked=stacked, scales=scales)

    def per_example(self, adapter_ids: jax.Array) -> tuple[Any, Any]:
        """Each example's slot as one LoRA tree to map over, and its ``jax.vmap`` axes.

        The factors stay ``Gathered`` (gathered where `ll.lora` uses them); ``-1`` reads the
        base model's row; an id outside ``[-1, capacity)`` gives its example NaN factors.
        """
        ids = jnp.asarray(adapter_ids, jnp.int32)
        cap = self.capacity
        row = jnp.where(ids == -1, cap, jnp.clip(ids, 0, cap - 1))
        keep = (ids >= -1) & (ids < cap)
        fill = jnp.full(ids.shape, jnp.nan, jnp.float32)
        scales = iter(self.scales)

        def pick(node, base):
            if not isinstance(node, LoraWeight):
                return base, None
            gain = next(scales)[row]
            a, b = Gathered(node.a, row), Gathered(node.b, row, gain, keep, fill)
            m = node.m[row] if node.dora else None
            tree = dataclasses.replace(base, a=a, b=b, m=m)
            # vmap's in_axes: Gathered trees of axes, where its fields are annotated arrays.
            a_axes = Gathered(None, 0)  # type: ignore[arg-type]
            b_axes = Gathered(None, 0, 0, 0, 0)  # type: ignore[arg-type]
            axes = dataclasses.replace(node, a=a_axes, b=b_axes, m=0 if node.dora else None)
            return tree, axes

        _, nodes, treedef = flat_nodes(self.stacked)
        picked = [pick(n, b) for n, b in zip(nodes, flat_nodes(self.frozen)[1])]
        unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
        return unflatten([t for t, _ in picked]), unflatten([x for _, x in picked])

    def _factor_tables(self) -> list[tuple[jax.Array, ...]]:
        return [(x.a, x.b) + ((x.m,) if x.dora else ()) for x in self._stacked_loras()]

    def _check_slot(self, slot: Any) -> None:
        if not is_int(slot, 0) or slot >= self.capacity:
            raise IndexError(f"slot {slot!r} outside [0, {self.capacity})")

    def _rows(
        self, tree: Any
    ) -> tuple[list[tuple[jax.Array | np.ndarray, ...]], tuple[jax.Array, ...]]:
        """``tree``'s rows for one slot (factors padded to the set's rank, magnitudes,
        scales), checked against the set."""
        paths, nodes, _ = flat_nodes(tree)
        base_paths, base_nodes, _ = flat_nodes(self.frozen)
        if paths != base_paths:
            extra, missing = (
                sorted(set(paths) - set(base_paths)),
                sorted(set(base_paths) - set(paths)),
            )
            raise_problems(
                "AdapterSlots.load: the adapter's tree differs from the set's",
                [f"not in the set: {extra}", f"missing: {missing}"],
            )
        stacked = flat_nodes(self.stacked)[1]
        problems, factors, scales = [], [], []
        for path, node, base, table in zip(paths, nodes, base_nodes, stacked):
            if isinstance(node, Trainable):
                problems.append(f"{path}: trained in full; slots hold adapter factors only")
                continue
            weight = base_leaf(node)  # None in a partition: checked by shapes only
            why = None if weight is None else base_mismatch(weight, base_leaf(base))
            if why:
                problems.append(f"{path}: another base weight than the set's ({why})")
            if not isinstance(table, LoraWeight):
                if isinstance(node, LoraWeight):
                    problems.append(f"{path}: adapted, but not a slot leaf of the set")
                continue
            row, scale, row_problems = _slot_row(path, node, base, table)
            problems += row_problems
            factors.append(row)
            scales.append(jnp.float32(scale))
        raise_problems("AdapterSlots.load: the adapter does not fit the set", problems)
        return factors, tuple(scales)


def _slot_row(
    path: str, node: Any, base: LoraWeight, table: LoraWeight
) -> tuple[tuple[jax.Array | np.ndarray, ...], float, list[str]]:
    """One slot leaf's row (``a``, ``b``, DoRA's ``m``), its scale, and what is wrong."""
    rank, layout = table.a.shape[-1], table.layout
    a_full, b_full = table.a.shape[1:], table.b.shape[1:]
    if not isinstance(node, LoraWeight):  # not adapted here: zeros, the base's norms
        zeros = (jnp.zeros(a_full, table.a.dtype), jnp.zeros(b_full, table.b.dtype))
        m = (table.m[-1],) if table.dora else ()
        return zeros + m, 0.0, []
    problems = []
    if node.layout != layout:
        problems.append(f"{path}: layout {node.layout} differs from the set's {layout}")
    elif node.rank > rank:
        problems.append(f"{path}: rank {node.rank} above the set's rank {rank}")
    elif node.layout.factor_shapes(tuple(base.w.shape), node.rank) != (
        tuple(node.a.shape),
        tuple(node.b.shape),
    ):
        got = (tuple(node.a.shape), tuple(node.b.shape))
        problems.append(f"{path}: factor shapes {got} do not fit the base weight {base.w.shape}")
    if node.dora and not table.dora:
        problems.append(f"{path}: a DoRA adapter; make the set with dora=True")
    if problems:
        return (), 0.0, problems
    pad = rank - node.rank
    a: jax.Array | np.ndarray = jnp.asarray(node.a, table.a.dtype)
    b: jax.Array | np.ndarray = jnp.asarray(node.b, table.b.dtype)
    if pad:  # on the host: no program per rank
        a = np.pad(np.asarray(a), [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        widths = [(0, 0)] * b.ndim
        widths[len(layout.stack)] = (0, pad)
        b = np.pad(np.asarray(b), widths)
    row: tuple[jax.Array | np.ndarray, ...] = (a, b)
    if table.dora:
        m = node.m if node.dora else _unit_magnitude(base.w, node.a, node.b, node.scale, layout)
        row += (jnp.asarray(m, jnp.float32),)
    return row, float(node.scale), []


@functools.partial(jax.jit, static_argnums=(4,))  # scale traced: no compile per value
def _unit_magnitude(w: Any, a: jax.Array, b: jax.Array, scale: float, layout: Any) -> jax.Array:
    """The DoRA magnitude ``||w + scale A B||`` that makes a plain adapter's ratio one."""
    return jnp.sqrt(factored_squares(stored_value(w), a, b, scale, layout))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write(stacked: Any, scales: tuple, slot: jax.Array, rows: tuple) -> tuple[Any, tuple]:
    """``stacked`` and ``scales`` with ``rows`` written at ``slot`` (in place: donated)."""
    factor_rows, scale_rows = rows
    _, nodes, treedef = flat_nodes(stacked)
    rows_iter = iter(factor_rows)
    out = []
    for node in nodes:
        if not isinstance(node, LoraWeight):
            out.append(node)
            continue
        row = next(rows_iter)
        a, b = node.a.at[slot].set(row[0]), node.b.at[slot].set(row[1])
        m = node.m.at[slot].set(row[2]) if node.dora else None
        out.append(dataclasses.replace(node, a=a, b=b, m=m))
    new_scales = tuple(s.at[slot].set(r) for s, r in zip(scales, scale_rows))
    return jax.tree_util.tree_unflatten(treedef, out), new_scales
