"""The PEFT file format: ``adapter_config.json`` and ``adapter_model.safetensors``.

`to_peft` writes a LoRA tree so that Hugging Face PEFT loads it onto the PyTorch
version of the model; `from_peft` reads such a directory back onto a JAX base.
A ``name_map`` ties the two worlds: it maps a lorax_lite leaf path
(``params/encoder/layer_0/attention/query/kernel``) to the PyTorch module name
(``encoder.layer.0.attention.self.query``). Only JSON and safetensors are read,
never pickle.

Layouts: a PyTorch ``Linear`` weight is ``(out, in)``, and PEFT stores
``lora_A.weight`` as ``(r, in)`` and ``lora_B.weight`` as ``(out, r)``, so they are
``A.T`` and ``B.T``; an ``Embedding`` adapter is ``lora_embedding_A`` ``(r, vocab)``
and ``lora_embedding_B`` ``(dim, r)``. Weights of more than two axes (stacked
layers, convolutions, ``DenseGeneral``) have no PEFT equivalent and are refused.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from .checkpoint import base_of
from .config import LoraConfig
from .targets import leaf_name, module_of, named_leaves, path_str
from .weight import Layout, LoraWeight, Trainable, is_lora_node

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NameMap = Mapping[str, str] | Callable[[str], str | None]
# lorax_lite leaf names and the PyTorch parameter names they become.
TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def default_name_map(path: str) -> str:
    """``params/encoder/layer_0/query/kernel`` -> ``encoder.layer_0.query``.

    The module path without a leading ``params`` collection, joined with dots.
    """
    module = module_of(path)
    return module.removeprefix("params/").replace("/", ".")


def resolve_name_map(name_map: NameMap) -> Callable[[str], str | None]:
    """A function ``leaf path -> torch module name or None`` from a dict or callable.

    A dict may be keyed by leaf paths or by module paths (the leaf path without its
    last component); a callable may return None or raise ``KeyError`` for leaves
    it does not map.
    """
    if isinstance(name_map, Mapping):
        return lambda path: name_map.get(path, name_map.get(module_of(path)))

    def call(path):
        try:
            return name_map(path)
        except KeyError:
            return None

    return call


def to_peft(
    directory: str | pathlib.Path,
    tree: Any,
    config: LoraConfig,
    name_map: NameMap,
    *,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Writes ``tree``'s adapters in the PEFT LoRA format.

    ``target_modules`` lists the full PyTorch module names; ranks and alphas that
    differ from ``config.rank``/``config.alpha`` go to ``rank_pattern`` and
    ``alpha_pattern`` (keyed by escaped full module names). Fully trained biases
    are written as PEFT's trained biases (``bias`` is ``"lora_only"`` or ``"all"``);
    other fully trained leaves make their module one of ``modules_to_save``.

    Args:
        directory: the output directory (created if missing).
        tree: a LoRA tree, or its trainable partition (base weights are not needed).
        config: the adapters' configuration (dropout, rsLoRA, default rank and alpha).
        name_map: leaf path -> PyTorch module name, as a dict or a callable.
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.

    Returns:
        The directory.

    Raises:
        ValueError: listing every leaf that the name map does not map and every
            adapter whose layout PEFT cannot express.

    Example:
        >>> names = {"params/layer_0/query": "encoder.layer.0.attention.self.query"}
        >>> ll.to_peft("/tmp/peft", lora_params, config, names)  # doctest: +SKIP
    """
    resolve = resolve_name_map(name_map)
    nodes = named_leaves(tree, is_leaf=is_lora_node)
    adapters = [(p, n) for p, n in nodes if isinstance(n, LoraWeight) and n.a is not None]
    trained = [(p, n.value) for p, n in nodes if isinstance(n, Trainable) and n.value is not None]
    modules = {p: resolve(p) for p, _ in [*adapters, *trained]}
    problems = [f"{p}: the name map gives no PyTorch module" for p, m in modules.items() if not m]
    problems += [problem for p, n in adapters if (problem := _layout_problem(p, n))]
    targeted = {modules[p] for p, _ in adapters}
    tensors, bias, to_save, trained_problems = _trained_tensors(trained, modules, targeted)
    problems += trained_problems
    if problems:
        raise ValueError("to_peft cannot export this tree:\n  " + "\n  ".join(problems))
    peft_config = _base_config(config, base_model_name_or_path)
    for path, node in adapters:
        tensors.update(_adapter_tensors(modules[path], path, node))
        _add_patterns(peft_config, config, modules[path], path, node)
    peft_config.update(
        target_modules=sorted(targeted), bias=bias, modules_to_save=sorted(to_save) or None
    )
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


