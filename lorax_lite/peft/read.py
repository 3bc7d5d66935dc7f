"""`from_peft`: a PEFT adapter directory read onto a JAX base, every tensor checked."""

from __future__ import annotations

import dataclasses
import pathlib
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from ..atomic import current
from ..checks import raise_problems
from ..deprecation import renamed_keywords
from ..linear_regex import compile_pattern
from ..quant import is_quantized
from ..targets import leaf_name, named_leaves, path_str
from ..trees import base_of
from ..weight import Layout, LoraWeight, Trainable, scale_from_alpha
from .adapter_config import read_peft_config
from .format import (
    ADAPTER_PAIRS,
    CONFIG_NAME,
    FIELDS_DIGEST,
    LAYER,
    MAGNITUDE,
    PREFIX,
    STACKED,
    WEIGHT_FIELDS,
    WEIGHT_NAMES,
    WEIGHTS_NAME,
    NameMap,
    Piece,
    default_name_map,
    fields_digest,
    json_text,
    pattern_key,
    resolve_name_map,
)


@renamed_keywords(directory="path")
def from_peft(path: str | pathlib.Path, params: Any, name_map: NameMap = default_name_map) -> Any:
    """Reads a PEFT LoRA adapter onto the JAX base ``params``.

    Every field of ``adapter_config.json`` that describes the weights is checked, and
    every tensor against it and against the base: ``lora_A`` ``(r, d_in)`` and ``lora_B``
    ``(d_out, r)`` on a module ``target_modules`` names, whose base leaf is ``(d_in,
    d_out)`` (a transposed leaf is refused, never reinterpreted). A leaf whose name in
    ``name_map`` is a ``{layer}`` template gets its layers' tensors stacked back along its
    leading axis. With ``use_dora: true`` each ``lora_magnitude_vector`` becomes DoRA's ``m``.

    Args:
        path: the directory holding ``adapter_config.json`` and
            ``adapter_model.safetensors`` (``directory=`` before; warns). The base is always
            checked against the tensors' shapes (PEFT records no base fingerprint to check).
        params: the base parameter tree whose leaf paths ``name_map`` maps.
        name_map: leaf path -> PyTorch module name, or a ``{layer}`` template for a leaf
            of stacked layers, as a dict or a callable; by default `to_peft`'s.

    Returns:
        The LoRA tree: adapted leaves as `LoraWeight`, trained biases and ``modules_to_save``
        parameters as `Trainable`.

    Raises:
        FileNotFoundError: if a file is missing (a pickled ``adapter_model.bin`` is never
            read).
        ValueError: naming the file: if it is not UTF-8 JSON or safetensors; listing every
            field of the configuration that is missing, invalid or that lorax_lite cannot
            represent (another PEFT type, a base changed by PiSSA/OLoRA/CorDA/LoftQ init);
            listing every tensor that maps to no base leaf or does not fit it, every DoRA
            magnitude missing, misshapen or stray, and every stacked leaf whose layers are
            missing or differ in rank or alpha; if the tensors' header records another
            ``adapter_config.json`` than the one beside it (a directory mixing two exports).

    Example:
        >>> lora_params = ll.from_peft("/tmp/peft", params, names)  # doctest: +SKIP
    """
    directory = current(pathlib.Path(path).resolve())  # or the old one, mid-swap
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found; lorax_lite reads only safetensors adapters "
                "(never the pickled adapter_model.bin)"
            )
    peft_config = read_peft_config(directory / CONFIG_NAME)
    tensors, header = _load_tensors(directory / WEIGHTS_NAME)
    recorded = header.get(FIELDS_DIGEST)
    if recorded is not None and recorded != fields_digest(peft_config):
        raise ValueError(
            f"{directory}: {WEIGHTS_NAME} was written with another {CONFIG_NAME} (its fields "
            f"{', '.join(WEIGHT_FIELDS)} differ from those recorded in the tensors' header "
            f"as {FIELDS_DIGEST}): the directory mixes two exports; export it again"
        )
    params = base_of(params)
    base = dict(named_leaves(params, is_leaf=is_quantized))
    resolve = resolve_name_map(name_map)
    leaves_of, problems = _leaves_by_module(base, resolve)
    pieces, tensor_problems = _read_tensors(tensors, peft_config, base, leaves_of)
    problems += tensor_problems
    built, stack_problems = _stack_layers(pieces, base, resolve)
    problems += stack_problems
    raise_problems(
        f"from_peft cannot read {directory / WEIGHTS_NAME} onto the base with {CONFIG_NAME}",
        problems,
    )

    def rebuild(key_path, leaf):
        return built.get(path_str(key_path), leaf)

    return jax.tree_util.tree_map_with_path(rebuild, params, is_leaf=is_quantized)


