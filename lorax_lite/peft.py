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
A DoRA adapter (``use_dora: true``) adds ``lora_magnitude_vector`` ``(out,)``: PEFT's
norm of ``W + s B A`` over the input features of each output unit, which is
lorax_lite's ``m`` (the norm over the fan-in axis of the ``(in, out)`` kernel).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .checkpoint import base_of
from .config import LoraConfig
from .quant import is_quantized
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
    other fully trained leaves make their module one of ``modules_to_save``. Each file is
    written beside its final name and renamed into place, so a write that fails (a full
    disk) or is killed leaves the previous file whole.

    DoRA adapters write their magnitude ``m`` as ``lora_magnitude_vector`` and set
    ``use_dora: true`` (PEFT's flag covers every module, so DoRA and plain adapters
    cannot share a file). PEFT always treats the norm as a constant in its backward
    pass, whatever ``dora_detach_norm`` is; the forward pass is the same.

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
            adapter whose layout PEFT cannot express, or naming the plain adapters of
            a tree that also holds DoRA ones.

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
    dora = [p for p, n in adapters if n.m is not None]
    if dora and len(dora) != len(adapters):
        plain = [p for p, n in adapters if n.m is None]
        problems.append(
            f"DoRA adapters ({', '.join(dora)}) and plain ones ({', '.join(plain)}) in one "
            "tree: PEFT's use_dora holds for every module of an adapter; export them apart"
        )
    problems += _shared_modules([p for p, _ in adapters], modules, "adapters")
    targeted = {modules[p] for p, _ in adapters}
    tensors, bias, to_save, trained_problems = _trained_tensors(trained, modules, targeted)
    problems += trained_problems
    if problems:
        raise ValueError("to_peft cannot export this tree:\n  " + "\n  ".join(problems))
    peft_config = _base_config(config, base_model_name_or_path)
    peft_config["use_dora"] = bool(dora)
    for path, node in adapters:
        tensors.update(_adapter_tensors(modules[path], path, node))
        _add_patterns(peft_config, config, modules[path], path, node)
    peft_config.update(
        target_modules=sorted(targeted), bias=bias, modules_to_save=sorted(to_save) or None
    )
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    _replace_atomically(
        directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, {"format": "pt"})
    )
    _replace_atomically(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    return directory


def _replace_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], Any]) -> None:
    """Writes ``path`` through a temporary file beside it, then renames it into place, so a
    failed or killed write leaves the previous file whole (and no temporary file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shared_modules(paths: list[str], modules: Mapping[str, str | None], what: str) -> list[str]:
    """A problem for each PyTorch module that the name map gives to several of ``paths``."""
    owners: dict[str, list[str]] = {}
    for path in paths:
        if modules.get(path):
            owners.setdefault(modules[path], []).append(path)
    return [
        f"{module}: the name map sends the {what} of {' and '.join(paths)} to this one "
        "PyTorch module (expected one leaf per module)"
        for module, paths in owners.items()
        if len(paths) > 1
    ]


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
    tensors = {f"{PREFIX}{module}.{n}": np.ascontiguousarray(x) for n, x in zip(names, (a, b))}
    if node.m is not None:
        tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.asarray(node.m)
    return tensors


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
    written: dict[str, str] = {}  # tensor key -> the leaf it came from
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
            key = f"{PREFIX}{prefix}.{name}"
            if key in written:
                problems.append(
                    f"{key}: both {written[key]} and {path} map to this PyTorch tensor "
                    "(expected one leaf per tensor)"
                )
                continue
            written[key] = path
            value = np.asarray(value)
            if leaf_name(path) == "kernel" and value.ndim == 2:
                value = value.T  # Flax (in, out) -> torch Linear (out, in)
            tensors[key] = np.ascontiguousarray(value)
    bias = "all" if "all" in bias_modes else "lora_only" if bias_modes else "none"
    return tensors, bias, to_save, problems


def from_peft(directory: str | pathlib.Path, params: Any, name_map: NameMap) -> Any:
    """Reads a PEFT LoRA adapter onto the JAX base ``params``.

    Every field of ``adapter_config.json`` that describes the weights is checked,
    and every tensor against it and against the base: floating dtypes, finite values,
    ``lora_A`` of shape ``(r, d_in)`` and ``lora_B`` of ``(d_out, r)`` with ``r`` the
    module's rank (``rank_pattern`` or ``r``), on a module ``target_modules`` names,
    whose base leaf is ``(d_in, d_out)`` (a Flax kernel or embedding; a transposed
    ``(d_out, d_in)`` leaf is refused, never silently reinterpreted).

    Args:
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        params: the base parameter tree whose leaf paths ``name_map`` maps.
        name_map: leaf path -> PyTorch module name, as a dict or a callable.

    With ``use_dora: true`` every adapted module needs its ``lora_magnitude_vector``
    ``(d_out,)``, read as DoRA's ``m`` (with the norm detached, as PEFT trains);
    embedding adapters are refused then (lorax_lite's DoRA has no embedding rule).

    Returns:
        The LoRA tree: adapted leaves as `LoraWeight` (scale from ``lora_alpha``,
        ``alpha_pattern`` and ``use_rslora``; ``m`` with DoRA), trained biases and
        ``modules_to_save`` parameters as `Trainable`.

    Raises:
        FileNotFoundError: if a file is missing (a pickled ``adapter_model.bin`` is
            never read).
        ValueError: naming the file: if it is not UTF-8 JSON or safetensors; listing
            every field of the configuration that is missing, of the wrong type or out
            of range, or that lorax_lite cannot represent (another PEFT type, a
            base modified by PiSSA/OLoRA/CorDA/LoftQ initialization); listing every
            tensor that maps to no base leaf, has a non-floating dtype, non-finite
            values or a shape that does not fit, and every leaf or tensor that two
            modules or two tensors would share.

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
    peft_config = read_peft_config(directory / CONFIG_NAME)
    tensors = _load_tensors(directory / WEIGHTS_NAME)
    params = base_of(params)
    base = dict(named_leaves(params, is_leaf=is_quantized))
    leaves_of, problems = _leaves_by_module(base, resolve_name_map(name_map))
    built, tensor_problems = _read_tensors(tensors, peft_config, base, leaves_of)
    problems += tensor_problems
    if problems:
        raise ValueError(
            f"from_peft cannot read {directory / WEIGHTS_NAME} onto the base with "
            f"{CONFIG_NAME}:\n  " + "\n  ".join(problems)
        )

    def rebuild(key_path, leaf):
        return built.get(path_str(key_path), leaf)

    return jax.tree_util.tree_map_with_path(rebuild, params, is_leaf=is_quantized)


# PEFT options that change what the weights mean, which lorax_lite does not represent.
UNSUPPORTED = ("lora_bias", "use_qalora")
UNSUPPORTED_IF_SET = (
    "layer_replication", "alora_invocation_tokens", "target_parameters", "trainable_token_indices"
)  # fmt: skip
# init_lora_weights values that leave the base weights as they were.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Those that train on a modified base (a residual or a quantized copy): the adapter does
# not fit the original base unless PEFT converted it when saving.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def read_peft_config(path: pathlib.Path) -> dict[str, Any]:
    """``adapter_config.json`` parsed and checked, with PEFT's defaults filled in.

    Raises:
        ValueError: naming ``path``: if it is not UTF-8 JSON holding an object, and
            listing every field that is missing, of the wrong type or unsupported.
    """
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not UTF-8 JSON ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(config), "a number")
        raise ValueError(f"{path}: expected a JSON object, found {kind}")
    defaults = {
        "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": None,
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
    }  # fmt: skip
    # PEFT writes null for an option left at its default.
    config = {**defaults, **{k: v for k, v in config.items() if v is not None or k not in defaults}}
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"{path}: invalid or unsupported fields:\n  " + "\n  ".join(problems))
    return config


