"""Writing a fine-tuned model back as a GGUF file, for llama.cpp.

`write_gguf` copies a source GGUF file (the one the model was read from): its metadata
(architecture, hyper-parameters, tokenizer, chat template) and every tensor it is not
given, as they are; the given tensors (the adapters merged into the base, `ll.merge`)
are stored ``F16``, ``Q8_0`` or re-quantized ``Q4_1`` (``gguf.quants.quantize``, as
llama.cpp's reference quantizer), 1-D tensors (norms) ``F32``. It needs the ``gguf``
package (``pip install lorax_lite[experiments]``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .atomic import replace_file
from .checks import raise_problems

TENSOR_TYPES = ("F32", "F16", "Q8_0", "Q4_1")
"""How `write_gguf` may store the given tensors."""
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's LlamaFileType
_BLOCK = 32  # weights a Q8_0 / Q4_1 block


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
