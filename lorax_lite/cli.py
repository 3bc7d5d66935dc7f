"""The ``lorax-lite`` command: inspect adapters, merge them into a base, export to PEFT
or to a GGUF file.

::

    lorax-lite inspect ADAPTER_OR_PEFT_DIR
    lorax-lite merge --base base.safetensors --adapter ADAPTER --out merged.safetensors
    lorax-lite export-peft --adapter ADAPTER --out PEFT_DIR [--name-map names.json]
    lorax-lite export-gguf --source model.gguf --adapter ADAPTER --out tuned.gguf
        [--tensor-type F16|Q8_0|Q4_1|F32] [--name-map names.json]

Base and merged parameters are safetensors files whose keys are the ``/``-joined
leaf paths (``params/encoder/layer_0/attention/query/kernel``). ``export-gguf`` merges
the adapter into the weights of the GGUF file the model came from (`gguf_tensors`) and
writes the model with `write_gguf`; it needs the ``gguf`` package.

No command writes over one of its inputs, and every output file is written to a
temporary file beside it and renamed into place, so an interrupted command leaves
the old file or the new one. An unreadable or invalid input ends the command with
one line ``lorax-lite: error: ...`` on stderr and exit status 2 (as argparse's own
usage errors).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .atomic import current, replace_file
from .checkpoint import adapter_metadata, load_adapter
from .checks import raise_problems
from .config import LoraConfig
from .gguf_export import TENSOR_TYPES, gguf_tensors, write_gguf
from .merging import merge
from .metadata import path_conflicts
from .peft import CONFIG_NAME, WEIGHTS_NAME, NameMap, default_name_map, to_peft
from .report import text_table
from .targets import named_leaves, unflatten

# The errors of bad inputs (files that are missing, unreadable, corrupted or invalid):
# reported in one line. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, TypeError, OSError, SafetensorError)
# The optional packages a command needs, and the extra that installs each.
EXTRAS = {"gguf": "experiments"}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success, 2 on an error).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` by default).

    Returns:
        The exit status.
    """
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except INPUT_ERRORS as err:
        print(f"lorax-lite: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in EXTRAS:
            raise
        print(
            f"lorax-lite: error: {args.command} needs the {err.name} package: "
            f"pip install 'lorax_lite[{EXTRAS[err.name]}]'",
            file=sys.stderr,
        )
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a list of problems joined with ``; ``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorax-lite",
        description="Inspect lorax_lite adapters, merge them into a base, export them to PEFT "
        "or to a GGUF file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print an adapter's config, paths and sizes")
    inspect.add_argument("path", type=pathlib.Path, help="adapter checkpoint or PEFT directory")
    inspect.set_defaults(run=inspect_command)
    merged = commands.add_parser("merge", help="merge an adapter into base weights")
    merged.add_argument("--base", type=pathlib.Path, required=True, help="base .safetensors")
    merged.add_argument("--adapter", type=pathlib.Path, required=True, help="adapter checkpoint")
    merged.add_argument("--out", type=pathlib.Path, required=True, help="merged .safetensors")
    merged.add_argument(
        "--no-check-base",
        action="store_true",
        help="allow a base other than the one the adapter was trained on (same shapes)",
    )
    merged.set_defaults(run=merge_command)
    export = commands.add_parser("export-peft", help="write an adapter in the PEFT format")
    export.add_argument("--adapter", type=pathlib.Path, required=True, help="adapter checkpoint")
    export.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
    export.add_argument(
        "--name-map",
        type=pathlib.Path,
        help="JSON {leaf or module path: torch module name}; default: the module path "
        "without 'params/', dot-joined",
    )
    export.add_argument("--base-model", help="base_model_name_or_path for adapter_config.json")
    export.set_defaults(run=export_command)
    to_gguf = commands.add_parser(
        "export-gguf", help="merge an adapter into a GGUF model and write it for llama.cpp"
    )
    to_gguf.add_argument("--source", type=pathlib.Path, required=True, help="the base .gguf")
    to_gguf.add_argument("--adapter", type=pathlib.Path, required=True, help="adapter checkpoint")
    to_gguf.add_argument("--out", type=pathlib.Path, required=True, help="the merged .gguf")
    to_gguf.add_argument(
        "--tensor-type",
        choices=TENSOR_TYPES,
        default="F16",
        help="how the merged tensors are stored (default F16); the file's other tensors "
        "are copied as they are",
    )
    to_gguf.add_argument(
        "--name-map",
        type=pathlib.Path,
        help="JSON {leaf or module path: GGUF tensor name, 'blk.{layer}.attn_q.weight' for a "
        "stacked leaf}; default: llama.cpp's names of the q/k/v/o/gate/up/down_proj modules",
    )
    to_gguf.set_defaults(run=export_gguf_command)
    return parser


