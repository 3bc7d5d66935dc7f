"""Many adapters over one frozen base: a set, combinations, per-example routing, training.

`AdapterSet` stores the adapters of one base stacked on a leading adapter axis, so
that choosing one under ``jax.jit`` is an index, not a new program. `combine_adapters`
makes one adapter of several (``linear``, ``cat``, ``svd``). `route` runs a batch in
which every example names its own adapter (``-1``: the base) in one compiled call.
`vmap_train_step` trains all adapters of a set at once, each with its own optimizer
state, over the one frozen base.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .quant import QuantizedWeight, quantize_array
from .targets import path_str
from .train import TrainStep, train_step
from .transform import lora
from .trees import TrainState, base_leaf, combine, content_hash
from .weight import Layout, LoraWeight, Trainable, is_lora_node, is_node

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_node(x: Any) -> bool:
    """`LoraWeight`, `Trainable`, ``None`` holes and `QuantizedWeight` (one frozen leaf)."""
    return x is None or is_node(x)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Paths, nodes (`LoraWeight`, `Trainable`, arrays, ``None`` holes) and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


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
            ValueError: naming every problem: no adapters, structures that differ,
                layouts or shapes that disagree, leaves trained in full in some
                adapters only, base weights missing or different (another shape,
                dtype, quantization or content).
        """
        if not adapters:
            raise ValueError("AdapterSet.from_trees: no adapters given")
        out = _build(list(adapters.items()), base)
        _warn_padding(out.padding, {})
        return out

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lora_paths(self) -> tuple[str, ...]:
        """The paths of the adapted leaves, in the order of `ranks` and `scales`."""
        paths, nodes, _ = _flatten(self.frozen)
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

    def select(self, which: str | int | jax.Array) -> Any:
        """One adapter as a full LoRA tree (padded rank, set scale), for `ll.lora(fn)`.

        Args:
            which: a name, or an integer index (a Python int or an integer array, e.g.
                traced under ``jax.jit``); ``-1`` selects the base model (zero adapter
                delta). A traced index cannot be checked: one outside ``[-1, len(self))``
                gives NaN factors, so the outputs it touches are NaN, never another
                adapter's.

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
        index = self.index(which) if isinstance(which, str) else _as_index(which, len(self))
        return combine(self._pick(index), self.frozen)

    def _pick(self, index: int | jax.Array) -> Any:
        """The trainable partition of adapter ``index`` (``-1``: zero delta, base values)."""
        always = isinstance(index, int) and index >= 0
        if isinstance(index, int):
            ok, fill = index >= 0, 0.0
        else:  # traced: -1 gives the base, anything else outside the set NaN
            ok = (index >= 0) & (index < len(self))
            fill = jnp.where(index == -1, 0.0, jnp.nan)
        j = index if always else jnp.clip(index, 0, len(self) - 1)
        gains = iter(self._gains())
        missing = []

        def pick(path, node, base):
            if isinstance(node, LoraWeight):
                b, gain = node.b[j], next(gains)
                if gain is not None:
                    b = b * jnp.asarray(gain, b.dtype)[j]
                if not always:
                    b = jnp.where(ok, b, jnp.asarray(fill, b.dtype))
                return dataclasses.replace(node, a=node.a[j], b=b)
            if isinstance(node, Trainable):
                if always:
                    return Trainable(node.value[j])
                if base.value is None:
                    missing.append(path_str(path))
                    return Trainable(node.value[j])
                value = jnp.where(index == -1, base.value, node.value[j])
                return Trainable(jnp.where(ok | (index == -1), value, fill).astype(value.dtype))
            return None

        out = jax.tree_util.tree_map_with_path(pick, self.stacked, self.frozen, is_leaf=_is_node)
        if missing:
            raise ValueError(
                "the base model (index -1) needs the base values of leaves trained in full, "
                f"unknown for {missing}; pass base=params to AdapterSet.from_trees"
            )
        return out

    def _gains(self) -> list[np.ndarray | None]:
        """Per adapted leaf, each adapter's scale over the set's (None where all are 1)."""
        set_scales = [x.scale for x in jax.tree_util.tree_leaves(self.frozen, is_leaf=_is_node)
                      if isinstance(x, LoraWeight)]  # fmt: skip
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
            jax.tree_util.tree_structure(self.frozen, is_leaf=_is_node),
            self._adapter_nodes(self.index(name)),
        )

    def _adapter_nodes(self, i: int) -> list[Any]:
        _, stacked, _ = _flatten(self.stacked)
        _, frozen, _ = _flatten(self.frozen)
        lora_k, out = 0, []
        for node, base in zip(stacked, frozen):
            if isinstance(node, LoraWeight):
                rank, scale = self.ranks[i][lora_k], self.scales[i][lora_k]
                lora_k += 1
                if rank == 0:
                    out.append(base.w)
                    continue
                n_stack = len(node.layout.stack)
                a = node.a[i][..., :rank]
                b = jax.lax.slice_in_dim(node.b[i], 0, rank, axis=n_stack)
                out.append(LoraWeight(base.w, a, b, scale, node.layout, node.dropout))
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
        paths, nodes, treedef = _flatten(self.frozen)
        missing = [p for p, x in zip(paths, nodes) if isinstance(x, Trainable) and x.value is None]
        if missing:
            raise ValueError(
                f"the base values of leaves trained in full are unknown: {missing}; "
                "pass base=params to AdapterSet.from_trees"
            )
        return jax.tree_util.tree_unflatten(treedef, [base_leaf(x) for x in nodes])

    def add(self, name: str, tree: Any) -> AdapterSet:
        """A new set with ``tree`` (a LoRA tree or trainable partition) added as ``name``.

        Raises:
            ValueError: if ``name`` is taken, or as `from_trees`.
        """
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already in the set")
        entries = [(n, self.get(n)) for n in self.names] + [(name, tree)]
        out = _build(entries, self._base_tree())
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
        return _build(entries, self._base_tree())

    def with_trainable(self, stacked: Any) -> AdapterSet:
        """The same set with new stacked factors, e.g. ``state.trainable`` after training.

        Raises:
            ValueError: if the structure or any shape differs from `stacked`'s.
        """
        old, new = jax.tree_util.tree_structure(self.stacked), jax.tree_util.tree_structure(stacked)
        bad = [] if old == new else [f"structure {new} != {old}"]
        if not bad:
            pairs = zip(_flatten(self.stacked)[0], _leaves(self.stacked), _leaves(stacked))
            bad = [f"{p}: {y.shape} != {x.shape}" for p, x, y in pairs if x.shape != y.shape]
        if bad:
            raise ValueError("with_trainable: stacked factors do not match:\n  " + "\n  ".join(bad))
        return dataclasses.replace(self, stacked=stacked)

    def _base_tree(self) -> Any:
        """The plain base tree, with ``None`` where base values are unknown."""
        _, nodes, treedef = _flatten(self.frozen)
        return jax.tree_util.tree_unflatten(treedef, [base_leaf(x) for x in nodes])


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


def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def _stacked_ranks(stacked: Any) -> list[int]:
    nodes = jax.tree_util.tree_leaves(stacked, is_leaf=_is_node)
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


def _build(entries: list[tuple[str, Any]], base: Any) -> AdapterSet:
    """Aligns the adapters node by node and stacks them."""
    problems = []
    flat = [(name, *_flatten(tree)) for name, tree in entries]
    paths, treedef = flat[0][1], flat[0][3]
    for name, p, _, t in flat[1:]:
        if t != treedef:
            diff = sorted(set(p) ^ set(paths)) or ["(same paths, different containers)"]
            problems.append(f"adapter {name!r}: structure differs from {entries[0][0]!r} at {diff}")
    base_nodes = [None] * len(paths)
    if base is not None:
        base_paths, base_nodes, base_def = _flatten(base)
        if base_def != treedef:
            problems.append(f"base: structure differs at {sorted(set(base_paths) ^ set(paths))}")
    if problems:
        raise ValueError("AdapterSet:\n  " + "\n  ".join(problems))
    by_name = [(name, nodes) for name, _, nodes, _ in flat]
    base_nodes = _quantized_like_adapters(paths, by_name, base_nodes)
    problems = _base_problems(paths, by_name, base_nodes)
    if problems:
        raise ValueError(
            "AdapterSet: the adapters were not made from the same base:\n  " + "\n  ".join(problems)
        )
    names = [name for name, *_ in flat]
    frozen, stacked, ranks, scales = [], [], [], []
    for k, path in enumerate(paths):
        column = [nodes[k] for _, _, nodes, _ in flat]
        node_frozen, node_stacked, node_ranks, node_scales, problem = _stack_node(
            path, column, base_nodes[k]
        )
        frozen.append(node_frozen)
        stacked.append(node_stacked)
        if node_ranks is not None:
            ranks.append(node_ranks)
            scales.append(node_scales)
        problems += problem
    if problems:
        raise ValueError("AdapterSet:\n  " + "\n  ".join(problems))
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    by_adapter = lambda table: tuple(tuple(row[i] for row in table) for i in range(len(names)))
    return AdapterSet(
        unflatten(frozen), unflatten(stacked), tuple(names), by_adapter(ranks), by_adapter(scales)
    )


def _quantized_like_adapters(
    paths: list[str], adapters: list[tuple[str, list]], base: list
) -> list[Any]:
    """``base`` with each float weight the adapters hold quantized replaced by their
    `QuantizedWeight` where it quantizes to the same codes and scales (else by its own
    quantization, which `_base_problems` then reports as different values)."""
    out = list(base)
    for k, path in enumerate(paths):
        held = (_weight(nodes[k]) for _, nodes in adapters)
        ours = next((x for x in held if isinstance(x, QuantizedWeight)), None)
        x = base[k]
        if ours is None or _is_node(x):
            continue
        try:
            again = quantize_array(x, kind=ours.kind, block=ours.block, axis=ours.axis, path=path)
        except (TypeError, ValueError):
            continue  # another shape or dtype: `_base_problems` names it
        out[k] = ours if _mismatch(again, ours) is None else again
    return out


def _weight(node: Any) -> Any:
    """A node's base weight: ``w`` of a `LoraWeight`, the node itself otherwise."""
    return node.w if isinstance(node, LoraWeight) else node


