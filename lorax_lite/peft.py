"""The PEFT file format: ``adapter_config.json`` and ``adapter_model.safetensors``.

`to_peft` writes a LoRA tree so that Hugging Face PEFT loads it onto the PyTorch
version of the model; `from_peft` reads such a directory back onto a JAX base.
A ``name_map`` ties the two worlds: it maps a lorax_lite leaf path
(``params/encoder/layer_0/attention/query/kernel``) to the PyTorch module name
(``encoder.layer.0.attention.self.query``). Only JSON and safetensors are read,
never pickle.

Scanned layers: a leaf stacked along its leading axis (``nn.scan``'s
``params/layers/self_attn/q_proj/kernel`` of shape ``(n_layer, in, out)``) holds one
PyTorch module per layer. Its name in the map is a template with a ``{layer}``
field (``model.layers.{layer}.self_attn.q_proj``): `to_peft` unstacks the leaf into
``model.layers.0.self_attn.q_proj``, ``model.layers.1...`` and `from_peft` stacks
them back, every layer present with one rank and one scale.

Layouts: a PyTorch ``Linear`` weight is ``(out, in)``, and PEFT stores
``lora_A.weight`` as ``(r, in)`` and ``lora_B.weight`` as ``(out, r)``, so they are
``A.T`` and ``B.T``; an ``Embedding`` adapter is ``lora_embedding_A`` ``(r, vocab)``
and ``lora_embedding_B`` ``(dim, r)``. Weights with more than one fan-in or fan-out
axis (convolutions, ``DenseGeneral``) or stacked along another axis have no PEFT
equivalent and are refused.

DoRA: a DoRA adapter (``use_dora: true``) adds ``lora_magnitude_vector`` ``(out,)``:
PEFT's norm of ``W + s B A`` over the input features of each output unit, which is
lorax_lite's ``m`` (the norm over the fan-in axis of the ``(in, out)`` kernel). The ``m``
of a stacked leaf, ``(n_layer, out)``, is unstacked and stacked back with its layers,
one vector per layer's module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .atomic import current, replace_files
from .checks import is_int, is_number, is_positive
from .config import LoraConfig
from .decompose import RESIDUAL_INITS
from .deprecation import renamed_keywords
from .linear_regex import compile_pattern, pattern_error
from .quant import is_quantized
from .targets import leaf_name, module_of, named_leaves, path_str
from .trees import base_of, lora_tree
from .weight import (
    Layout,
    LoraWeight,
    Trainable,
    alpha_from_scale,
    is_lora_node,
    scale_from_alpha,
)

CONFIG_NAME = "adapter_config.json"
# The fields of adapter_config.json that from_peft reads into the tree, and the key of the
# tensors file's header recording their digest (`fields_digest`).
WEIGHT_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "target_modules", "bias", "modules_to_save",
)  # fmt: skip
FIELDS_DIGEST = "lorax_lite_config_sha256"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NameMap = Mapping[str, str] | Callable[[str], str | None]
# The field of a module name template that the layer index of a stacked leaf fills.
LAYER = "{layer}"
# The layout of a leaf stacked along its leading axis, as `init` gives a scanned kernel.
STACKED = Layout((0,), (1,), (2,))
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
    it does not map. A name holding ``{layer}`` is the template of a leaf stacked
    along its leading axis, one module per layer.
    """
    if isinstance(name_map, Mapping):
        return lambda path: name_map.get(path, name_map.get(module_of(path)))

    def call(path):
        try:
            return name_map(path)
        except KeyError:
            return None

    return call


class Piece(NamedTuple):
    """One PyTorch module's share of a leaf: the whole leaf, or one layer of a stack.

    Attributes:
        path: the leaf's path.
        layer: the index along the leaf's leading (layer) axis, or None for the whole leaf.
        module: the PyTorch module name (the template filled in with ``layer``).
        value: what `to_peft` writes, a 2-D `LoraWeight` (``w`` None for a layer) or an
            array; None in `from_peft`'s lookup of base leaves by module.
    """

    path: str
    layer: int | None
    module: str
    value: Any

    @property
    def label(self) -> str:
        """The leaf path, and the layer for a layer of a stack, for messages."""
        return self.path if self.layer is None else f"{self.path} (layer {self.layer})"