def _config_problems(config: dict[str, Any]) -> list[str]:
    """One ``field: expected ..., found ...`` line for each bad field of a PEFT config."""
    problems = []

    def bad(field: str, expected: str) -> None:
        found = _json(config[field]) if field in config else "nothing (the field is missing)"
        problems.append(f"{field}: expected {expected}, found {found}")

    if config.get("peft_type") != "LORA":
        bad("peft_type", '"LORA"')
    if not _is_rank(config.get("r")):
        bad("r", "an int >= 1")
    if not _is_alpha(config.get("lora_alpha")):
        bad("lora_alpha", "a finite number > 0")
    dropout = config["lora_dropout"]
    if not (_is_real(dropout) and 0 <= dropout < 1):
        bad("lora_dropout", "a number in [0, 1)")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config[flag], bool):
            bad(flag, "true or false")
    for flag in UNSUPPORTED:
        if config.get(flag) is not None and config.get(flag) is not False:
            bad(flag, "false (lorax_lite adapters are plain LoRA)")
    for field in UNSUPPORTED_IF_SET:
        if config.get(field) not in (None, [], {}):
            bad(field, "null (lorax_lite adapters are plain LoRA)")
    if config["bias"] not in ("none", "all", "lora_only"):
        bad("bias", '"none", "all" or "lora_only"')
    problems += _pattern_problems(config, "rank_pattern", _is_rank, "an int >= 1")
    problems += _pattern_problems(config, "alpha_pattern", _is_alpha, "a finite number > 0")
    for field in ("target_modules", "modules_to_save"):
        names = config[field]
        if field == "target_modules" and isinstance(names, str):
            if _regex_error(names):
                bad(field, f"a valid regex ({_regex_error(names)})")
        elif names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            bad(field, "a list of module names" + (" or a regex" if field[0] == "t" else ""))
    problems += _init_problems(config["init_lora_weights"])
    return problems