def inspect_command(args: argparse.Namespace) -> None:
    """Prints the config, the adapted and trained paths with shapes and ranks, and sizes."""
    path = args.path
    if (path / CONFIG_NAME).is_file():
        _inspect_peft(path)
        return
    info = adapter_metadata(path)
    path = current(path.absolute())
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"adapter checkpoint {path} (format {info['format_version']}; saved with {versions})")
    print("config: " + json.dumps(info["config"], sort_keys=True))
    rows = [("path", "weight shape", "dtype", "rank", "scale", "axes", "adapter params")]
    n_adapter = 0
    for e in info["adapters"]:
        size = int(sum(np.prod(e[f]["shape"]) for f in ("a", "b", "m") if f in e))  # m: DoRA
        n_adapter += size
        rows.append(
            (e["path"], str(tuple(e["shape"])), e["dtype"], str(e["rank"]), f"{e['scale']:g}",
             ",".join(e["layout"]), f"{size:,}")
        )  # fmt: skip
    for e in info["trained"]:
        size = int(np.prod(e["shape"]))
        n_adapter += size
        rows.append((e["path"], str(tuple(e["shape"])), e["dtype"], "full", "", "", f"{size:,}"))
    print(text_table(rows))
    base = info["base"]["leaves"]
    n_base = sum(int(np.prod(shape)) for shape, _ in base.values())
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"{len(info['adapters'])} adapters, {len(info['trained'])} trained leaves: "
        f"{n_adapter:,} parameters ({100 * n_adapter / max(n_base, 1):.3g}% of the base's "
        f"{n_base:,} in {len(base)} leaves); {on_disk:,} bytes on disk"
    )
    if info["user"]:
        print("metadata: " + json.dumps(info["user"], sort_keys=True))


def _inspect_peft(path: pathlib.Path) -> None:
    config = _read_json(path / CONFIG_NAME, "a PEFT adapter_config.json", dict)
    keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias")
    print(f"PEFT adapter {path}: " + ", ".join(f"{k}={config.get(k)!r}" for k in keys))
    print(f"target_modules: {config.get('target_modules')}")
    tensors = _read_safetensors(path / WEIGHTS_NAME)
    rows = [("tensor", "shape", "dtype")]
    rows += [(k, str(v.shape), str(v.dtype)) for k, v in sorted(tensors.items())]
    print(text_table(rows))
    print(f"{sum(v.size for v in tensors.values()):,} parameters")


def merge_command(args: argparse.Namespace) -> None:
    """Loads the base, puts the adapter on it, and writes ``w + scale * A @ B``; refuses
    (writing nothing) a merge whose result holds NaN or inf, naming the leaves."""
    _refuse_overwriting_inputs(args.out, {"--base": args.base, "--adapter": args.adapter})
    flat = _read_safetensors(args.base)
    raise_problems(f"{args.base}: the tensor names are not leaf paths", path_conflicts(list(flat)))
    tree = load_adapter(args.adapter, unflatten(flat), check_base=not args.no_check_base)
    try:
        merged = {path: np.asarray(x) for path, x in named_leaves(merge(tree, check=True))}
    except ValueError as err:  # NaN or inf in the adapter or the base: write nothing
        raise ValueError(f"{args.adapter} merged into {args.base}: {err}") from err
    if args.out.is_dir():
        raise ValueError(f"the output {args.out} is a directory; name a file")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(args.out, lambda tmp: save_file(merged, tmp))
    print(f"wrote {len(merged)} merged tensors to {args.out}")


