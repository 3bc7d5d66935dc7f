"""lorax_lite: small, functional LoRA fine-tuning for JAX."""

from . import distributed as distributed
from .adapter_set import AdapterSet as AdapterSet
from .checkpoint import adapter_metadata as adapter_metadata
from .checkpoint import load_adapter as load_adapter
from .checkpoint import save_adapter as save_adapter
from .config import LoraConfig as LoraConfig
from .gguf_export import gguf_tensors as gguf_tensors
from .gguf_export import write_gguf as write_gguf
from .loop import NonFiniteError as NonFiniteError
from .loop import fit as fit
from .merging import merge as merge
from .merging import unmerge as unmerge
from .mixing import Combined as Combined
from .mixing import combine_adapters as combine_adapters
from .optim import optimizer as optimizer
from .params import init as init
from .peft import from_peft as from_peft
from .peft import to_peft as to_peft
from .placement import place as place
from .placement import replicate as replicate
from .placement import shard_batch as shard_batch
from .placement import unreplicate as unreplicate
from .qlora import quantize as quantize
from .quant import QuantizedWeight as QuantizedWeight
from .report import count as count
from .report import summary as summary
from .serving import route as route
from .slots import AdapterSlots as AdapterSlots
from .step import TrainStep as TrainStep
from .step import pmap_train_step as pmap_train_step
from .step import sharded_train_step as sharded_train_step
from .step import train_step as train_step
from .train_checkpoint import TrainCheckpointer as TrainCheckpointer
from .transform import MaterializationError as MaterializationError
from .transform import lora as lora
from .trees import TrainState as TrainState
from .trees import cast_base as cast_base
from .trees import combine as combine
from .trees import partition as partition
from .version import __version__ as __version__
from .views import UnsupportedEquationError as UnsupportedEquationError
from .vmap_step import vmap_train_step as vmap_train_step
from .weight import Layout as Layout
from .weight import LoraWeight as LoraWeight
from .weight import Trainable as Trainable

__all__ = [
    "AdapterSet",
    "AdapterSlots",
    "Combined",
    "Layout",
    "LoraConfig",
    "LoraWeight",
    "MaterializationError",
    "NonFiniteError",
    "QuantizedWeight",
    "TrainCheckpointer",
    "TrainState",
    "TrainStep",
    "Trainable",
    "UnsupportedEquationError",
    "adapter_metadata",
    "cast_base",
    "combine",
    "combine_adapters",
    "count",
    "distributed",
    "fit",
    "from_peft",
    "gguf_tensors",
    "init",
    "load_adapter",
    "lora",
    "merge",
    "optimizer",
    "partition",
    "place",
    "pmap_train_step",
    "quantize",
    "replicate",
    "route",
    "save_adapter",
    "shard_batch",
    "sharded_train_step",
    "summary",
    "to_peft",
    "train_step",
    "unmerge",
    "unreplicate",
    "vmap_train_step",
    "write_gguf",
]