def _init_problems(init: Any) -> list[str]:
    """``init_lora_weights`` must leave the base as it was (the adapter is read onto it)."""
    if isinstance(init, str) and init.split("_")[0] in BASE_CHANGING_INITS:
        return [
            f"init_lora_weights: expected one of {_json(PLAIN_INITS)}, found {_json(init)}, "
            "which trains on a modified base; save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion to convert it to plain LoRA"
        ]
    if any(init is v or (isinstance(init, str) and init == v) for v in PLAIN_INITS):
        return []
    return [f"init_lora_weights: expected one of {_json(PLAIN_INITS)}, found {_json(init)}"]


def _pattern_problems(
    config: dict[str, Any], field: str, valid: Callable[[Any], bool], expected: str
) -> list[str]:
    patterns = config[field]
    if not isinstance(patterns, dict):
        return [f"{field}: expected a JSON object {{regex: value}}, found {_json(patterns)}"]
    problems = [
        f"{field}[{_json(key)}]: expected {expected}, found {_json(value)}"
        for key, value in patterns.items()
        if not valid(value)
    ]
    problems += [
        f"{field}[{_json(key)}]: expected a valid regex ({error})"
        for key in patterns
        if (error := _regex_error(key))
    ]
    return problems


def _json(value: Any) -> str:
    """``value`` as written in JSON (``true``, ``null``, ``"LORA"``), for messages."""
    return json.dumps(value, ensure_ascii=False)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value: Any) -> bool:
    return _is_real(value) and 0 < value < math.inf