def _load_tensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The safetensors file's arrays, keyed without PEFT's ``base_model.model.`` prefix,
    and its header's metadata."""
    try:
        tensors = load_file(path)
        with safe_open(path, "np") as f:
            header = f.metadata() or {}
    except (SafetensorError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err})"
        ) from err
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}, header


def _leaves_by_module(
    base: dict[str, Any], resolve: Callable[[str], str | None]
) -> tuple[dict[str, dict[str, Piece]], list[str]]:
    """``{module: {leaf name: piece}}`` (one piece per layer of a leaf whose name is a
    ``{layer}`` template), and a problem for each module and leaf name that the name map
    gives to several leaves."""
    leaves_of: dict[str, dict[str, list[Piece]]] = {}
    problems = []
    for path, leaf in base.items():
        module = resolve(path)
        if not module:
            continue
        if LAYER in module and not np.shape(leaf):
            problems.append(
                f"{path}: the name map gives the per-layer template {module!r}, but the leaf "
                "has no axes"
            )
            continue
        layers = range(np.shape(leaf)[0]) if LAYER in module else [None]
        for layer in layers:
            name = module if layer is None else module.replace(LAYER, str(layer))
            leaves_of.setdefault(name, {}).setdefault(leaf_name(path), []).append(
                Piece(path, layer, name, None)
            )
    problems += [
        f"{module}: the name map sends {' and '.join(p.label for p in pieces)} to this one "
        "PyTorch module (expected one leaf per module and parameter)"
        for module, names in leaves_of.items()
        for pieces in names.values()
        if len(pieces) > 1
    ]
    first = lambda names: {name: pieces[0] for name, pieces in names.items()}
    return {module: first(names) for module, names in leaves_of.items()}, problems


def _read_tensors(
    tensors: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    base: dict[str, Any],
    leaves_of: dict[str, dict[str, Piece]],
) -> tuple[dict[tuple[str, int | None], Any], list[str]]:
    """``{(leaf path, layer): LoraWeight or Trainable}`` from the PEFT tensors (the
    `LoraWeight` of a layer has no ``w``), and problems."""
    built: dict[tuple[str, int | None], Any] = {}
    source: dict[tuple[str, int | None], str] = {}  # the tensor (or module) filling a piece
    problems = [f"{key}: {problem}" for key, x in tensors.items() if (problem := _value_problem(x))]
    broken = {key for key, x in tensors.items() if _value_problem(x)}

    def claim(piece: Piece, what: str) -> bool:
        at = (piece.path, piece.layer)
        if at in source:
            problems.append(f"{what} and {source[at]} both map to the base leaf {piece.label}")
            return False
        source[at] = what
        return True

    used = set()
    for a_name, b_name in ADAPTER_PAIRS:
        for key in [k for k in tensors if k.endswith("." + b_name)]:
            if key.removesuffix(b_name) + a_name not in tensors:
                problems.append(f"{key}: {b_name} without {a_name}")
                used.add(key)
        for key in [k for k in tensors if k.endswith("." + a_name)]:
            module = key.removesuffix("." + a_name)
            used |= {key, f"{module}.{b_name}"}
            if f"{module}.{b_name}" not in tensors:
                problems.append(f"{key}: {a_name} without {b_name}")
                continue
            if {key, f"{module}.{b_name}"} & broken:
                continue
            piece = _weight_piece(leaves_of.get(module, {}), module)
            if isinstance(piece, str):
                problems.append(piece)
                continue
            a_t, b_t = tensors[key], tensors[f"{module}.{b_name}"]
            found = _factor_problems(module, (a_name, a_t), (b_name, b_t), piece, base, peft_config)
            m_key = f"{module}.{MAGNITUDE}"
            used.add(m_key)
            found += _magnitude_problems(module, a_name, tensors.get(m_key), b_t, peft_config)
            if found or m_key in broken:
                problems += found
            elif claim(piece, f"the adapter of {module}"):
                w = base[piece.path] if piece.layer is None else None
                node = _lora_weight(w, a_t, b_t, module, peft_config)
                m = tensors.get(m_key)
                node = node if m is None else dataclasses.replace(node, m=jnp.asarray(m))
                built[piece.path, piece.layer] = node
    problems += [
        f"{key}: {MAGNITUDE} of a module with no lora_A/lora_B"
        for key in tensors
        if key.endswith("." + MAGNITUDE) and key not in used
    ]
    used |= {key for key in tensors if key.endswith("." + MAGNITUDE)}
    for key in sorted(set(tensors) - used - broken):
        module, _, param = key.rpartition(".")
        module = module.removesuffix(".base_layer")
        target = _param_piece(leaves_of.get(module, {}), param)
        if target is None:
            problems.append(f"{key}: maps to no base leaf")
            continue
        value = tensors[key]
        if leaf_name(target.path) == "kernel" and value.ndim == 2:
            value = value.T  # torch Linear (out, in) -> Flax (in, out)
        shape = _piece_shape(base, target)
        if value.shape != shape:
            problems.append(f"{key}: shape {value.shape}, the base leaf {target.label} has {shape}")
        elif claim(target, key):
            built[target.path, target.layer] = Trainable(jnp.asarray(value))
    return built, problems