@renamed_keywords(directory="path")
def to_peft(
    path: str | pathlib.Path,
    tree: Any,
    config: LoraConfig,
    name_map: NameMap,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``tree``'s adapters in the PEFT LoRA format.

    ``target_modules`` lists the full PyTorch module names; ranks and alphas that
    differ from ``config.rank``/``config.alpha`` go to ``rank_pattern`` and
    ``alpha_pattern`` (keyed by escaped full module names). Fully trained biases
    are written as PEFT's trained biases (``bias`` is ``"lora_only"`` or ``"all"``);
    other fully trained leaves make their module one of ``modules_to_save``. Both files are
    written to a fresh sibling of ``path`` (with links to its other files) that is then
    renamed into place, so a write that fails (a full disk) or is killed at any point
    leaves the previous export or the new one, whole, never a mix of the two.

    Leaves of scanned layers (an adapter whose layout stacks the leading axis, or a
    fully trained leaf) are unstacked: their name in ``name_map`` is a template with a
    ``{layer}`` field, filled with each index of the leading axis
    (``model.layers.{layer}.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``, ...).
    An embedding adapter of a model whose head reuses the embedding (tied) acts on the head
    too in lorax_lite, while PEFT's acts on the lookup only: export adapters of untied
    weights for the same outputs.

    DoRA adapters write their magnitude ``m`` as ``lora_magnitude_vector`` (layer ``i`` of
    a stacked leaf writes ``m[i]``) and set ``use_dora: true`` (PEFT's flag covers every
    module, so DoRA and plain adapters cannot share a file). PEFT always treats the norm as
    a constant in its backward pass, whatever ``dora_detach_norm`` is; the forward pass is
    the same.

    Args:
        path: the output directory (created if missing; ``directory=`` before, which
            warns ``DeprecationWarning``).
        tree: a LoRA tree, or its trainable partition (base weights are not needed), or
            a `TrainState` (its ``.tree``), as every writer takes.
        config: the adapters' configuration (dropout, rsLoRA, default rank and alpha).
        name_map: leaf path -> PyTorch module name, or a ``{layer}`` template for a leaf
            of stacked layers, as a dict or a callable.
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.
        overwrite: replace an export already at ``path`` (as `save_adapter`'s; other
            files in the directory are always kept).

    Returns:
        The directory.

    Raises:
        ValueError: listing every leaf that the name map does not map, every adapter
            whose layout PEFT cannot express, every stacked leaf without a ``{layer}``
            template and every unstacked one with one; for adapters initialized with
            ``init="pissa"``/``"olora"`` (their base is a residual, not the original);
            naming the plain adapters of a tree that also holds DoRA ones; if ``path``
            holds an export (either file) and ``overwrite`` is False.

    Example:
        >>> names = {"params/layer_0/query": "encoder.layer.0.attention.self.query",
        ...          "params/layers/self_attn/q_proj": "model.layers.{layer}.self_attn.q_proj"}
        >>> ll.to_peft("/tmp/peft", lora_params, config, names)  # doctest: +SKIP
    """
    if config.init in RESIDUAL_INITS:
        raise ValueError(
            f"to_peft: these adapters were initialized with init={config.init!r}, which "
            "replaced each adapted base weight by its residual W - s*A0@B0, and a PEFT "
            "adapter is read onto the original weights; export ll.merge(tree) instead"
        )
    path = pathlib.Path(path)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (current(path.resolve()) / n).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"to_peft: {path} already holds an export ({', '.join(existing)}); pass "
            "overwrite=True to replace it"
        )
    pieces, problems = _pieces(lora_tree(tree), resolve_name_map(name_map))
    adapters = [p for p in pieces if isinstance(p.value, LoraWeight)]
    dora, dora_problems = _dora_mix(adapters)
    problems += dora_problems
    problems += _shared_modules(adapters, "adapters")
    targeted = {p.module for p in adapters}
    trained = [p for p in pieces if not isinstance(p.value, LoraWeight)]
    tensors, bias, to_save, trained_problems = _trained_tensors(trained, targeted)
    problems += trained_problems
    if problems:
        raise ValueError("to_peft cannot export this tree:\n  " + "\n  ".join(problems))
    peft_config = _base_config(config, base_model_name_or_path)
    peft_config["use_dora"] = dora
    for piece in adapters:
        tensors.update(_adapter_tensors(piece))
        _add_patterns(peft_config, config, piece)
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


def fields_digest(peft_config: dict[str, Any]) -> str:
    """The sha256 of the fields of ``adapter_config.json`` that say what the tensors mean,
    recorded in the tensors file's header: a config from another export (a directory
    mixing two) no longer matches it, while other fields may be edited by hand."""
    fields = {k: peft_config.get(k) for k in WEIGHT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _pieces(tree: Any, resolve: Callable[[str], str | None]) -> tuple[list[Piece], list[str]]:
    """The adapters (`LoraWeight` values) and fully trained arrays of ``tree``, one piece
    per PyTorch module, and a problem for each leaf that cannot be exported."""
    pieces, problems = [], []
    for path, node in named_leaves(tree, is_leaf=is_lora_node):
        if isinstance(node, LoraWeight) and node.a is not None:
            value = node
        elif isinstance(node, Trainable) and node.value is not None:
            value = node.value
        else:
            continue
        module = resolve(path)
        problem = _leaf_problem(path, value, module)
        if problem:
            problems.append(problem)
        else:
            pieces += _unstack(path, module, value)
    return pieces, problems


def _leaf_problem(path: str, value: Any, module: str | None) -> str | None:
    """Why a leaf cannot be exported under ``module``, if it cannot: no module, a layout
    PEFT cannot express, a stack without a ``{layer}`` template or a template without one."""
    if not module:
        return f"{path}: the name map gives no PyTorch module"
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


def _add_patterns(peft_config: dict, config: LoraConfig, piece: Piece) -> None:
    """Records the module's rank, and the alpha giving its scale, where they differ from the
    config's defaults. The alpha comes from the node's scale, not from matching the config's
    ``alpha_pattern`` (whose regexes may come from a checkpoint's file)."""
    node = piece.value
    rank = node.rank
    alpha = config.alpha
    if not math.isclose(config.scale_for(rank, alpha), node.scale, rel_tol=1e-6):
        # 12 significant digits: 32, not the 32.00000000000001 of s * sqrt(r) in floats.
        alpha = float(f"{alpha_from_scale(node.scale, rank, rslora=config.use_rslora):.12g}")
        alpha = int(alpha) if alpha.is_integer() else alpha
    key = re.escape(piece.module)
    if rank != config.rank:
        peft_config["rank_pattern"][key] = rank
    if alpha != config.alpha:
        peft_config["alpha_pattern"][key] = alpha


def _trained_tensors(
    pieces: list[Piece], targeted: set[str]
) -> tuple[dict[str, np.ndarray], str, set[str], list[str]]:
    """Tensors of the fully trained leaves, PEFT's ``bias`` mode, modules_to_save, problems."""
    by_module: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_module.setdefault(piece.module, []).append(piece)
    tensors, to_save, problems, bias_modes = {}, set(), [], set()
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


@renamed_keywords(directory="path")
def from_peft(path: str | pathlib.Path, params: Any, name_map: NameMap) -> Any:
    """Reads a PEFT LoRA adapter onto the JAX base ``params``.

    Every field of ``adapter_config.json`` that describes the weights is checked,
    and every tensor against it and against the base: floating dtypes, finite values,
    ``lora_A`` of shape ``(r, d_in)`` and ``lora_B`` of ``(d_out, r)`` with ``r`` the
    module's rank (``rank_pattern`` or ``r``), on a module ``target_modules`` names,
    whose base leaf is ``(d_in, d_out)`` (a Flax kernel or embedding; a transposed
    ``(d_out, d_in)`` leaf is refused, never silently reinterpreted).

    A leaf whose name in ``name_map`` is a ``{layer}`` template holds one module per
    index of its leading axis (``(n_layer, d_in, d_out)`` for a scanned kernel): the
    modules' tensors are stacked back along that axis, into a `LoraWeight` whose layout
    stacks axis 0 (as `init` gives a scanned kernel). Every layer must be present, with
    one rank and one alpha (PEFT's ``rank_pattern``/``alpha_pattern`` may name layers,
    as long as they agree across the layers of one leaf).

    With ``use_dora: true`` every adapted module needs its ``lora_magnitude_vector``
    ``(d_out,)``, read as DoRA's ``m`` (with the norm detached, as PEFT trains; the
    layers' vectors of a stacked leaf are stacked into ``m`` of ``(n_layer, d_out)``);
    embedding adapters are refused then (lorax_lite's DoRA has no embedding rule).

    Args:
        path: the directory holding ``adapter_config.json`` and
            ``adapter_model.safetensors`` (``directory=`` before, which warns
            ``DeprecationWarning``). The base is always checked against the tensors'
            shapes; PEFT records no fingerprint of its base, so there is no
            ``check_base`` to lift (`load_adapter`'s compares one).
        params: the base parameter tree whose leaf paths ``name_map`` maps.
        name_map: leaf path -> PyTorch module name, or a ``{layer}`` template for a leaf
            of stacked layers, as a dict or a callable.

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
            values or a shape that does not fit, every DoRA magnitude that is missing
            (with ``use_dora``), misshapen or stray, every leaf or tensor that two
            modules or two tensors would share, and every stacked leaf with layers
            missing or layers of different ranks or alphas (naming those layers).

        ValueError: if the tensors' header records (as `to_peft` writes) other values of
            the fields of ``adapter_config.json`` that give the tensors their meaning: the
            directory mixes two exports.

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
    if not is_int(config.get("r"), 1):
        bad("r", "an int >= 1")
    if not is_positive(config.get("lora_alpha")):
        bad("lora_alpha", "a finite number > 0")
    dropout = config["lora_dropout"]
    if not (is_number(dropout) and 0 <= dropout < 1):
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
    problems += _pattern_problems(config, "rank_pattern", lambda r: is_int(r, 1), "an int >= 1")
    problems += _pattern_problems(config, "alpha_pattern", is_positive, "a finite number > 0")
    for field in ("target_modules", "modules_to_save"):
        names = config[field]
        if field == "target_modules" and isinstance(names, str):
            if pattern_error(names):
                bad(field, f"a valid regex ({pattern_error(names)})")
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
        if (error := pattern_error(key) or pattern_error(_key_pattern(key)))
    ]
    return problems


def _json(value: Any) -> str:
    """``value`` as written in JSON (``true``, ``null``, ``"LORA"``), for messages."""
    return json.dumps(value, ensure_ascii=False)


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


ADAPTER_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
MAGNITUDE = "lora_magnitude_vector"


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
            piece, problem = _weight_piece(leaves_of.get(module, {}), module)
            if problem:
                problems.append(problem)
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
        piece = _param_piece(leaves_of.get(module, {}), param)
        if piece is None:
            problems.append(f"{key}: maps to no base leaf")
            continue
        value = tensors[key]
        if leaf_name(piece.path) == "kernel" and value.ndim == 2:
            value = value.T  # torch Linear (out, in) -> Flax (in, out)
        shape = _piece_shape(base, piece)
        if value.shape != shape:
            problems.append(f"{key}: shape {value.shape}, the base leaf {piece.label} has {shape}")
        elif claim(piece, key):
            built[piece.path, piece.layer] = Trainable(jnp.asarray(value))
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
    nodes, layers = {}, {}
    for (path, layer), node in built.items():
        if layer is None:
            nodes[path] = node
        else:
            layers.setdefault(path, {})[layer] = node
    problems = []
    for path, by_layer in layers.items():
        node, problem = _stacked_node(path, resolve(path), by_layer, base[path])
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


WEIGHT_NAMES = ("kernel", "embedding", "weight")


def _weight_piece(leaves: dict[str, Piece], module: str) -> tuple[Piece | None, str | None]:
    """The module's weight leaf (``kernel``, ``embedding`` or ``weight``), or a problem."""
    found = [leaves[name] for name in WEIGHT_NAMES if name in leaves]
    if not found:
        return None, f"{module}: no 2-D base leaf maps to this module"
    if len(found) > 1:
        labels = " and ".join(p.label for p in found)
        return None, f"{module}: the adapter fits several base leaves: {labels}"
    return found[0], None


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
    pattern = _pattern_key(alphas, module)
    alpha = peft_config["lora_alpha"] if pattern is None else alphas[pattern]
    scale = scale_from_alpha(alpha, rank, rslora=peft_config["use_rslora"])
    dropout = float(peft_config["lora_dropout"])
    return LoraWeight(w, jnp.asarray(a_t.T), jnp.asarray(b_t.T), scale, Layout.dense(), dropout)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's pattern lookup: the first key matching the end of ``module`` at a dot boundary
    (without backtracking: a key read from a file cannot make the lookup hang)."""
    return next((k for k in patterns if compile_pattern(_key_pattern(k)).fullmatch(module)), None)


def _key_pattern(key: str) -> str:
    r"""PEFT's ``re.match(rf"(.*\.)?({key})$", module)`` as a whole-name pattern."""
    return rf"(.*\.)?({key})"