def _regex_error(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as err:
        return str(err)
    return None


def _load_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The safetensors file's arrays, keyed without PEFT's ``base_model.model.`` prefix."""
    try:
        tensors = load_file(path)
    except (SafetensorError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err})"
        ) from err
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _leaves_by_module(
    base: dict[str, Any], resolve: Callable[[str], str | None]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{module: {leaf name: leaf path}}``, and a problem for each module and leaf name
    that the name map gives to several leaves."""
    leaves_of: dict[str, dict[str, list[str]]] = {}
    for path in base:
        module = resolve(path)
        if module:
            leaves_of.setdefault(module, {}).setdefault(leaf_name(path), []).append(path)
    problems = [
        f"{module}: the name map sends {' and '.join(paths)} to this one PyTorch module "
        "(expected one leaf per module and parameter)"
        for module, names in leaves_of.items()
        for paths in names.values()
        if len(paths) > 1
    ]
    first = lambda names: {name: paths[0] for name, paths in names.items()}
    return {module: first(names) for module, names in leaves_of.items()}, problems


ADAPTER_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
MAGNITUDE = "lora_magnitude_vector"


def _read_tensors(
    tensors: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    base: dict[str, Any],
    leaves_of: dict[str, dict[str, str]],
) -> tuple[dict[str, Any], list[str]]:
    """``{leaf path: LoraWeight or Trainable}`` from the PEFT tensors, and problems."""
    built: dict[str, Any] = {}
    source: dict[str, str] = {}  # leaf path -> the tensor (or module) that fills it
    problems = [f"{key}: {problem}" for key, x in tensors.items() if (problem := _value_problem(x))]
    broken = {key for key, x in tensors.items() if _value_problem(x)}

    def claim(path: str, what: str) -> bool:
        if path in source:
            problems.append(f"{what} and {source[path]} both map to the base leaf {path}")
            return False
        source[path] = what
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
            path, problem = _weight_path(leaves_of.get(module, {}), module)
            if problem:
                problems.append(problem)
                continue
            a_t, b_t = tensors[key], tensors[f"{module}.{b_name}"]
            found = _factor_problems(module, (a_name, a_t), (b_name, b_t), path, base, peft_config)
            m_key = f"{module}.{MAGNITUDE}"
            used.add(m_key)
            found += _magnitude_problems(module, a_name, tensors.get(m_key), b_t, peft_config)
            if found or m_key in broken:
                problems += found
            elif claim(path, f"the adapter of {module}"):
                node = _lora_weight(base[path], a_t, b_t, module, peft_config)
                m = tensors.get(m_key)
                built[path] = node if m is None else dataclasses.replace(node, m=jnp.asarray(m))
    problems += [
        f"{key}: {MAGNITUDE} of a module with no lora_A/lora_B"
        for key in tensors
        if key.endswith("." + MAGNITUDE) and key not in used
    ]
    used |= {key for key in tensors if key.endswith("." + MAGNITUDE)}
    for key in sorted(set(tensors) - used - broken):
        module, _, param = key.rpartition(".")
        module = module.removesuffix(".base_layer")
        path = _param_path(leaves_of.get(module, {}), param)
        if path is None:
            problems.append(f"{key}: maps to no base leaf")
            continue
        value = tensors[key]
        if leaf_name(path) == "kernel" and value.ndim == 2:
            value = value.T  # torch Linear (out, in) -> Flax (in, out)
        if value.shape != np.shape(base[path]):
            problems.append(
                f"{key}: shape {value.shape}, the base leaf {path} has {np.shape(base[path])}"
            )
        elif claim(path, key):
            built[path] = Trainable(jnp.asarray(value))
    return built, problems


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


WEIGHT_NAMES = ("kernel", "embedding", "weight")


def _weight_path(leaves: dict[str, str], module: str) -> tuple[str | None, str | None]:
    """The module's weight leaf (``kernel``, ``embedding`` or ``weight``), or a problem."""
    found = [leaves[name] for name in WEIGHT_NAMES if name in leaves]
    if not found:
        return None, f"{module}: no 2-D base leaf maps to this module"
    if len(found) > 1:
        return None, f"{module}: the adapter fits several base leaves: {' and '.join(found)}"
    return found[0], None


def _param_path(leaves: dict[str, str], param: str) -> str | None:
    if param == "bias":
        return leaves.get("bias")
    if param == "weight":
        return next((leaves[n] for n in (*WEIGHT_NAMES, "scale") if n in leaves), None)
    return None


def _factor_problems(
    module: str,
    a: tuple[str, np.ndarray],
    b: tuple[str, np.ndarray],
    path: str,
    base: dict[str, Any],
    peft_config: dict[str, Any],
) -> list[str]:
    """What is wrong with one module's ``A (r, d_in)`` and ``B (d_out, r)``, if anything."""
    (a_name, a_t), (b_name, b_t) = a, b
    pattern = _pattern_key(peft_config["rank_pattern"], module)
    rank = peft_config["r"] if pattern is None else peft_config["rank_pattern"][pattern]
    source = "r" if pattern is None else f"rank_pattern[{_json(pattern)}]"
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
            f"{_json(peft_config['target_modules'])}"
        )
    if problems:
        return problems
    w = base[path]
    expected = (a_t.shape[1], b_t.shape[0])
    if np.shape(w) != expected or not jnp.issubdtype(w.dtype, jnp.floating):
        transposed = " (a transposed (out, in) weight)" if np.shape(w) == expected[::-1] else ""
        problems.append(
            f"{module}: {a_name} {a_t.shape} and {b_name} {b_t.shape} adapt a weight of "
            f"(d_in, d_out) = {expected}; the base leaf {path} is {w.dtype}{list(np.shape(w))}"
            f"{transposed}"
        )
    return problems


def _targeted(module: str, target_modules: Any) -> bool:
    """PEFT's test of whether ``target_modules`` names ``module``."""
    if target_modules is None:
        return True  # PEFT chose the modules by model type; the tensors name them
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _lora_weight(
    w: Any, a_t: np.ndarray, b_t: np.ndarray, module: str, peft_config: dict[str, Any]
) -> LoraWeight:
    """The `LoraWeight` for one module from PEFT's ``(r, in)`` and ``(out, r)`` factors."""
    rank = a_t.shape[0]
    alphas = peft_config["alpha_pattern"]
    pattern = _pattern_key(alphas, module)
    alpha = peft_config["lora_alpha"] if pattern is None else alphas[pattern]
    scale = alpha / (math.sqrt(rank) if peft_config["use_rslora"] else rank)
    dropout = float(peft_config["lora_dropout"])
    return LoraWeight(w, jnp.asarray(a_t.T), jnp.asarray(b_t.T), scale, Layout.dense(), dropout)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's pattern lookup: the first key matching the end of ``module`` at a dot boundary."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)
