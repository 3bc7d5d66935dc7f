"""The names and conventions the PEFT format and lorax_lite share, used by the writer and
the reader: file names, the name map from leaf paths to PyTorch modules, `Piece`, and PEFT's
pattern-key lookup."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..json_values import json_digest
from ..linear_regex import compile_pattern
from ..targets import module_of
from ..weight import Layout

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


def fields_digest(peft_config: dict[str, Any]) -> str:
    """The sha256 of the fields of ``adapter_config.json`` that say what the tensors mean,
    recorded in the tensors file's header: a config from another export (a directory
    mixing two) no longer matches it, while other fields may be edited by hand."""
    return json_digest({k: peft_config.get(k) for k in WEIGHT_FIELDS})


ADAPTER_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
MAGNITUDE = "lora_magnitude_vector"
WEIGHT_NAMES = ("kernel", "embedding", "weight")


def json_text(value: Any) -> str:
    """``value`` as written in JSON (``true``, ``null``, ``"LORA"``), for messages."""
    return json.dumps(value, ensure_ascii=False)


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's pattern lookup: the first key matching the end of ``module`` at a dot boundary
    (without backtracking: a key read from a file cannot make the lookup hang)."""
    return next((k for k in patterns if compile_pattern(key_pattern(k)).fullmatch(module)), None)


def key_pattern(key: str) -> str:
    r"""PEFT's ``re.match(rf"(.*\.)?({key})$", module)`` as a whole-name pattern."""
    return rf"(.*\.)?({key})"