def _base_problems(paths: list[str], adapters: list[tuple[str, list]], base: list) -> list[str]:
    """Every leaf where an adapter's base weight differs from ``base``'s or the first one's.

    Weights are compared by shape, dtype, quantization (kind, block, axis) and the
    `content_hash` (a strided sample) of every stored array, so a large base is never
    read whole.
    """
    problems = []
    for k, path in enumerate(paths):
        # Values trained in full are the adapter's own, not the base: skip them.
        seen = [("base", base[k])] + [(name, _weight(nodes[k])) for name, nodes in adapters]
        seen = [(who, x) for who, x in seen if x is not None and not is_lora_node(x)]
        if not seen:
            continue
        ref_name, ref = seen[0]
        for who, x in seen[1:]:
            why = _mismatch(x, ref)
            if why:
                problems.append(
                    f"{path}: {who!r} has another base weight than {ref_name!r} ({why})"
                )
    return problems


def _mismatch(x: Any, ref: Any) -> str | None:
    """How weight ``x`` differs from ``ref`` (shape, dtype and storage, then a content
    hash of every stored array), or None."""
    if x is ref:
        return None
    got, want = _storage(x), _storage(ref)
    if got != want:
        return f"{got} vs {want}"
    return None if _hashes(x) == _hashes(ref) else "same shape, different values"


