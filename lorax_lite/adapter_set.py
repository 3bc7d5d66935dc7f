"""Stacked adapter storage: many adapters of one frozen base in one `AdapterSet`.

`AdapterSet` stores the adapters of one base stacked on a leading adapter axis, so that
choosing one under ``jax.jit`` is an index, not a new program. Building a set aligns the
adapters leaf by leaf (zero-padding ranks where they differ) and checks that they were all
made from the same base.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .checks import raise_problems
from .deprecation import renamed_keywords
from .stacking import flat_nodes, stack
from .targets import path_str
from .trees import base_of
from .weight import Gathered, LoraWeight, Trainable, is_hole_or_node


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters of one frozen base, stacked on a leading adapter axis.

    Immutable: `add` and `remove` return new sets. Adapter ``i`` is ``names[i]``;
    index ``-1`` is the base model (no adapter). Where adapters differ in rank at a
    leaf, their factors are zero-padded to the largest rank (zero columns of ``A``,
    zero rows of ``B``: the delta is unchanged), with a warning and a record in
    `padding`; an adapter that does not adapt a leaf others adapt gets zero factors
    there. Where their scales differ, the set keeps each adapter's own scale and
    applies it on selection. A set is a pytree: pass it to a jitted function and
    select with an index array, and switching adapters of the same shapes does not
    recompile. The base may be quantized (`ll.quantize`): each `QuantizedWeight` is one
    shared frozen leaf, kept quantized, and the adapters' bases are compared by its
    kind, block and stored arrays.

    Attributes:
        frozen: the shared base: ``LoraWeight(w, None, None)`` at adapted leaves,
            ``Trainable(base value or None)`` at leaves trained in full, other
            leaves as they are.
        stacked: every adapter's trainable partition stacked on a leading axis:
            ``LoraWeight(None, a, b)`` with ``a`` of shape ``(n, *A.shape)``,
            ``Trainable(values)``, ``None`` holes elsewhere.
        names: the adapter names, in stacking order.
        ranks: ``ranks[i][k]``: adapter ``i``'s rank at the ``k``-th adapted leaf of
            `lora_paths` (``0``: not adapted there).
        scales: ``scales[i][k]``: its scale there.

    Example:
        >>> adapters = AdapterSet.from_trees({"math": tree_math, "code": tree_code})
        ...                                                       # doctest: +SKIP
        >>> y = ll.lora(fn)(adapters.select("code"), x)  # doctest: +SKIP
    """

    frozen: Any
    stacked: Any
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    ranks: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
    scales: tuple[tuple[float, ...], ...] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_trees(cls, adapters: Mapping[str, Any], *, base: Any = None) -> AdapterSet:
        """A set of LoRA trees made from one base (e.g. by `ll.init` with any configs).

        Args:
            adapters: ``{name: tree}``; each tree is a full LoRA tree or its trainable
                partition, all with the same structure (they may adapt different
                leaves, with different ranks and scales, but the same layouts).
            base: the plain parameter tree the adapters were made from. Needed when
                every tree is a partition (no base weights), and to know the base values
                of leaves trained in full (for the base model, ``-1``, and combinations);
                otherwise the base weights are taken from the first tree that has them.
                Over a quantized base (`ll.quantize`), ``base`` may hold the float
                weights: each is quantized like the adapters' and must give the same
                codes and scales (the set keeps the adapters' `QuantizedWeight`).

        Returns:
            The set, adapters in the mapping's order.

        Raises:
            TypeError: naming every adapter name that is not a string.
            ValueError: naming every problem: no adapters, structures that differ,
                layouts or shapes that disagree, leaves trained in full in some
                adapters only, base weights missing or different (another shape,
                dtype, quantization or content).
        """
        if not adapters:
            raise ValueError("AdapterSet.from_trees: no adapters given")
        out = AdapterSet(*stack(list(adapters.items()), base))
        _warn_padding(out.padding, {})
        return out

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lora_paths(self) -> tuple[str, ...]:
        """The paths of the adapted leaves, in the order of `ranks` and `scales`."""
        paths, nodes, _ = flat_nodes(self.frozen)
        return tuple(p for p, x in zip(paths, nodes) if isinstance(x, LoraWeight))

    @property
    def padding(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{name: {path: (rank, stacked rank)}}`` for every leaf padded with zeros."""
        paths, stacked_ranks = self.lora_paths, _stacked_ranks(self.stacked)
        out = {}
        for name, ranks in zip(self.names, self.ranks):
            padded = {p: (r, full) for p, r, full in zip(paths, ranks, stacked_ranks) if r < full}
            if padded:
                out[name] = padded
        return out

    def index(self, name: str) -> int:
        """The stacking index of adapter ``name``.

        Raises:
            KeyError: for an unknown name, listing the known ones.
        """
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r}; the set holds {list(self.names)}")
        return self.names.index(name)

    @renamed_keywords(which="adapter_id")
    def select(self, adapter_id: str | int | jax.Array) -> Any:
        """One adapter as a full LoRA tree (padded rank, set scale), for `ll.lora(fn)`.

        Args:
            adapter_id: a name, or an integer index (a Python int or an integer array, e.g.
                traced under ``jax.jit``); ``-1`` selects the base model (zero adapter
                delta). A traced index cannot be checked: one outside ``[-1, len(self))``
                gives NaN factors, so the outputs it touches are NaN, never another
                adapter's. (``which=`` before: warns ``DeprecationWarning``.)

        Returns:
            A LoRA tree with the structure of ``combine(stacked, frozen)`` minus the
            adapter axis: every index gives the same shapes, so a jitted function of
            the set and an index array compiles once.

        Raises:
            KeyError: for an unknown name.
            IndexError: for a concrete index outside ``[-1, len(self))``.
            TypeError: for an index that is not an integer scalar.
            ValueError: for ``-1`` when the base values of leaves trained in full
                are unknown (pass ``base=`` to `from_trees`).
        """
        index = (
            self.index(adapter_id)
            if isinstance(adapter_id, str)
            else _as_index(adapter_id, len(self))
        )
        return self._pick(index)[0]

    @renamed_keywords(ids="adapter_ids")
    def per_example(self, adapter_ids: jax.Array) -> tuple[Any, Any]:
        """Each example's adapter as one LoRA tree to map over, and its ``jax.vmap`` axes.

        What `ll.route` maps the model over: the factors are ``Gathered`` (each example's
        adapter index into the shared stacks), gathered where `ll.lora` uses them, so a
        scan over layers gathers one layer per step; the values of leaves trained in
        full are gathered here, examples on axis 0; the base is shared.

        Args:
            adapter_ids: an integer vector, one adapter index per example (``-1``: the base
                model). A traced id cannot be checked: as for `select`, one outside
                ``[-1, len(self))`` gives its example NaN factors. (``ids=`` before: warns
                ``DeprecationWarning``.)

        Returns:
            ``(tree, in_axes)``: ``jax.vmap(ll.lora(f), in_axes=(in_axes, ...))(tree,
            ...)`` runs ``f`` with ``select(adapter_ids[i])``'s tree for example ``i``.

        Raises:
            ValueError: for ``-1`` among the ids when the base values of leaves trained
                in full are unknown (pass ``base=`` to `from_trees`).
        """
        return self._pick(jnp.asarray(adapter_ids), examples=True)

    def _pick(self, index: int | jax.Array, *, examples: bool = False) -> tuple[Any, Any]:
        """The LoRA tree of adapter ``index`` (``-1``: zero delta, base values), and each
        leaf's ``jax.vmap`` axes (``None`` unless ``examples``; the base's always).

        With ``examples``, ``index`` is a vector of per-example ids, the factors stay
        ``Gathered`` and the other leaves get the examples on axis 0 (see `per_example`).
        """
        always = isinstance(index, int) and index >= 0
        ok: bool | jax.Array
        fill: float | jax.Array
        if isinstance(index, int):
            ok, fill = index >= 0, 0.0
        else:  # traced: -1 gives the base, anything else outside the set NaN
            ok = (index >= 0) & (index < len(self))
            fill = jnp.where(index == -1, 0.0, jnp.nan)
        j = index if always else jnp.clip(index, 0, len(self) - 1)
        keep, fill_or_none = (None, None) if always else (ok, fill)
        axis = 0 if examples else None
        gains = iter(self._gains())
        missing = []

        def spread(v, like):
            """A per-example vector ``v`` shaped to broadcast against ``like``."""
            return jnp.reshape(v, (-1,) + (1,) * (like.ndim - 1)) if examples else v

        def pick(path, node, base):
            if isinstance(node, LoraWeight):
                gain = next(gains)
                gain = None if gain is None else jnp.asarray(gain)[j]
                # Gathered's fields are annotated arrays; here a Python int index, bool
                # keep and float fill too (a fixed id), and vmap's axes below.
                a = Gathered(node.a, j)  # type: ignore[arg-type]
                b = Gathered(node.b, j, gain, keep, fill_or_none)  # type: ignore[arg-type]
                if not examples:
                    return _Pair(dataclasses.replace(base, a=a.resolve(), b=b.resolve()), None)
                mapped = lambda x: None if x is None else axis
                a_axes = Gathered(None, axis)  # type: ignore[arg-type]
                rest = [mapped(x) for x in (gain, keep, fill_or_none)]
                b_axes = Gathered(None, axis, *rest)  # type: ignore[arg-type]
                axes = dataclasses.replace(node, a=a_axes, b=b_axes)
                return _Pair(dataclasses.replace(base, a=a, b=b), axes)
            if isinstance(node, Trainable):
                value = node.value[j]
                if not always:
                    if base.value is None:
                        missing.append(path_str(path))
                    else:
                        value = jnp.where(spread(index == -1, value), base.value, value)
                        kept = spread(ok | (index == -1), value)
                        value = jnp.where(kept, value, spread(fill, value)).astype(value.dtype)
                return _Pair(Trainable(value), Trainable(axis))
            return _Pair(base, None)

        pairs = jax.tree_util.tree_map_with_path(
            pick, self.stacked, self.frozen, is_leaf=is_hole_or_node
        )
        if missing:
            raise ValueError(
                "the base model (index -1) needs the base values of leaves trained in full, "
                f"unknown for {missing}; pass base=params to AdapterSet.from_trees"
            )
        is_pair = lambda x: isinstance(x, _Pair)
        part = lambda k: jax.tree_util.tree_map(lambda p: p[k], pairs, is_leaf=is_pair)
        return part(0), part(1)

    def _gains(self) -> list[np.ndarray | None]:
        """Per adapted leaf, each adapter's scale over the set's (None where all are 1)."""
        leaves = jax.tree_util.tree_leaves(self.frozen, is_leaf=is_hole_or_node)
        set_scales = [x.scale for x in leaves if isinstance(x, LoraWeight)]
        gains = []
        for k, set_scale in enumerate(set_scales):
            gain = np.array([s[k] / set_scale for s in self.scales], np.float32)
            gains.append(None if (gain == 1.0).all() else gain)
        return gains

    def get(self, name: str) -> Any:
        """Adapter ``name`` as it was added: its own ranks and scales, a full LoRA tree.

        Leaves it did not adapt are plain base weights again; the dropout rate is
        the set's (the first adapter's at each leaf).
        """
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(self.frozen, is_leaf=is_hole_or_node),
            self._adapter_nodes(self.index(name)),
        )

    def _adapter_nodes(self, i: int) -> list[Any]:
        _, stacked, _ = flat_nodes(self.stacked)
        _, frozen, _ = flat_nodes(self.frozen)
        lora_k, out = 0, []
        for node, base in zip(stacked, frozen):
            if isinstance(node, LoraWeight):
                rank, scale = self.ranks[i][lora_k], self.scales[i][lora_k]
                lora_k += 1
                if rank == 0:
                    out.append(base.w)
                    continue
                a, b = adapter_factors(node, i, rank)
                out.append(
                    LoraWeight(
                        base.w,
                        a,
                        b,
                        scale,
                        node.layout,
                        node.dropout,
                        residual_init=node.residual_init,
                    )
                )
            elif isinstance(node, Trainable):
                out.append(Trainable(node.value[i]))
            else:
                out.append(base)
        return out

    def base(self) -> Any:
        """The plain base parameter tree (every adapter disabled), for ``fn`` itself.

        Raises:
            ValueError: when the base values of leaves trained in full are unknown.
        """
        paths, nodes, _ = flat_nodes(self.frozen)
        missing = [p for p, x in zip(paths, nodes) if isinstance(x, Trainable) and x.value is None]
        if missing:
            raise ValueError(
                f"the base values of leaves trained in full are unknown: {missing}; "
                "pass base=params to AdapterSet.from_trees"
            )
        return self._base_tree()

    def add(self, name: str, tree: Any) -> AdapterSet:
        """A new set with ``tree`` (a LoRA tree or trainable partition) added as ``name``.

        Raises:
            TypeError, ValueError: if ``name`` is taken, or as `from_trees`.
        """
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already in the set")
        entries = [(n, self.get(n)) for n in self.names] + [(name, tree)]
        out = AdapterSet(*stack(entries, self._base_tree()))
        _warn_padding(out.padding, self.padding)
        return out

    def remove(self, name: str) -> AdapterSet:
        """A new set without adapter ``name`` (ranks re-padded to the remaining maximum).

        Raises:
            KeyError: for an unknown name.
            ValueError: when removing the last adapter (use `base` for the base model).
        """
        self.index(name)
        if len(self) == 1:
            raise ValueError(f"cannot remove {name!r}, the only adapter; use .base()")
        entries = [(n, self.get(n)) for n in self.names if n != name]
        return AdapterSet(*stack(entries, self._base_tree()))

    def with_trainable(self, stacked: Any) -> AdapterSet:
        """The same set with new stacked factors, e.g. ``state.trainable`` after training.

        Raises:
            ValueError: if the structure or any shape differs from `stacked`'s.
        """
        old, new = jax.tree_util.tree_structure(self.stacked), jax.tree_util.tree_structure(stacked)
        # jaxlib 0.12 ships no stub for PyTreeDef, so mypy cannot see its __eq__.
        bad = [] if old == new else [f"structure {new} != {old}"]  # type: ignore[operator]
        if not bad:
            pairs = zip(flat_nodes(self.stacked)[0], _leaves(self.stacked), _leaves(stacked))
            bad = [f"{p}: {y.shape} != {x.shape}" for p, x, y in pairs if x.shape != y.shape]
        raise_problems("with_trainable: stacked factors do not match", bad)
        return dataclasses.replace(self, stacked=stacked)

    def _base_tree(self) -> Any:
        """The plain base tree, with ``None`` where base values are unknown."""
        return base_of(self.frozen)


def _as_index(which: Any, n: int) -> int | jax.Array:
    """A Python int for a concrete index (checked against ``[-1, n)``), else the tracer."""
    if isinstance(which, jax.core.Tracer):
        if jnp.ndim(which) != 0 or not jnp.issubdtype(jnp.result_type(which), jnp.integer):
            raise TypeError(f"adapter index must be an integer scalar, got {which.aval}")
        return which
    arr = np.asarray(which)
    if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"adapter index must be a name or an integer scalar, got {which!r}")
    if not -1 <= int(arr) < n:
        raise IndexError(f"adapter index {int(arr)} outside [-1, {n})")
    return int(arr)


def adapter_factors(node: LoraWeight, i: int, rank: int) -> tuple[jax.Array, jax.Array]:
    """Adapter ``i``'s own factors at a stacked node: ``A`` and ``B`` trimmed to ``rank``."""
    a = node.a[i][..., :rank]
    b = jax.lax.slice_in_dim(node.b[i], 0, rank, axis=len(node.layout.stack))
    return a, b


def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def _stacked_ranks(stacked: Any) -> list[int]:
    nodes = jax.tree_util.tree_leaves(stacked, is_leaf=is_hole_or_node)
    return [x.a.shape[-1] for x in nodes if isinstance(x, LoraWeight)]


def _warn_padding(padding: dict, before: dict) -> None:
    """Warns about the (adapter, leaf) pairs padded now that were not padded before."""
    new = [
        f"{name}: {path} rank {r} -> {full}" + (" (not adapted: zero factors)" if r == 0 else "")
        for name, leaves in padding.items()
        for path, (r, full) in leaves.items()
        if before.get(name, {}).get(path) != (r, full)
    ]
    if new:
        warnings.warn(
            "AdapterSet: zero-padded adapter factors to a common rank (exact: the deltas "
            "are unchanged; see .padding):\n  " + "\n  ".join(new),
            stacklevel=3,
        )


class _Pair(NamedTuple):
    """A picked node and its example axes (a pair of trees that `_pick` splits)."""

    node: Any
    axes: Any