def _piece_shape(base: dict[str, Any], piece: Piece) -> tuple[int, ...]:
    """The shape of a base leaf, or of one layer of it."""
    shape = tuple(np.shape(base[piece.path]))
    return shape if piece.layer is None else shape[1:]


def _stack_layers(
    built: dict[tuple[str, int | None], Any],
    base: dict[str, Any],
    resolve: Callable[[str], str | None],
) -> tuple[dict[str, Any], list[str]]:
    """``{leaf path: LoraWeight or Trainable}``: whole leaves as read, layers stacked."""
    nodes: dict[str, Any] = {}
    layers: dict[str, dict[int, Any]] = {}
    for (path, layer), node in built.items():
        if layer is None:
            nodes[path] = node
        else:
            layers.setdefault(path, {})[layer] = node
    problems = []
    for path, by_layer in layers.items():
        template = cast(str, resolve(path))  # the pieces of layers came from a template
        node, problem = _stacked_node(path, template, by_layer, base[path])
        if problem:
            problems.append(problem)
        else:
            nodes[path] = node
    return nodes, problems


def _stacked_node(
    path: str, template: str, by_layer: dict[int, Any], w: Any
) -> tuple[Any, str | None]:
    """The stacked `LoraWeight` or `Trainable` of a leaf's layers, or a problem naming
    the layers that are missing or differ from the others."""
    count = np.shape(w)[0]
    name = lambda i: template.replace(LAYER, str(i))
    missing = [name(i) for i in range(count) if i not in by_layer]
    if missing:
        return None, (
            f"{path}: stacks {count} layers, but {len(missing)} of their modules have no "
            f"tensors: {', '.join(missing)} (expected every layer)"
        )
    nodes = [by_layer[i] for i in range(count)]
    odd = _odd_layers([type(n).__name__ for n in nodes], name, "")
    if odd:
        return None, f"{path}: its layers must all be adapters or all trained in full; {odd}"
    for what in ("rank", "scale") if isinstance(nodes[0], LoraWeight) else ():
        odd = _odd_layers([getattr(n, what) for n in nodes], name, what + " ")
        if odd:
            return None, f"{path}: its layers must share one {what}; {odd}"
    stacked = jax.tree_util.tree_map(lambda *layers: jnp.stack(layers), *nodes)
    if isinstance(stacked, LoraWeight):
        stacked = dataclasses.replace(stacked, w=w, layout=STACKED)
    return stacked, None


def _odd_layers(values: list[Any], name: Callable[[int], str], what: str) -> str | None:
    """``"rank 8 in 29 layers, but rank 16 in model.layers.3.mlp.up_proj"`` when ``values``
    (one per layer) differ, else None."""
    common, n = Counter(values).most_common(1)[0]
    if n == len(values):
        return None
    odd = [f"{what}{v} in {name(i)}" for i, v in enumerate(values) if v != common]
    return f"{what}{common} in {n} layers, but {', '.join(odd)}"


def _magnitude_problems(
    module: str, a_name: str, m: np.ndarray | None, b_t: np.ndarray, peft_config: dict[str, Any]
) -> list[str]:
    """What is wrong with a module's DoRA magnitude (or its absence), if anything."""
    key = f"{module}.{MAGNITUDE}"
    if not peft_config["use_dora"]:
        return [] if m is None else [f"{key}: present, but {CONFIG_NAME} has use_dora false"]
    if a_name != "lora_A.weight":
        return [f"{module}: an embedding adapter with use_dora (lorax_lite's DoRA has none)"]
    if m is None:
        return [f"{module}: use_dora is true but {MAGNITUDE} is missing"]
    if m.shape != (b_t.shape[0],):
        return [f"{key}: shape {m.shape}, expected ({b_t.shape[0]},) (lora_B's d_out)"]
    return []


