"""`init`: a base parameter tree made a LoRA tree (adapters, trained leaves, DoRA, PiSSA/OLoRA)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import decompose
from .checks import raise_problems
from .config import LoraConfig
from .deprecation import renamed_keywords
from .qlora import quantize
from .quant import is_quantized
from .selection import select
from .targets import named_leaves
from .usage import infer_usage
from .weight import (
    LoraWeight,
    Trainable,
    column_norm,
    init_factors,
    is_array,
    is_lora_node,
    is_node,
    stored_value,
)


@renamed_keywords(quantize="quantization")
def init(
    params: Any,
    config: LoraConfig,
    *,
    key: jax.Array,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    quantization: str | Mapping[str, Any] | None = None,
) -> Any:
    """Wraps the targeted leaves of ``params`` in `LoraWeight` and marks trained leaves.

    Args:
        params: any parameter pytree (Flax variables, an NNX state, a dict of arrays).
        config: what to adapt and how.
        key: PRNG key, split into one fresh key per adapted leaf.
        fn: optional model function ``fn(params, *args)``; traced abstractly (no FLOPs)
            to learn the fan-in, fan-out and stacked axes of weights with more than two
            dimensions, and which kernels are linear for ``"all-linear"``.
        args: example arguments for ``fn`` after ``params``.
        quantization: quantize the frozen base in the same call (QLoRA): a kind such as
            ``"nf4"``, or the keywords of `quantize` (``dict(kind="int8", block=32)``).
            (``quantize=`` before, which shadowed `quantize`: warns ``DeprecationWarning``.)

    Returns:
        The same tree with targeted leaves replaced by ``LoraWeight(w, a, b, scale)``
        and fully trained leaves (``config.train``, biases) wrapped in `Trainable`. A
        `QuantizedWeight` in ``params`` is one weight (targeted: the ``w`` of its
        `LoraWeight`). With ``init="pissa"``, ``"olora"`` or ``"loftq"``, each ``w`` is
        the residual base, which must be saved with the adapter.

    Raises:
        ValueError: if ``params`` already holds `LoraWeight` or `Trainable` leaves (naming
            them all). Otherwise listing every problem at once: patterns matching nothing
            (``targets``, ``exclude``, ``train``, and ``rank_pattern``, ``alpha_pattern``
            and ``axes`` keys that match no adapted leaf; with the closest paths), ranks
            larger than a weight allows, leaves both adapted and trained in full,
            weights whose layout is ambiguous, quantized weights trained in full
            (their integer codes have no gradient).

    Example:
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> lp = init(params, LoraConfig(rank=2, targets="dense"), key=jax.random.key(0))
        >>> lp["dense"]["kernel"].a.shape
        (4, 2)
    """
    _refuse_lora_nodes(params)
    named = named_leaves(params, is_leaf=is_quantized)
    usage = infer_usage(fn, params, args) if fn is not None else None
    adapted, trained, problems = select(named, config, usage)
    problems += _residual_init_problems(named, config, adapted)
    raise_problems("lorax_lite.init found problems", problems)

    paths = iter(named)
    keys = iter(jax.random.split(key, max(len(adapted), 1)))

    def wrap(leaf):
        path, _ = next(paths)
        if path in adapted:
            adapter = adapted[path]
            assert adapter is not None  # None only beside a problem, raised above
            layout, rank, alpha = adapter
            scale = config.scale_for(rank, alpha)
            if config.init in decompose.RESIDUAL_INITS:
                a, b, leaf = decompose.residual_init(
                    leaf,
                    layout,
                    rank,
                    scale,
                    init=config.init,
                    dtype=config.dtype,
                    niter=config.pissa_niter,
                    key=next(keys),
                    quantization=quantization,
                    loftq_iter=config.loftq_iter,
                )
            else:
                a, b = init_factors(
                    next(keys), leaf.shape, layout, rank, init=config.init, dtype=config.dtype
                )
            residual = config.init if config.init in decompose.RESIDUAL_INITS else None
            return LoraWeight(leaf, a, b, scale, layout, config.dropout, residual_init=residual)
        return Trainable(leaf) if path in trained else leaf

    tree = _quantized(jax.tree_util.tree_map(wrap, params, is_leaf=is_quantized), quantization)
    return with_magnitudes(tree, config.dora_detach_norm) if config.use_dora else tree


def _residual_init_problems(
    named: list[tuple[str, Any]], config: LoraConfig, targeted: Collection[str]
) -> list[str]:
    """PiSSA and OLoRA decompose each weight's values: a problem for each targeted leaf
    that has none (a `QuantizedWeight` or a ``jax.ShapeDtypeStruct`` stand-in)."""
    if config.init not in decompose.RESIDUAL_INITS:
        return []
    return [
        f"{path}: init={config.init!r} decomposes the weight's values, found a "
        f"{type(leaf).__name__}; pass the float weights (for a quantized base, its "
        "dequantized weights, with quantization= to quantize the residual)"
        for path, leaf in named
        if path in targeted and not is_array(leaf)
    ]


def with_magnitudes(tree: Any, detach_norm: bool) -> Any:
    """DoRA: gives every `LoraWeight` a magnitude ``m = ||w + s A B||`` per output unit
    over the fan-in axes (``||w||`` at init, where ``B = 0``; a quantized base's
    dequantized weights), so that the model starts unchanged."""

    def add(node):
        if not isinstance(node, LoraWeight):
            return node
        merged = stored_value(node.w).astype(jnp.float32) + node.delta(jnp.float32)
        m = column_norm(merged, node.layout).astype(node.a.dtype)
        return dataclasses.replace(node, m=m, detach_norm=detach_norm)

    return jax.tree_util.tree_map(add, tree, is_leaf=is_node)


def _quantized(tree: Any, spec: str | Mapping[str, Any] | None) -> Any:
    if spec is None:
        return tree
    return quantize(tree, **({"kind": spec} if isinstance(spec, str) else dict(spec)))


def _refuse_lora_nodes(params: Any) -> None:
    """Raises naming every `LoraWeight` and `Trainable` already in ``params``: `init` would
    wrap their parts (``w``, ``a``, ``b``) in adapters of their own."""
    nodes = [
        f"{path} ({type(node).__name__})"
        for path, node in named_leaves(params, is_leaf=is_lora_node)
        if is_lora_node(node)
    ]
    raise_problems(
        "lorax_lite.init: params already hold LoRA leaves, which init would nest; pass the "
        "base parameters (ll.merge(tree) folds the adapters in) or train the tree as it is",
        nodes,
    )