def _layout_problem(path: str, node: LoraWeight) -> str | None:
    if node.layout.stack or len(node.layout.fan_in) != 1 or len(node.layout.fan_out) != 1:
        return (
            f"{path}: a weight with axis roles {node.layout.roles()} has no PEFT equivalent; "
            "PEFT's LoRA holds 2-D Linear and Embedding weights (unstack scanned layers, "
            "reshape multi-axis kernels to 2-D)"
        )
    return None


def _base_config(config: LoraConfig, base_model: str | None) -> dict[str, Any]:
    number = lambda x: int(x) if float(x).is_integer() else float(x)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": config.rank,
        "lora_alpha": number(config.alpha),
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _adapter_tensors(module: str, path: str, node: LoraWeight) -> dict[str, np.ndarray]:
    a, b = np.asarray(node.a).T, np.asarray(node.b).T  # (r, in) and (out, r)
    if leaf_name(path) == "embedding":
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        names = ("lora_A.weight", "lora_B.weight")
    return {f"{PREFIX}{module}.{n}": np.ascontiguousarray(x) for n, x in zip(names, (a, b))}


def _add_patterns(
    peft_config: dict, config: LoraConfig, module: str, path: str, node: LoraWeight
) -> None:
    """Records the module's rank and alpha where they differ from the config's defaults."""
    rank = node.rank
    alpha = config.alpha_for(path)
    if not math.isclose(config.scale_for(rank, alpha), node.scale, rel_tol=1e-6):
        alpha = node.scale * (math.sqrt(rank) if config.use_rslora else rank)
    key = re.escape(module)
    if rank != config.rank:
        peft_config["rank_pattern"][key] = rank
    if alpha != config.alpha:
        peft_config["alpha_pattern"][key] = alpha


def _trained_tensors(
    trained: list[tuple[str, Any]], modules: dict[str, str | None], targeted: set[str]
) -> tuple[dict[str, np.ndarray], str, set[str], list[str]]:
    """Tensors of the fully trained leaves, PEFT's ``bias`` mode, modules_to_save, problems."""
    by_module: dict[str, list[tuple[str, Any]]] = {}
    for path, value in trained:
        if modules[path]:
            by_module.setdefault(modules[path], []).append((path, value))
    tensors, to_save, problems, bias_modes = {}, set(), [], set()
    for module, leaves in by_module.items():
        only_biases = all(leaf_name(p) == "bias" for p, _ in leaves)
        if only_biases and module in targeted:
            prefix, bias_modes = f"{module}.base_layer", bias_modes | {"lora_only"}
        elif only_biases:
            prefix, bias_modes = module, bias_modes | {"all"}
        else:
            prefix = module
            to_save.add(module)
        for path, value in leaves:
            name = TORCH_PARAM.get(leaf_name(path))
            if name is None:
                problems.append(f"{path}: no PyTorch parameter name for leaf {leaf_name(path)!r}")
                continue
            value = np.asarray(value)
            if leaf_name(path) == "kernel" and value.ndim == 2:
                value = value.T  # Flax (in, out) -> torch Linear (out, in)
            tensors[f"{PREFIX}{prefix}.{name}"] = np.ascontiguousarray(value)
    bias = "all" if "all" in bias_modes else "lora_only" if bias_modes else "none"
    return tensors, bias, to_save, problems


def from_peft(directory: str | pathlib.Path, params: Any, name_map: NameMap) -> Any:
    """Reads a PEFT LoRA adapter onto the JAX base ``params``.

    Args:
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        params: the base parameter tree whose leaf paths ``name_map`` maps.
        name_map: leaf path -> PyTorch module name, as a dict or a callable.

    Returns:
        The LoRA tree: adapted leaves as `LoraWeight` (scale from ``lora_alpha``,
        ``alpha_pattern`` and ``use_rslora``), trained biases and ``modules_to_save``
        parameters as `Trainable`.

    Raises:
        FileNotFoundError: if a file is missing (a pickled ``adapter_model.bin`` is
            never read).
        ValueError: for a configuration lorax_lite cannot represent (DoRA, another
            PEFT type), listing every key that maps to no base leaf or whose shape
            does not fit.

    Example:
        >>> lora_params = ll.from_peft("/tmp/peft", params, names)  # doctest: +SKIP
    """
    directory = pathlib.Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found; lorax_lite reads only safetensors adapters "
                "(never the pickled adapter_model.bin)"
            )
    peft_config = json.loads((directory / CONFIG_NAME).read_text())
    _check_supported(directory, peft_config)
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(directory / WEIGHTS_NAME).items()}
    params = base_of(params)
    base = dict(named_leaves(params))
    resolve = resolve_name_map(name_map)
    leaves_of: dict[str, dict[str, str]] = {}
    for path in base:
        module = resolve(path)
        if module:
            leaves_of.setdefault(module, {})[leaf_name(path)] = path
    built, problems = _read_tensors(tensors, peft_config, base, leaves_of)
    if problems:
        raise ValueError(f"from_peft cannot read {directory}:\n  " + "\n  ".join(problems))

    def rebuild(key_path, leaf):
        return built.get(path_str(key_path), leaf)

    return jax.tree_util.tree_map_with_path(rebuild, params)


