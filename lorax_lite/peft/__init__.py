"""The PEFT file format: ``adapter_config.json`` and ``adapter_model.safetensors``.

`to_peft` (`write`) writes a LoRA tree so that Hugging Face PEFT loads it onto the PyTorch
version of the model; `from_peft` (`read`) reads such a directory back onto a JAX base,
checking ``adapter_config.json`` (`adapter_config`) and every tensor. A name map
(`format`) ties leaf paths (``params/encoder/layer_0/query/kernel``) to PyTorch module
names (``encoder.layer.0.attention.self.query``); a ``{layer}`` template names the
modules of a leaf stacked along its leading axis (scanned layers). Only JSON and
safetensors are read, never pickle.
"""

from .adapter_config import (
    BASE_CHANGING_INITS,
    PLAIN_INITS,
    UNSUPPORTED,
    UNSUPPORTED_IF_SET,
    read_peft_config,
)
from .format import (
    ADAPTER_PAIRS,
    CONFIG_NAME,
    FIELDS_DIGEST,
    LAYER,
    MAGNITUDE,
    PREFIX,
    STACKED,
    TORCH_PARAM,
    WEIGHT_FIELDS,
    WEIGHT_NAMES,
    WEIGHTS_NAME,
    NameMap,
    Piece,
    default_name_map,
    fields_digest,
    resolve_name_map,
)
from .read import from_peft
from .write import to_peft

__all__ = [
    "ADAPTER_PAIRS",
    "BASE_CHANGING_INITS",
    "CONFIG_NAME",
    "FIELDS_DIGEST",
    "LAYER",
    "MAGNITUDE",
    "PLAIN_INITS",
    "PREFIX",
    "STACKED",
    "TORCH_PARAM",
    "UNSUPPORTED",
    "UNSUPPORTED_IF_SET",
    "WEIGHTS_NAME",
    "WEIGHT_FIELDS",
    "WEIGHT_NAMES",
    "NameMap",
    "Piece",
    "default_name_map",
    "fields_digest",
    "from_peft",
    "read_peft_config",
    "resolve_name_map",
    "to_peft",
]