def _storage(x: Any) -> str:
    """Shape, dtype and, for a `QuantizedWeight`, its kind, block and blocked axis."""
    text = f"{tuple(np.shape(x))} {jnp.dtype(x.dtype) if hasattr(x, 'dtype') else type(x)}"
    if isinstance(x, QuantizedWeight):
        text += f" quantized {x.kind} (block {x.block}, axis {x.axis})"
    return text


def _hashes(x: Any) -> list[str]:
    """`content_hash` of an array, or of each array a `QuantizedWeight` stores."""
    return [content_hash(leaf) for leaf in jax.tree_util.tree_leaves(x)]


def _stack_node(path: str, column: list[Any], base_leaf: Any) -> tuple:
    """``(frozen, stacked, ranks, scales, problems)`` for one leaf across the adapters."""
    loras = [x for x in column if isinstance(x, LoraWeight)]
    trained = [x for x in column if isinstance(x, Trainable)]
    if loras and trained:
        return None, None, None, None, [f"{path}: adapted in some adapters, trained in others"]
    if trained:
        if len(trained) != len(column):
            return None, None, None, None, [f"{path}: trained in full in some adapters only"]
        shapes = {tuple(x.value.shape) for x in trained}
        if len(shapes) > 1:
            return None, None, None, None, [f"{path}: trained values of shapes {sorted(shapes)}"]
        values = jnp.stack([x.value for x in trained])
        return Trainable(base_leaf), Trainable(values), None, None, []
    if not loras:
        plain = (
            base_leaf if base_leaf is not None else next((x for x in column if x is not None), None)
        )
        if plain is None:
            return None, None, None, None, [f"{path}: no base value (pass base=)"]
        return plain, None, None, None, []
    return _stack_lora(path, column, loras, base_leaf)


