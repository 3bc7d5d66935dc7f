"""The ``lorax-lite`` command: inspect adapters, merge them into a base, export to PEFT.

::

    lorax-lite inspect ADAPTER_OR_PEFT_DIR
    lorax-lite merge --base base.safetensors --adapter ADAPTER --out merged.safetensors
    lorax-lite export-peft --adapter ADAPTER --out PEFT_DIR [--name-map names.json]

Base and merged parameters are safetensors files whose keys are the ``/``-joined
leaf paths (``params/encoder/layer_0/attention/query/kernel``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from .checkpoint import adapter_metadata, load_adapter
from .config import LoraConfig
from .params import merge
from .peft import CONFIG_NAME, WEIGHTS_NAME, default_name_map, to_peft
from .targets import named_leaves, unflatten


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success, 1 on an error).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` by default).

    Returns:
        The exit status.
    """
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"lorax-lite {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorax-lite",
        description="Inspect lorax_lite adapters, merge them into a base, export them to PEFT.",
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
    return parser


def inspect_command(args: argparse.Namespace) -> None:
    """Prints the config, the adapted and trained paths with shapes and ranks, and sizes."""
    path = args.path
    if (path / CONFIG_NAME).is_file():
        _inspect_peft(path)
        return
    info = adapter_metadata(path)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"adapter checkpoint {path} (format {info['format_version']}; saved with {versions})")
    print("config: " + json.dumps(info["config"], sort_keys=True))
    rows = [("path", "weight shape", "dtype", "rank", "scale", "axes", "adapter params")]
    n_adapter = 0
    for e in info["adapters"]:
        size = int(np.prod(e["a"]["shape"]) + np.prod(e["b"]["shape"]))
        n_adapter += size
        rows.append(
            (e["path"], str(tuple(e["shape"])), e["dtype"], str(e["rank"]), f"{e['scale']:g}",
             ",".join(e["layout"]), f"{size:,}")
        )  # fmt: skip
    for e in info["trained"]:
        size = int(np.prod(e["shape"]))
        n_adapter += size
        rows.append((e["path"], str(tuple(e["shape"])), e["dtype"], "full", "", "", f"{size:,}"))
    print(_table(rows))
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
    config = json.loads((path / CONFIG_NAME).read_text())
    keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias")
    print(f"PEFT adapter {path}: " + ", ".join(f"{k}={config.get(k)!r}" for k in keys))
    print(f"target_modules: {config.get('target_modules')}")
    tensors = load_file(path / WEIGHTS_NAME)
    rows = [("tensor", "shape", "dtype")]
    rows += [(k, str(v.shape), str(v.dtype)) for k, v in sorted(tensors.items())]
    print(_table(rows))
    print(f"{sum(v.size for v in tensors.values()):,} parameters")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def merge_command(args: argparse.Namespace) -> None:
    """Loads the base, puts the adapter on it, and writes ``w + scale * A @ B``."""
    params = unflatten(load_file(args.base))
    tree = load_adapter(args.adapter, params, check_base=not args.no_check_base)
    merged = {path: np.asarray(x) for path, x in named_leaves(merge(tree))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(merged, args.out)
    print(f"wrote {len(merged)} merged tensors to {args.out}")


def export_command(args: argparse.Namespace) -> None:
    """Reads the adapter alone (no base needed) and writes it with `to_peft`."""
    info = adapter_metadata(args.adapter)
    name_map = default_name_map
    if args.name_map is not None:
        name_map = json.loads(args.name_map.read_text())
    to_peft(
        args.out,
        load_adapter(args.adapter),
        LoraConfig.from_dict(info["config"]),
        name_map,
        base_model_name_or_path=args.base_model,
    )
    print(f"wrote {args.out / CONFIG_NAME} and {args.out / WEIGHTS_NAME}")


if __name__ == "__main__":
    sys.exit(main())
