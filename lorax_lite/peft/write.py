"""`to_peft`: a LoRA tree written as a PEFT adapter directory."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from safetensors.numpy import save_file

from ..atomic import current, replace_files
from ..checks import raise_problems
from ..config import LoraConfig, tree_conflicts
from ..decompose import RESIDUAL_INITS
from ..deprecation import renamed_keywords
from ..targets import leaf_name, named_leaves
from ..trees import lora_tree
from ..weight import (
    Layout,
    LoraWeight,
    Trainable,
    alpha_from_scale,
    is_lora_node,
    scale_from_alpha,
)
from .format import (
    CONFIG_NAME,
    FIELDS_DIGEST,
    LAYER,
    MAGNITUDE,
    PREFIX,
    TORCH_PARAM,
    WEIGHTS_NAME,
    NameMap,
    Piece,
    default_name_map,
    fields_digest,
    resolve_name_map,
)


class Defaults(NamedTuple):
    """The fields of ``adapter_config.json`` that adapters differing from them override
    through ``rank_pattern`` and ``alpha_pattern``."""

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool


@renamed_keywords(directory="path")
def to_peft(
    path: str | pathlib.Path,
    tree: Any,
    config: LoraConfig | None = None,
    name_map: NameMap = default_name_map,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``tree``'s adapters in the PEFT LoRA format.

    What PEFT records comes from the tree: each adapter's rank, scale (as ``lora_alpha``),
    dropout and DoRA magnitude; ranks and alphas other than the most common go to
    ``rank_pattern``/``alpha_pattern``. Fully trained biases become PEFT's trained biases
    (``bias``), other fully trained leaves ``modules_to_save``. Both files are swapped
    into place together: a failed or killed write leaves the old export or the new one.

    Args:
        path: the output directory (created if missing; ``directory=`` before; warns).
        tree: a LoRA tree, its trainable partition, or a `TrainState`.
        config: optional: the configuration the tree was made with, for PEFT's default
            ``r``, ``lora_alpha`` and ``use_rslora``; checked against the tree.
        name_map: leaf path -> PyTorch module name, or a ``{layer}`` template for a leaf
            stacked along its leading axis (one module per layer), as a dict or a
            callable; by default the module path without ``params/``, dot-joined.
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.
        overwrite: replace an export already at ``path`` (other files are kept).

    Returns:
        The directory.

    Raises:
        ValueError: listing every leaf that the name map does not map, every adapter
            whose layout PEFT cannot express, every stacked leaf without a ``{layer}``
            template and every unstacked one with one, DoRA and plain adapters mixed,
            adapters of different dropouts, and where ``config`` disagrees with the
            tree; naming the adapters whose base is a residual (``residual_init``:
            PiSSA, OLoRA, LoftQ); if ``path`` holds an export and ``overwrite`` is False.

    Example:
        >>> names = {"params/layer_0/query": "encoder.layer.0.attention.self.query",
        ...          "params/layers/self_attn/q_proj": "model.layers.{layer}.self_attn.q_proj"}
        >>> ll.to_peft("/tmp/peft", lora_params, name_map=names)  # doctest: +SKIP
    """
    tree = lora_tree(tree)
    path = pathlib.Path(path)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (current(path.resolve()) / n).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"to_peft: {path} already holds an export ({', '.join(existing)}); pass "
            "overwrite=True to replace it"
        )
    _refuse_residual_bases(tree, config)
    pieces, problems = _pieces(tree, resolve_name_map(name_map))
    if config is not None:
        problems += tree_conflicts(config, tree)
    adapters = [p for p in pieces if isinstance(p.value, LoraWeight)]
    dora, dora_problems = _dora_mix(adapters)
    problems += dora_problems
    defaults, default_problems = _defaults(adapters, config)
    problems += default_problems
    problems += _shared_modules(adapters, "adapters")
    targeted = {p.module for p in adapters}
    trained = [p for p in pieces if not isinstance(p.value, LoraWeight)]
    tensors, bias, to_save, trained_problems = _trained_tensors(trained, targeted)
    problems += trained_problems
    raise_problems("to_peft cannot export this tree", problems)
    peft_config = _base_config(defaults, base_model_name_or_path)
    peft_config["use_dora"] = dora
    for piece in adapters:
        tensors.update(_adapter_tensors(piece))
        _add_patterns(peft_config, defaults, piece)
    peft_config.update(
        target_modules=sorted(targeted), bias=bias, modules_to_save=sorted(to_save) or None
    )
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    header = {"format": "pt", FIELDS_DIGEST: fields_digest(peft_config)}

    def write(new: pathlib.Path) -> None:
        save_file(tensors, new / WEIGHTS_NAME, header)
        _sort_metadata(new / WEIGHTS_NAME)
        (new / CONFIG_NAME).write_text(text)

    replace_files(path.resolve(), (WEIGHTS_NAME, CONFIG_NAME), write)
    return path