def _value_problem(x: np.ndarray) -> str | None:
    """What makes a tensor unusable as a weight: its dtype or non-finite values."""
    if not jnp.issubdtype(x.dtype, jnp.floating):  # np.issubdtype rejects bfloat16
        return f"dtype {x.dtype}, expected a floating dtype"
    if not np.isfinite(x).all():
        return f"holds {np.size(x) - np.isfinite(x).sum()} NaN or inf values, expected finite"
    return None


def _weight_piece(leaves: dict[str, Piece], module: str) -> Piece | str:
    """The module's weight leaf (``kernel``, ``embedding`` or ``weight``), or the problem."""
    found = [leaves[name] for name in WEIGHT_NAMES if name in leaves]
    if not found:
        return f"{module}: no 2-D base leaf maps to this module"
    if len(found) > 1:
        labels = " and ".join(p.label for p in found)
        return f"{module}: the adapter fits several base leaves: {labels}"
    return found[0]


def _param_piece(leaves: dict[str, Piece], param: str) -> Piece | None:
    if param == "bias":
        return leaves.get("bias")
    if param == "weight":
        return next((leaves[n] for n in (*WEIGHT_NAMES, "scale") if n in leaves), None)
    return None


def _factor_problems(
    module: str,
    a: tuple[str, np.ndarray],
    b: tuple[str, np.ndarray],
    piece: Piece,
    base: dict[str, Any],
    peft_config: dict[str, Any],
) -> list[str]:
    """What is wrong with one module's ``A (r, d_in)`` and ``B (d_out, r)``, if anything."""
    (a_name, a_t), (b_name, b_t) = a, b
    pattern = pattern_key(peft_config["rank_pattern"], module)
    rank = peft_config["r"] if pattern is None else peft_config["rank_pattern"][pattern]
    source = "r" if pattern is None else f"rank_pattern[{json_text(pattern)}]"
    problems = []
    for name, tensor, rank_axis in ((a_name, a_t, 0), (b_name, b_t, 1)):
        if tensor.ndim != 2:
            problems.append(f"{module}.{name}: shape {tensor.shape}, expected 2 axes")
        elif tensor.shape[rank_axis] != rank:
            problems.append(
                f"{module}.{name}: rank {tensor.shape[rank_axis]} (shape {tensor.shape}), "
                f"{CONFIG_NAME}'s {source} gives {rank}"
            )
    if not _targeted(module, peft_config["target_modules"]):
        problems.append(
            f"{module}: has {a_name}/{b_name} but is not in {CONFIG_NAME}'s target_modules "
            f"{json_text(peft_config['target_modules'])}"
        )
    if problems:
        return problems
    dtype, shape = base[piece.path].dtype, _piece_shape(base, piece)
    expected = (a_t.shape[1], b_t.shape[0])
    if shape != expected or not jnp.issubdtype(dtype, jnp.floating):
        transposed = " (a transposed (out, in) weight)" if shape == expected[::-1] else ""
        problems.append(
            f"{module}: {a_name} {a_t.shape} and {b_name} {b_t.shape} adapt a weight of "
            f"(d_in, d_out) = {expected}; the base leaf {piece.label} is {dtype}{list(shape)}"
            f"{transposed}"
        )
    return problems


def _targeted(module: str, target_modules: Any) -> bool:
    """PEFT's test of whether ``target_modules`` names ``module``."""
    if target_modules is None:
        return True  # PEFT chose the modules by model type; the tensors name them
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or compile_pattern(target_modules).fullmatch(module)
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _lora_weight(
    w: Any, a_t: np.ndarray, b_t: np.ndarray, module: str, peft_config: dict[str, Any]
) -> LoraWeight:
    """The `LoraWeight` for one module from PEFT's ``(r, in)`` and ``(out, r)`` factors
    (``w`` is None for one layer of a stacked leaf)."""
    rank = a_t.shape[0]
    alphas = peft_config["alpha_pattern"]
    pattern = pattern_key(alphas, module)
    alpha = peft_config["lora_alpha"] if pattern is None else alphas[pattern]
    scale = scale_from_alpha(alpha, rank, rslora=peft_config["use_rslora"])
    dropout = float(peft_config["lora_dropout"])
    return LoraWeight(w, jnp.asarray(a_t.T), jnp.asarray(b_t.T), scale, Layout.dense(), dropout)