def _stack_lora(path: str, column: list[Any], loras: list[LoraWeight], base_leaf: Any) -> tuple:
    first = loras[0]
    layouts = sorted({x.layout for x in loras})
    w = base_leaf
    for x in column:
        w = x.w if w is None and isinstance(x, LoraWeight) else w
        w = x if w is None and isinstance(x, jax.Array | np.ndarray | QuantizedWeight) else w
    if len(layouts) > 1 or w is None:
        why = f"layouts differ: {layouts}" if w is not None else "no base weight (pass base=)"
        return None, None, None, None, [f"{path}: {why}"]
    if any(x.dora for x in loras):
        why = "a DoRA adapter (use_dora): its magnitude and norm do not stack or route"
        return None, None, None, None, [f"{path}: {why}; merge it first (ll.merge)"]
    full = max(x.rank for x in loras)
    dtype = jnp.result_type(*(x.a.dtype for x in loras))
    a_full, b_full = first.layout.factor_shapes(tuple(w.shape), full)
    n_stack = len(first.layout.stack)
    a_list, b_list, ranks, scales, problems = [], [], [], [], []
    for x in column:
        if not isinstance(x, LoraWeight):
            a_list.append(jnp.zeros(a_full, dtype))
            b_list.append(jnp.zeros(b_full, dtype))
            ranks.append(0)
            scales.append(first.scale)
            continue
        want = first.layout.factor_shapes(tuple(w.shape), x.rank)
        if (tuple(x.a.shape), tuple(x.b.shape)) != want:
            got = (tuple(x.a.shape), tuple(x.b.shape))
            problems.append(f"{path}: factor shapes {got}, expected {want} for {w.shape}")
            continue
        pad = full - x.rank
        a_list.append(jnp.pad(x.a.astype(dtype), [(0, 0)] * (x.a.ndim - 1) + [(0, pad)]))
        b_pad = [(0, 0)] * x.b.ndim
        b_pad[n_stack] = (0, pad)
        b_list.append(jnp.pad(x.b.astype(dtype), b_pad))
        ranks.append(x.rank)
        scales.append(x.scale)
    if problems:
        return None, None, None, None, problems
    meta = dict(scale=first.scale, layout=first.layout, dropout=first.dropout)
    stacked = LoraWeight(None, jnp.stack(a_list), jnp.stack(b_list), **meta)
    return LoraWeight(w, None, None, **meta), stacked, ranks, scales, []


class Combined(NamedTuple):
    """The result of `combine_adapters`.

    Attributes:
        tree: a full LoRA tree (scale 1: the weights and scales are in the factors).
        errors: ``{path: relative Frobenius error}`` of each combined delta against
            the weighted sum of the adapters' deltas (``0`` for ``cat``, exact).
    """

    tree: Any
    errors: dict[str, jax.Array]