def _sort_metadata(path: pathlib.Path) -> None:
    """Sorts the keys of a safetensors file's ``__metadata__`` in place (same length), so one
    export always gives the same bytes: safetensors writes them in hash-map order."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= size:  # the same entries reordered: never longer
            f.seek(8)
            f.write(text.ljust(size))


def _pieces(tree: Any, resolve: Callable[[str], str | None]) -> tuple[list[Piece], list[str]]:
    """The adapters (`LoraWeight` values) and fully trained arrays of ``tree``, one piece
    per PyTorch module, and a problem for each leaf that cannot be exported."""
    pieces: list[Piece] = []
    problems: list[str] = []
    for path, node in named_leaves(tree, is_leaf=is_lora_node):
        value: Any
        if isinstance(node, LoraWeight) and node.a is not None:
            value = node
        elif isinstance(node, Trainable) and node.value is not None:
            value = node.value
        else:
            continue
        module = resolve(path)
        if not module:
            problems.append(f"{path}: the name map gives no PyTorch module")
            continue
        problem = _leaf_problem(path, value, module)
        if problem:
            problems.append(problem)
        else:
            pieces += _unstack(path, module, value)
    return pieces, problems


def _leaf_problem(path: str, value: Any, module: str) -> str | None:
    """Why a leaf cannot be exported under ``module``, if it cannot: a layout PEFT cannot
    express, a stack without a ``{layer}`` template or a template without one."""
    if isinstance(value, LoraWeight):
        layout = value.layout
        if len(layout.fan_in) != 1 or len(layout.fan_out) != 1 or layout.stack not in ((), (0,)):
            return (
                f"{path}: a weight with axis roles {layout.roles()} has no PEFT equivalent; "
                "PEFT's LoRA holds 2-D Linear and Embedding weights, one per layer (stack "
                "layers along the leading axis, reshape multi-axis kernels to 2-D)"
            )
        stacked, why = bool(layout.stack), "its layout has no stack axis"
    else:
        stacked, why = LAYER in module and np.ndim(value) >= 1, "it has no axes"
    if stacked and LAYER not in module:
        return (
            f"{path}: stacked along its leading (layer) axis, but the name map gives "
            f"{module!r}, not a per-layer template with {LAYER} (e.g. 'model.layers.{LAYER}.mlp')"
        )
    if not stacked and LAYER in module:
        return f"{path}: the name map gives the per-layer template {module!r}, but {why}"
    return None


def _unstack(path: str, module: str, value: Any) -> list[Piece]:
    """The pieces of a leaf: itself, or one per index of its leading axis when ``module``
    is a ``{layer}`` template."""
    if LAYER not in module:
        return [Piece(path, None, module, value)]
    if isinstance(value, LoraWeight):
        # Without the base, every array of the node (the factors) has the layer axis first.
        value = dataclasses.replace(value, w=None, layout=Layout.dense())
    count = jax.tree_util.tree_leaves(value)[0].shape[0]
    layer = lambda i: jax.tree_util.tree_map(lambda x: x[i], value)
    return [Piece(path, i, module.replace(LAYER, str(i)), layer(i)) for i in range(count)]


def _dora_mix(adapters: list[Piece]) -> tuple[bool, list[str]]:
    """Whether the adapters are DoRA ones, and a problem naming the leaves if DoRA and plain
    adapters mix (PEFT's ``use_dora`` holds for every module of an adapter)."""
    is_dora = {p.path: p.value.m is not None for p in adapters}  # one entry per leaf
    dora = [path for path, flag in is_dora.items() if flag]
    plain = [path for path, flag in is_dora.items() if not flag]
    if not (dora and plain):
        return bool(dora), []
    return True, [
        f"DoRA adapters ({', '.join(dora)}) and plain ones ({', '.join(plain)}) in one "
        "tree: PEFT's use_dora holds for every module of an adapter; export them apart"
    ]


def _shared_modules(pieces: list[Piece], what: str) -> list[str]:
    """A problem for each PyTorch module that several of ``pieces`` map to."""
    owners: dict[str, list[str]] = {}
    for piece in pieces:
        owners.setdefault(piece.module, []).append(piece.label)
    return [
        f"{module}: the name map sends the {what} of {' and '.join(labels)} to this one "
        "PyTorch module (expected one leaf per module)"
        for module, labels in owners.items()
        if len(labels) > 1
    ]


def _refuse_residual_bases(tree: Any, config: LoraConfig | None) -> None:
    """Raises naming the adapters whose base is a residual ``W - s*A0@B0`` (PiSSA, OLoRA,
    LoftQ): a PEFT adapter is read onto the original weights. Each adapter's
    ``residual_init`` says so; for one that records none (made before it existed), a
    ``config`` whose ``init`` is one of them."""
    by_init: dict[str, list[str]] = {}
    for path, node in named_leaves(tree, is_leaf=is_lora_node):
        if isinstance(node, LoraWeight) and node.a is not None:
            init = node.residual_init or (config.init if config is not None else None)
            if init in RESIDUAL_INITS:
                by_init.setdefault(init, []).append(path)
    raise_problems(
        "to_peft cannot export these adapters as plain LoRA (export ll.merge(tree) instead)",
        [
            f"{', '.join(paths)}: initialized with init={init!r}, which replaced each base "
            "weight by its residual W - s*A0@B0; a PEFT adapter is read onto the original"
            for init, paths in by_init.items()
        ],
    )


def _defaults(adapters: list[Piece], config: LoraConfig | None) -> tuple[Defaults, list[str]]:
    """PEFT's default rank, alpha, dropout and rsLoRA flag: ``config``'s, or else the most
    common of the adapters' (alpha as ``scale * rank``); without ``config``, a problem if
    their dropouts differ (PEFT has one ``lora_dropout``; with ``config``,
    `~lorax_lite.config.tree_conflicts` names each leaf whose dropout is not its)."""
    if config is not None:
        return Defaults(config.rank, config.alpha, config.dropout, config.use_rslora), []
    dropouts = Counter(float(p.value.dropout) for p in adapters)
    problems = []
    if len(dropouts) > 1:
        by_rate = {
            rate: sorted({p.path for p in adapters if p.value.dropout == rate}) for rate in dropouts
        }
        listed = "; ".join(f"{rate:g}: {', '.join(paths)}" for rate, paths in by_rate.items())
        problems.append(f"the adapters' dropout rates differ ({listed}); PEFT has one lora_dropout")
    common = lambda values, default: Counter(values).most_common(1)[0][0] if values else default
    return (
        Defaults(
            rank=common([p.value.rank for p in adapters], LoraConfig.rank),
            alpha=common([_alpha(p.value, rslora=False) for p in adapters], LoraConfig.alpha),
            dropout=common(list(dropouts.elements()), LoraConfig.dropout),
            use_rslora=False,
        ),
        problems,
    )


def _alpha(node: LoraWeight, *, rslora: bool) -> float:
    """The alpha giving ``node`` its scale, to 12 significant digits (32, not the
    32.00000000000001 of ``s * sqrt(r)`` in floats); an int where it is one."""
    alpha = float(f"{alpha_from_scale(node.scale, node.rank, rslora=rslora):.12g}")
    return int(alpha) if alpha.is_integer() else alpha


def _base_config(defaults: Defaults, base_model: str | None) -> dict[str, Any]:
    number = lambda x: int(x) if float(x).is_integer() else float(x)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": defaults.rank,
        "lora_alpha": number(defaults.alpha),
        "lora_dropout": defaults.dropout,
        "use_rslora": defaults.use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _adapter_tensors(piece: Piece) -> dict[str, np.ndarray]:
    a, b = np.asarray(piece.value.a).T, np.asarray(piece.value.b).T  # (r, in) and (out, r)
    if leaf_name(piece.path) == "embedding":
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        names = ("lora_A.weight", "lora_B.weight")
    module = piece.module
    tensors = {f"{PREFIX}{module}.{n}": np.ascontiguousarray(x) for n, x in zip(names, (a, b))}
    if piece.value.m is not None:
        tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.asarray(piece.value.m)
    return tensors


def _add_patterns(peft_config: dict, defaults: Defaults, piece: Piece) -> None:
    """Records the module's rank, and the alpha giving its scale, where they differ from the
    defaults."""
    node = piece.value
    rank, alpha = node.rank, defaults.alpha
    scale = scale_from_alpha(alpha, rank, rslora=defaults.use_rslora)
    if not math.isclose(scale, node.scale, rel_tol=1e-6):
        alpha = _alpha(node, rslora=defaults.use_rslora)
    key = re.escape(piece.module)
    if rank != defaults.rank:
        peft_config["rank_pattern"][key] = rank
    if alpha != defaults.alpha:
        peft_config["alpha_pattern"][key] = alpha


def _trained_tensors(
    pieces: list[Piece], targeted: set[str]
) -> tuple[dict[str, np.ndarray], str, set[str], list[str]]:
    """Tensors of the fully trained leaves, PEFT's ``bias`` mode, modules_to_save, problems."""
    by_module: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_module.setdefault(piece.module, []).append(piece)
    tensors: dict[str, np.ndarray] = {}
    to_save: set[str] = set()
    problems: list[str] = []
    bias_modes: set[str] = set()
    written: dict[str, str] = {}  # tensor key -> the leaf it came from
    for module, leaves in by_module.items():
        only_biases = all(leaf_name(p.path) == "bias" for p in leaves)
        if only_biases and module in targeted:
            prefix, bias_modes = f"{module}.base_layer", bias_modes | {"lora_only"}
        elif only_biases:
            prefix, bias_modes = module, bias_modes | {"all"}
        else:
            prefix = module
            to_save.add(module)
        for piece in leaves:
            name = TORCH_PARAM.get(leaf_name(piece.path))
            if name is None:
                problems.append(
                    f"{piece.path}: no PyTorch parameter name for leaf {leaf_name(piece.path)!r}"
                )
                continue
            key = f"{PREFIX}{prefix}.{name}"
            if key in written:
                problems.append(
                    f"{key}: both {written[key]} and {piece.label} map to this PyTorch tensor "
                    "(expected one leaf per tensor)"
                )
                continue
            written[key] = piece.label
            value = np.asarray(piece.value)
            if leaf_name(piece.path) == "kernel" and value.ndim == 2:
                value = value.T  # Flax (in, out) -> torch Linear (out, in)
            tensors[key] = np.ascontiguousarray(value)
    bias = "all" if "all" in bias_modes else "lora_only" if bias_modes else "none"
    return tensors, bias, to_save, problems
