"""lorax_lite: small, functional LoRA fine-tuning for JAX."""

from .checkpoint import TrainCheckpointer as TrainCheckpointer
from .checkpoint import adapter_metadata as adapter_metadata
from .checkpoint import load_adapter as load_adapter
from .checkpoint import save_adapter as save_adapter
from .config import LoraConfig as LoraConfig
from .optim import optimizer as optimizer
from .params import combine as combine
from .params import count as count
from .params import init as init
from .params import merge as merge
from .params import partition as partition
from .params import unmerge as unmerge
from .report import summary as summary
from .transform import MaterializationError as MaterializationError
from .transform import lora as lora
from .weight import Layout as Layout
from .weight import LoraWeight as LoraWeight
from .weight import Trainable as Trainable

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "LoraConfig",
    "LoraWeight",
    "MaterializationError",
    "TrainCheckpointer",
    "Trainable",
    "adapter_metadata",
    "combine",
    "count",
    "init",
    "load_adapter",
    "lora",
    "merge",
    "optimizer",
    "partition",
    "save_adapter",
    "summary",
    "unmerge",
]
