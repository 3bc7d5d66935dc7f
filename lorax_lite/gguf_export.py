"""Writing a fine-tuned model back as a GGUF file, for llama.cpp.

`gguf_tensors` merges a tree's adapters into the weights of the GGUF file the model was
read from and maps them to the file's tensor names, layout and (``llama``) query/key row
order. `write_gguf` copies that source file: its metadata (architecture,
hyper-parameters, tokenizer, chat template) and every tensor it is not given, as they
are; the given tensors are stored ``F16``, ``Q8_0`` or re-quantized ``Q4_1``
(``gguf.quants.quantize``, as llama.cpp's reference quantizer), 1-D tensors (norms)
``F32``. Both need the ``gguf`` package (``pip install lorax_lite[experiments]``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from .atomic import replace_file
from .checks import raise_problems
from .peft.format import LAYER, NameMap, resolve_name_map
from .targets import named_leaves
from .trees import lora_tree
from .weight import LoraWeight, Trainable, is_lora_node

TENSOR_TYPES = ("F32", "F16", "Q8_0", "Q4_1")
"""How `write_gguf` may store the given tensors."""
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's LlamaFileType
_BLOCK = 32  # weights a Q8_0 / Q4_1 block


LLAMA_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
"""Hugging Face's Llama projection modules and llama.cpp's tensor kinds (``blk.N.KIND.weight``),
the default names of `gguf_tensors`."""
# The tensor kinds whose rows llama.cpp's converter permuted for RoPE on interleaved pairs,
# and the metadata key of their head count (`llama_row_order`).
_PERMUTED = {"attn_q": "llama.attention.head_count", "attn_k": "llama.attention.head_count_kv"}
_LAYER_INDEX = re.compile(r"(?:^|.*[._])(\d+)$")  # "3", "layers_3", "layers.3"


def llama_row_order(rows: int, n_head: int) -> np.ndarray:
    """Where each Hugging Face row of a llama query/key weight is in the GGUF file.

    llama.cpp's converter interleaves each head's rows for RoPE on pairs: within a head of
    ``hd`` rows, Hugging Face's row ``j * hd / 2 + i`` is the file's row ``2 i + j``. So
    ``hf = gguf[order]`` and ``gguf = hf[np.argsort(order)]``.

    Args:
        rows: the weight's rows (``n_head * head_dim``).
        n_head: the heads of the projection (query heads, or key/value heads).

    Returns:
        ``order``, an integer array of ``rows`` indices.

    Raises:
        ValueError: if ``rows`` is not whole row pairs per head.
    """
    if n_head < 1 or rows % (2 * n_head):
        raise ValueError(f"expected rows a multiple of 2 * n_head = {2 * n_head}, got {rows} rows")
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def gguf_tensors(
    tree: Any, source: str | os.PathLike[str], *, name_map: NameMap | None = None
) -> dict[str, np.ndarray]:
    """The adapters of ``tree`` merged into ``source``'s weights, under their GGUF names.

    Each adapted leaf's base is read from ``source`` (``gguf.quants.dequantize``), so
    ``tree`` may be an adapter alone (``ll.load_adapter(path)``). The file's tensors are
    put in the leaf's layout (query/key rows in Hugging Face's order, transposed to the
    leaf's fan-in and fan-out axes, layers along its stack axis), merged as `merge`
    merges the node (DoRA, rsLoRA), and put back in the file's ``(out, in)`` layout and
    row order, one tensor per layer: what `write_gguf` takes.

    Only ``llama`` files are read: llama.cpp's converter permuted their query and key
    rows (``attn_q``, ``attn_k``: `~lorax_lite.gguf_export.llama_row_order`), and
    ``tree``'s are taken in Hugging Face's order (rotate-half RoPE, as transformers).

    Args:
        tree: a LoRA tree, a `TrainState`, or an adapter alone.
        source: the GGUF file the model came from.
        name_map: leaf path (or module path) -> GGUF tensor name, a ``{layer}`` template
            for a leaf with a stack axis (``{"blocks/attn/wq/kernel":
            "blk.{layer}.attn_q.weight"}``), or a callable returning the name or None.
            Leaves it does not name get the default: a path through one of
            `~lorax_lite.gguf_export.LLAMA_NAMES`' modules becomes
            ``blk.N.KIND.weight``, ``N`` the index along the stack axis or the one
            integer in the path (``layers_3``, ``layers.3``).

    Returns:
        ``{GGUF tensor name: merged float32 array (out, in)}``, one per layer of each
        adapted leaf.

    Raises:
        ValueError: for a file of another architecture than ``llama``; listing every
            problem at once: adapted leaves without a GGUF name, names not in
            ``source``, shapes that differ, leaves trained in full, leaves whose base
            is a residual (PiSSA, OLoRA, LoftQ), non-finite merged values; a tree
            without adapters.
        ImportError: without the ``gguf`` package.

    Example:
        >>> tensors = gguf_tensors(ll.load_adapter("run/adapter"), "model.gguf")  # doctest: +SKIP
        >>> write_gguf("tuned.gguf", "model.gguf", tensors)  # doctest: +SKIP
    """
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"gguf_tensors: {source} holds a {architecture!r} model; only 'llama' files are "
            "supported (their query/key row order is llama.cpp's, see llama_row_order)"
        )
    heads = {kind: _field(reader, key) for kind, key in _PERMUTED.items()}
    heads["attn_k"] = heads["attn_k"] or heads["attn_q"]
    file = {t.name: t for t in reader.tensors}
    named = resolve_name_map(name_map) if name_map is not None else lambda path: None
    tensors: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}  # GGUF name -> the leaf path that gave it
    problems: list[str] = []
    for path, node in named_leaves(lora_tree(tree), is_leaf=is_lora_node):
        if isinstance(node, Trainable) and node.value is not None:
            problems.append(
                f"{path}: trained in full; gguf_tensors merges adapters only (write it "
                "with write_gguf under its GGUF name)"
            )
        if not isinstance(node, LoraWeight) or node.a is None:
            continue
        shape = jax.eval_shape(node.delta).shape  # the weight's (w is None in an adapter alone)
        names, problem = _tensor_names(path, node, shape, named(path))
        if problem is None:
            problem = _leaf_problem(node)
        if problem is not None:
            problems.append(f"{path}: {problem}")
            continue
        taken = [f"{name}: also the name of {owners[name]}" for name in names if name in owners]
        merged, leaf_problems = _merged(node, shape, names, file, heads, gguf.quants.dequantize)
        problems += [f"{path}: {p}" for p in taken + leaf_problems]
        owners |= dict.fromkeys(names, path)
        tensors |= merged
    if not problems and not tensors:
        problems.append("the tree holds no adapter (LoraWeight with factors)")
    raise_problems(f"gguf_tensors({source})", problems)
    return tensors


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _tensor_names(
    path: str, node: LoraWeight, shape: tuple[int, ...], given: str | None
) -> tuple[list[str], str | None]:
    """The GGUF tensor names of a leaf, one per layer of its stack axis (or one), or why
    there are none."""
    stacked = bool(node.layout.stack)
    name = given or _default_name(path, stacked)
    if name is None:
        return [], (
            f"no GGUF tensor name: the path has none of the modules {sorted(LLAMA_NAMES)} "
            "with one layer index (a stack axis or one integer in the path); name it in "
            f"name_map (e.g. 'blk.{LAYER}.attn_q.weight')"
        )
    if stacked != (LAYER in name):
        why = "stacked along a layer axis" if stacked else "not stacked"
        need = "needs" if stacked else "must not have"
        return [], f"{why}: the GGUF name {name!r} {need} a {LAYER} template"
    if not stacked:
        return [name], None
    layers = shape[node.layout.stack[0]]
    return [name.replace(LAYER, str(i)) for i in range(layers)], None


def _default_name(path: str, stacked: bool) -> str | None:
    """``blk.N.KIND.weight`` for a path through one of `LLAMA_NAMES`' modules, ``N`` its
    layer: the template's ``{layer}`` for a stacked leaf, else the path's one integer."""
    parts = path.split("/")
    kinds = [LLAMA_NAMES[p] for p in parts if p in LLAMA_NAMES]
    layers = [m.group(1) for m in map(_LAYER_INDEX.match, parts) if m]
    if len(kinds) != 1 or len(layers) != (0 if stacked else 1):
        return None
    return f"blk.{LAYER if stacked else int(layers[0])}.{kinds[0]}.weight"


def _leaf_problem(node: LoraWeight) -> str | None:
    """Why a leaf's merge is not the file's weight plus its adapter, if it is not."""
    if len(node.layout.stack) > 1:
        return f"axis roles {node.layout.roles()}: one stack (layer) axis at most"
    if node.residual_init is not None:
        return (
            f"initialized with init={node.residual_init!r}: its base is a residual, not "
            "the file's weights; merge the full tree (ll.merge) and give write_gguf its tensors"
        )
    return None


def _merged(
    node: LoraWeight,
    shape: tuple[int, ...],
    names: list[str],
    file: Mapping[str, Any],
    heads: Mapping[str, int | None],
    dequantize: Callable[..., np.ndarray],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``node`` (a weight of ``shape``) merged into the file's tensors ``names`` (one per
    layer), in the file's layout, or the problems that prevent it."""
    layout = node.layout
    inner = tuple(shape[i] for i in layout.fan_in + layout.fan_out)
    d_in, d_out = math.prod(inner[: len(layout.fan_in)]), math.prod(inner[len(layout.fan_in) :])
    problems, layers, orders = [], [], []
    for name in names:
        kind = name.split(".")[-2] if "." in name else name
        order = None
        if name not in file:
            problems.append(f"{name} is not a tensor of the file")
            continue
        found = tuple(int(n) for n in reversed(file[name].shape.tolist()))
        if found != (d_out, d_in):
            problems.append(
                f"{name} is {found} (out, in); the adapter's weight {shape} needs ({d_out}, {d_in})"
            )
            continue
        if kind in _PERMUTED:
            n_head = heads[kind]
            if n_head is None:
                problems.append(f"{name}: the file has no {_PERMUTED[kind]} to order its rows")
                continue
            order = llama_row_order(d_out, n_head)
        w = np.asarray(dequantize(file[name].data, file[name].tensor_type), np.float32)
        w = w.reshape(d_out, d_in)
        layers.append((w if order is None else w[order]).T.reshape(inner))
        orders.append(order)
    if problems:
        return {}, problems
    axes = layout.stack + layout.fan_in + layout.fan_out
    base = (np.stack(layers) if layout.stack else layers[0]).transpose(np.argsort(axes))
    merged = np.asarray(dataclasses.replace(node, w=base).materialize(), np.float32)
    merged = merged.transpose(axes).reshape(len(names), d_in, d_out)
    tensors = {
        name: np.ascontiguousarray(w.T if order is None else w.T[np.argsort(order)])
        for name, w, order in zip(names, merged, orders)
    }
    bad = [name for name, w in tensors.items() if not np.isfinite(w).all()]
    if bad:
        return {}, [f"non-finite merged values (NaN or inf) in {', '.join(bad)}"]
    return tensors, []