def export_command(args: argparse.Namespace) -> None:
    """Reads the adapter alone (no base needed) and writes it with `to_peft`."""
    inputs = {"--adapter": args.adapter}
    if args.name_map is not None:
        inputs["--name-map"] = args.name_map
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        _refuse_overwriting_inputs(args.out / name, inputs)
    info = adapter_metadata(args.adapter)
    name_map: NameMap = default_name_map
    if args.name_map is not None:
        name_map = _read_name_map(args.name_map, "module name")
    tree = load_adapter(args.adapter)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"the output {args.out} is a file; name a directory")
    config = info["config"]  # null: saved without one, and to_peft derives it all
    to_peft(  # both files swapped in together: a kill leaves the old export or the new
        args.out,
        tree,
        None if config is None else LoraConfig.from_dict(config),
        name_map,
        base_model_name_or_path=args.base_model,
        overwrite=True,  # the command replaces an export, as merge replaces its file
    )
    print(f"wrote {args.out / CONFIG_NAME} and {args.out / WEIGHTS_NAME}")


def export_gguf_command(args: argparse.Namespace) -> None:
    """Reads the adapter alone, merges it into ``--source``'s weights (`gguf_tensors`) and
    writes the model with `write_gguf`, replacing ``--out``."""
    inputs = {"--source": args.source, "--adapter": args.adapter}
    if args.name_map is not None:
        inputs["--name-map"] = args.name_map
    _refuse_overwriting_inputs(args.out, inputs)
    name_map = None
    if args.name_map is not None:
        name_map = _read_name_map(args.name_map, "GGUF tensor name")
    if args.out.is_dir():
        raise ValueError(f"the output {args.out} is a directory; name a file")
    if not args.source.is_file():
        raise ValueError(f"the source {args.source} is not a file")
    tensors = gguf_tensors(load_adapter(args.adapter), args.source, name_map=name_map)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(args.out, args.source, tensors, tensor_type=args.tensor_type, overwrite=True)
    print(f"wrote {args.out}: {len(tensors)} merged tensors stored {args.tensor_type}")


def _refuse_overwriting_inputs(out: pathlib.Path, inputs: dict[str, pathlib.Path]) -> None:
    """Raises if the output file ``out`` is one of ``inputs``, is inside an input directory
    or contains one (symbolic links resolved, hard links compared by inode)."""
    target = out.resolve()
    for flag, path in inputs.items():
        source = path.resolve()
        same = target == source or (out.exists() and path.exists() and os.path.samefile(out, path))
        if same or source in target.parents or target in source.parents:
            raise ValueError(
                f"the output {out} would overwrite the input {flag} {path}; write it elsewhere"
            )


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} as a safetensors file: {err}") from err


def _read_name_map(path: pathlib.Path, what: str) -> dict[str, str]:
    """A JSON name map ``{leaf or module path: what}``, its values strings."""
    name_map = _read_json(path, f"a name map {{path: {what}}}", dict)
    bad = {k: v for k, v in name_map.items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"{path}: {what}s must be strings, found {bad}")
    return name_map


def _read_json(path: pathlib.Path, what: str, kind: type) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"cannot read {path} as {what}: {err}") from err
    if not isinstance(value, kind):
        raise ValueError(f"{path} is not {what}: found a JSON {type(value).__name__}")
    return value


if __name__ == "__main__":
    sys.exit(main())