def _check_supported(directory: pathlib.Path, peft_config: dict[str, Any]) -> None:
    problems = []
    if peft_config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {peft_config.get('peft_type')!r}, not 'LORA'")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if peft_config.get(flag):
            problems.append(f"{flag} is set; lorax_lite adapters are plain LoRA")
    if problems:
        raise ValueError(f"Unsupported PEFT adapter {directory}:\n  " + "\n  ".join(problems))


def _read_tensors(
    tensors: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    base: dict[str, Any],
    leaves_of: dict[str, dict[str, str]],
) -> tuple[dict[str, Any], list[str]]:
    """``{leaf path: LoraWeight or Trainable}`` from the PEFT tensors, and problems."""
    built, problems, used = {}, [], set()
    pairs = (
        ("lora_A.weight", "lora_B.weight"),
        ("lora_embedding_A", "lora_embedding_B"),
    )
    for a_name, b_name in pairs:
        for key in [k for k in tensors if k.endswith("." + a_name)]:
            module = key.removesuffix("." + a_name)
            used |= {key, f"{module}.{b_name}"}
            path = _weight_path(leaves_of.get(module, {}))
            if path is None:
                problems.append(f"{module}: no 2-D base leaf maps to this module")
                continue
            if f"{module}.{b_name}" not in tensors:
                problems.append(f"{module}: {a_name} without {b_name}")
                continue
            a_t, b_t = tensors[key], tensors[f"{module}.{b_name}"]
            node, problem = _lora_weight(path, base[path], a_t, b_t, module, peft_config)
            built[path] = node
            problems += [problem] if problem else []
    for key in sorted(set(tensors) - used):
        module, _, param = key.rpartition(".")
        module = module.removesuffix(".base_layer")
        path = _param_path(leaves_of.get(module, {}), param)
        if path is None:
            problems.append(f"{key}: maps to no base leaf")
            continue
        value = tensors[key]
        if leaf_name(path) == "kernel" and value.ndim == 2:
            value = value.T
        if value.shape != np.shape(base[path]):
            problems.append(
                f"{key}: shape {value.shape}, the base leaf {path} has {np.shape(base[path])}"
            )
            continue
        built[path] = Trainable(jnp.asarray(value))
    return built, problems


def _weight_path(leaves: dict[str, str]) -> str | None:
    for name in ("kernel", "embedding", "weight"):
        if name in leaves:
            return leaves[name]
    return None


def _param_path(leaves: dict[str, str], param: str) -> str | None:
    if param == "bias":
        return leaves.get("bias")
    if param == "weight":
        return _weight_path(leaves) or leaves.get("scale")
    return None


def _lora_weight(
    path: str, w: Any, a_t: np.ndarray, b_t: np.ndarray, module: str, peft_config: dict[str, Any]
) -> tuple[LoraWeight | None, str | None]:
    """The `LoraWeight` for one module from PEFT's ``(r, in)`` and ``(out, r)`` factors."""
    rank, d_in, d_out = a_t.shape[0], a_t.shape[1], b_t.shape[0]
    if np.shape(w) == (d_in, d_out):
        layout = Layout.dense()
    elif np.shape(w) == (d_out, d_in):
        layout = Layout((), (1,), (0,))
    else:
        return None, (
            f"{module}: factors for a ({d_out}, {d_in}) torch weight, the base leaf {path} "
            f"has shape {np.shape(w)}"
        )
    if b_t.shape[1] != rank:
        return None, f"{module}: lora_A has rank {rank}, lora_B {b_t.shape[1]}"
    alpha = _pattern_value(
        peft_config.get("alpha_pattern") or {}, module, peft_config["lora_alpha"]
    )
    scale = alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)
    dropout = float(peft_config.get("lora_dropout", 0.0))
    node = LoraWeight(w, jnp.asarray(a_t.T), jnp.asarray(b_t.T), scale, layout, dropout)
    return node, None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key matching the end of ``module`` at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