def write_gguf(
    path: str | os.PathLike[str],
    source: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    *,
    tensor_type: str = "F16",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``source``'s model with ``tensors`` replaced, as a GGUF file at ``path``.

    Args:
        path: the file to write.
        source: the GGUF file the model came from; its metadata and the tensors not in
            ``tensors`` are copied as they are (``general.file_type`` becomes
            ``tensor_type``'s).
        tensors: ``{GGUF tensor name: array}`` in the file's layout (PyTorch's
            ``(out, in)`` for a linear weight, the shape ``source`` has), e.g. the merged
            weights mapped back to their GGUF names.
        tensor_type: ``"F16"``, ``"Q8_0"``, ``"Q4_1"`` or ``"F32"``, for the given tensors
            of two or more axes; 1-D ones are stored ``F32``.
        overwrite: replace an existing ``path``.

    Returns:
        ``path``.

    Raises:
        ValueError: listing every problem at once: an unknown ``tensor_type``, names not
            in ``source``, shapes that differ from ``source``'s, rows that are not whole
            32-weight blocks for ``Q8_0``/``Q4_1``, non-finite values; or an existing
            ``path`` without ``overwrite``.
        ImportError: without the ``gguf`` package.

    Example:
        >>> write_gguf("tuned.gguf", "SmolLM2.Q4_1.gguf", {"blk.0.attn_q.weight": w},
        ...            tensor_type="Q8_0")  # doctest: +SKIP
    """
    import gguf

    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"write_gguf: {path} exists; pass overwrite=True to replace it")
    reader = gguf.GGUFReader(source)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    arrays = {name: np.asarray(x, np.float32) for name, x in tensors.items()}
    raise_problems(f"write_gguf({source})", _problems(arrays, shapes, tensor_type))

    def write(tmp: pathlib.Path) -> None:
        writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue  # the writer's own
            value = _FILE_TYPES[tensor_type] if field.name == "general.file_type" else None
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            value = field.contents() if value is None else value
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
        for t in reader.tensors:
            if t.name not in arrays:
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
                continue
            x = arrays[t.name]
            if x.ndim < 2 or tensor_type == "F32":
                writer.add_tensor(t.name, x)
            elif tensor_type == "F16":
                writer.add_tensor(t.name, x.astype(np.float16))
            else:
                kind = gguf.GGMLQuantizationType[tensor_type]
                writer.add_tensor(t.name, gguf.quants.quantize(x, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    replace_file(path, write)  # a failed or killed write leaves the old file whole
    return path


def _problems(
    arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], tensor_type: str
) -> list[str]:
    if tensor_type not in TENSOR_TYPES:
        return [f"tensor_type must be one of {TENSOR_TYPES}, got {tensor_type!r}"]
    problems = []
    for name, x in arrays.items():
        if name not in shapes:
            problems.append(f"{name}: not a tensor of the source file")
        elif x.shape != shapes[name]:
            problems.append(f"{name}: shape {x.shape}, the source file has {shapes[name]}")
        elif tensor_type in ("Q8_0", "Q4_1") and x.ndim > 1 and x.shape[-1] % _BLOCK:
            problems.append(f"{name}: {x.shape[-1]} columns are not whole {_BLOCK}-blocks")
        elif not np.isfinite(x).all():
            problems.append(f"{name}: non-finite values")
    return problems