def combine_adapters(
    adapters: AdapterSet | Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Combined:
    """One adapter from a weighted combination of several over the same base.

    The target is ``sum_i weight_i * delta_i`` at each leaf (``delta = scale * A @ B``).

    * ``"cat"``: concatenate the factors along the rank, the weight and scale applied
      to ``B``: exactly the target, rank ``sum_i r_i``. Serving this tree runs all the
      adapters at once on the forward path, without merging them into the base.
    * ``"linear"``: ``A = sum_i sign(w_i) c_i A_i``, ``B = sum_i c_i B_i`` with
      ``c_i = sqrt(|w_i| scale_i)`` (PEFT's ``linear``, extended to negative weights);
      same rank, not the target in general (cross terms), see ``errors``.
    * ``"svd"``: the target summed densely in float32, re-factored by truncated SVD
      to ``rank``, the singular values split as ``sqrt`` between ``A`` and ``B``.

    Leaves trained in full combine as task vectors: ``base + sum_i w_i (v_i - base)``.

    Args:
        adapters: an `AdapterSet`, or ``{name: tree}`` to make one.
        weights: ``{name: weight}`` of the adapters to combine.
        method: ``"cat"``, ``"linear"`` or ``"svd"``.
        rank: the rank for ``"svd"`` (default: the largest input rank at each leaf),
            capped at ``min(d_in, d_out)``.

    Returns:
        `Combined` ``(tree, errors)``; merge the tree with `ll.merge` for export.

    Raises:
        ValueError: for an unknown method or name, a bad rank, ``"linear"`` over
            different ranks, or leaves trained in full without base values (naming
            every such leaf).

    Example:
        >>> tree, errors = combine_adapters(adapters, {"a": 0.7, "b": 0.3}, method="svd",
        ...                                 rank=8)  # doctest: +SKIP
    """
    if not isinstance(adapters, AdapterSet):
        adapters = AdapterSet.from_trees(adapters)
    _check_combination(adapters, weights, method, rank)
    chosen = [(adapters.index(n), float(w)) for n, w in weights.items()]
    paths, stacked, treedef = _flatten(adapters.stacked)
    _, frozen, _ = _flatten(adapters.frozen)
    out, errors, problems, lora_k = [], {}, [], 0
    for path, node, base in zip(paths, stacked, frozen):
        if isinstance(node, LoraWeight):
            parts = _parts(adapters, node, lora_k, chosen)
            lora_k += 1
            if not parts:
                out.append(base.w)
                continue
            if method == "linear" and len({r for _, _, r in parts}) > 1:
                problems.append(f"{path}: ranks {[r for _, _, r in parts]} differ")
                out.append(None)
                continue
            a, b, errors[path] = _COMBINERS[method](parts, node.layout, rank)
            out.append(LoraWeight(base.w, a, b, 1.0, node.layout, node.dropout))
        elif isinstance(node, Trainable):
            if base.value is None:
                problems.append(f"{path}: trained in full, base value unknown (pass base=)")
            out.append(_task_vector(node.value, base.value, chosen))
        else:
            out.append(base)
    if problems:
        raise ValueError(f"combine_adapters(method={method!r}):\n  " + "\n  ".join(problems))
    return Combined(jax.tree_util.tree_unflatten(treedef, out), errors)


def _check_combination(
    adapters: AdapterSet, weights: Mapping[str, float], method: str, rank: int | None
) -> None:
    problems = []
    if method not in _COMBINERS:
        problems.append(f"method must be one of {sorted(_COMBINERS)}, got {method!r}")
    if not weights:
        problems.append("no weights given")
    unknown = [n for n in weights if n not in adapters.names]
    if unknown:
        problems.append(f"unknown adapters {unknown}; the set holds {list(adapters.names)}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        problems.append(f"rank must be a positive int or None, got {rank!r}")
    if problems:
        raise ValueError("combine_adapters: " + "; ".join(problems))


def _parts(adapters: AdapterSet, node: LoraWeight, k: int, chosen: list) -> list[tuple]:
    """``(weight * scale, (A, B) trimmed to the adapter's rank, rank)`` per chosen adapter."""
    n_stack = len(node.layout.stack)
    parts = []
    for i, weight in chosen:
        r = adapters.ranks[i][k]
        if r:
            a = node.a[i][..., :r]
            b = jax.lax.slice_in_dim(node.b[i], 0, r, axis=n_stack)
            parts.append((weight * adapters.scales[i][k], (a, b), r))
    return parts


def _task_vector(values: jax.Array, base: jax.Array | None, chosen: list) -> Trainable:
    if base is None:
        return Trainable(None)
    total = base.astype(jnp.float32)
    for i, weight in chosen:
        total = total + weight * (values[i].astype(jnp.float32) - base.astype(jnp.float32))
    return Trainable(total.astype(base.dtype))


def _as_matrices(a: jax.Array, b: jax.Array, layout: Layout) -> tuple[jax.Array, jax.Array]:
    """``A`` as ``(S, d_in, r)`` and ``B`` as ``(S, r, d_out)`` (S: stacked entries)."""
    n_stack = len(layout.stack)
    stack = math.prod(a.shape[:n_stack])
    return a.reshape(stack, -1, a.shape[-1]), b.reshape(stack, b.shape[n_stack], -1)


def _from_matrices(
    a: jax.Array, b: jax.Array, like_a: jax.Array, like_b: jax.Array, layout: Layout
) -> tuple[jax.Array, jax.Array]:
    """The inverse of `_as_matrices` at a new rank, in the factors' dtype."""
    n_stack, rank = len(layout.stack), a.shape[-1]
    a = a.reshape(*like_a.shape[:-1], rank).astype(like_a.dtype)
    b = b.reshape(*like_b.shape[:n_stack], rank, *like_b.shape[n_stack + 1 :])
    return a, b.astype(like_b.dtype)


def _target(parts: list[tuple], layout: Layout) -> jax.Array:
    """``sum_i w_i s_i A_i @ B_i`` as ``(S, d_in, d_out)`` in float32."""
    total = 0.0
    for coef, (a, b), _ in parts:
        a, b = _as_matrices(a.astype(jnp.float32), b.astype(jnp.float32), layout)
        total = total + coef * jnp.matmul(a, b, precision=_HIGHEST)
    return total


def _relative_error(target: jax.Array, a: jax.Array, b: jax.Array, layout: Layout) -> jax.Array:
    a, b = _as_matrices(a.astype(jnp.float32), b.astype(jnp.float32), layout)
    norm = jnp.linalg.norm(target)
    residual = jnp.linalg.norm(target - jnp.matmul(a, b, precision=_HIGHEST))
    return jnp.where(norm > 0, residual / jnp.where(norm > 0, norm, 1.0), 0.0)


def _combine_cat(parts: list[tuple], layout: Layout, rank: int | None) -> tuple:
    n_stack = len(layout.stack)
    a = jnp.concatenate([a for _, (a, _), _ in parts], axis=-1)
    bs = [(coef * b.astype(jnp.float32)).astype(b.dtype) for coef, (_, b), _ in parts]
    return a, jnp.concatenate(bs, axis=n_stack), jnp.zeros((), jnp.float32)


def _combine_linear(parts: list[tuple], layout: Layout, rank: int | None) -> tuple:
    a_sum, b_sum = 0.0, 0.0
    for coef, (a, b), _ in parts:
        c = math.sqrt(abs(coef))
        a_sum = a_sum + math.copysign(c, coef) * a.astype(jnp.float32)
        b_sum = b_sum + c * b.astype(jnp.float32)
    like_a, like_b = parts[0][1]
    a, b = a_sum.astype(like_a.dtype), b_sum.astype(like_b.dtype)
    return a, b, _relative_error(_target(parts, layout), a, b, layout)


def _combine_svd(parts: list[tuple], layout: Layout, rank: int | None) -> tuple:
    target = _target(parts, layout)
    keep = min(rank or max(r for _, _, r in parts), target.shape[1], target.shape[2])
    u, s, vt = jnp.linalg.svd(target, full_matrices=False)
    root = jnp.sqrt(s[:, :keep])
    a = u[:, :, :keep] * root[:, None, :]
    b = root[:, :, None] * vt[:, :keep, :]
    a, b = _from_matrices(a, b, *parts[0][1], layout)
    return a, b, _relative_error(target, a, b, layout)


_COMBINERS: dict[str, Callable] = {
    "cat": _combine_cat,
    "linear": _combine_linear,
    "svd": _combine_svd,
}


def route(fn: Callable, *, strict: bool = False) -> Callable:
    """Makes ``fn`` run each example of a batch with its own adapter, in one call.

    The routed function takes an `AdapterSet` and an ``adapter_ids`` vector (one id
    per example; ``-1``: the base model). Under ``jax.vmap`` over the examples, each
    example gets its adapter's factors (gathered by id) while the base weights stay
    unbatched: the base product stays one matmul over the whole batch and the adapter
    path becomes batched matmuls. No loop over adapters, no sub-batching.

    Args:
        fn: the model function ``fn(params, *batch, **kwargs)``, e.g. ``model.apply``;
            it sees each example as a batch of one, and its outputs must keep that
            leading batch axis (per-example outputs, not a batch mean).
        strict: as for `ll.lora`.

    Returns:
        ``routed(adapters, adapter_ids, *batch, dropout_key=None, **kwargs)``: every
        ``batch`` leaf has the examples on axis 0; keyword arguments are passed to
        every example unbatched; with a ``dropout_key``, each example draws its own
        masks. Returns ``fn``'s outputs stacked over the examples. Under ``jax.jit``
        the ids are traced and cannot be checked: an id outside ``[-1, len(adapters))``
        makes that example's output NaN (see `AdapterSet.select`).

    Raises:
        TypeError: from ``routed``, for ids that are not integers.
        ValueError: from ``routed``, for ids that are not one per example (a vector as
            long as every batch leaf's leading axis), or concrete ids out of range.

    Example:
        >>> routed = jax.jit(route(model.apply))  # doctest: +SKIP
        >>> logits = routed(adapters, jnp.array([0, 2, -1, 0]), tokens)  # doctest: +SKIP
    """
    apply = lora(fn, strict=strict)

    def one_example(adapters, kwargs, index, example, key):
        batch_of_one = jax.tree_util.tree_map(lambda x: x[None], example)
        out = apply(adapters.select(index), *batch_of_one, dropout_key=key, **kwargs)
        return jax.tree_util.tree_map(lambda y: y[0], out)

    @functools.wraps(fn)
    def routed(
        adapters: AdapterSet,
        adapter_ids: jax.Array,
        *batch: Any,
        dropout_key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        if not isinstance(adapters, AdapterSet):
            raise TypeError(f"routed: expected an AdapterSet, got {type(adapters).__name__}")
        ids = _check_ids(adapter_ids, batch, len(adapters))
        keys = None if dropout_key is None else jax.random.split(dropout_key, ids.shape[0])
        # The set and the keyword arguments are closed over: unbatched, and kwargs may
        # hold Python values (flags) that the model branches on.
        mapped = jax.vmap(functools.partial(one_example, adapters, kwargs))
        return mapped(ids, batch, keys)

    return routed


def _check_ids(adapter_ids: Any, batch: tuple, n: int) -> jax.Array:
    """``adapter_ids`` as int32, checked: a vector, one per example, in ``[-1, n)`` if concrete."""
    ids = jnp.asarray(adapter_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"adapter_ids must be integers, got dtype {ids.dtype}")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
    if ids.ndim != 1 or sizes - {ids.shape[0]}:
        raise ValueError(
            f"adapter_ids must be a vector with one id per example; got shape {ids.shape} "
            f"for batch leaves with leading sizes {sorted(sizes, key=str)}"
        )
    if not isinstance(ids, jax.core.Tracer):
        concrete = np.asarray(ids)
        bad = np.unique(concrete[(concrete < -1) | (concrete >= n)])
        if bad.size:
            raise ValueError(f"adapter_ids {bad.tolist()} outside [-1, {n}) (-1: the base model)")
    return ids.astype(jnp.int32)


def vmap_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    batch_axis: int | None = None,
    donate: bool = True,
    accum_steps: int = 1,
    remat: bool = False,
    skip_nonfinite: bool = True,
) -> TrainStep:
    """All adapters of a set trained at once, side by side, over one frozen base.

    `ll.train_step`'s update under ``jax.vmap`` over the adapter axis: each adapter
    has its own factors, optimizer state and PRNG key, and takes exactly the steps it
    would take trained alone; the base is shared, unbatched and never differentiated.
    For sweeps, vary the data (``batch_axis=0``), the keys, or hyperparameters held in
    the optimizer state (``optax.inject_hyperparams``).

    Args:
        loss_fn: as for `ll.train_step`: ``loss_fn(tree, batch, key)`` on one adapter.
        tx: a plain optax optimizer (wrapped with `ll.optimizer`).
        batch_axis: ``None``: every adapter trains on the same batch; an int: the
            batch leaves hold one batch per adapter along this axis.
        donate: donate the stacked state (not the base) to the update.
        accum_steps: as for `ll.train_step`.
        remat: as for `ll.train_step`.
        skip_nonfinite: as for `ll.train_step`, per adapter: an adapter whose loss or
            gradients are NaN or inf keeps its factors and optimizer state; the
            others take their step.

    Returns:
        `TrainStep` ``(init, step)``: ``init(adapters, keys)`` takes an `AdapterSet`
        and one key per adapter (shape ``(n,)``) and returns a `TrainState` whose
        ``trainable``, ``opt_state``, ``key`` and ``step`` have a leading adapter axis
        (the base in ``frozen`` has none); ``step(state, batch) -> (state, metrics)``
        with per-adapter metrics. ``adapters.with_trainable(state.trainable)`` puts
        the trained factors back into the set.

    Raises:
        ValueError: if ``accum_steps < 1``; from ``init``, if the adapters' scales differ
            at a leaf (each would need its own static scale), if any adapter is padded
            (training would fill the padding), or the keys are not one per adapter.
        TypeError: if ``skip_nonfinite`` is not a bool.

    Example:
        >>> init, step = vmap_train_step(loss_fn, optax.adam(1e-3))  # doctest: +SKIP
        >>> state = init(adapters, jax.random.split(key, len(adapters)))  # doctest: +SKIP
        >>> state, metrics = step(state, batch)  # metrics["loss"]: one per adapter
        ...                                                       # doctest: +SKIP
    """
    single = train_step(
        loss_fn,
        tx,
        donate=False,
        accum_steps=accum_steps,
        remat=remat,
        skip_nonfinite=skip_nonfinite,
    )

    def init(adapters: AdapterSet, keys: jax.Array) -> TrainState:
        _check_trainable_set(adapters, keys)
        tree = combine(adapters.stacked, adapters.frozen)
        axes = _adapter_axes(tree)
        state_axes = TrainState(0, 0, None, 0, 0)
        return jax.vmap(single.init, in_axes=(axes, 0), out_axes=state_axes)(tree, keys)

    def update(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, Any]:
        new, metrics = single.step(dataclasses.replace(state, frozen=frozen), batch)
        return dataclasses.replace(new, frozen=None), metrics

    mapped = jax.vmap(update, in_axes=(0, None, batch_axis))
    jitted = jax.jit(mapped, donate_argnums=(0,) if donate else ())

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        new, metrics = jitted(dataclasses.replace(state, frozen=None), state.frozen, batch)
        return dataclasses.replace(new, frozen=state.frozen), metrics

    return TrainStep(init, step)


def _check_trainable_set(adapters: AdapterSet, keys: jax.Array) -> None:
    problems = [
        f"{path}: scales {sorted({s[k] for s in adapters.scales})} differ"
        for k, path in enumerate(adapters.lora_paths)
        if len({s[k] for s in adapters.scales}) > 1
    ]
    if problems:
        problems.append("(give the adapters equal alpha / rank to train them side by side)")
    # Training would fill the zero padding: a rank-2 adapter would come back rank 4.
    problems += [
        f"{name}: {path} is padded from rank {r} to {full} (train adapters of equal ranks "
        "on the same leaves)"
        for name, leaves in adapters.padding.items()
        for path, (r, full) in leaves.items()
    ]
    if np.shape(keys) != (len(adapters),):
        problems.append(f"keys of shape {np.shape(keys)}, expected ({len(adapters)},)")
    if problems:
        raise ValueError("vmap_train_step.init:\n  " + "\n  ".join(problems))


def _adapter_axes(tree: Any) -> Any:
    """``in_axes`` for a LoRA tree whose factors and trained values carry the adapter axis."""

    def axes(node):
        if isinstance(node, LoraWeight):
            return dataclasses.replace(node, w=None, a=0, b=0)
        return Trainable(0) if isinstance(node, Trainable) else None

    return jax.tree_util.tree_map(axes, tree, is_leaf=_is_node)
