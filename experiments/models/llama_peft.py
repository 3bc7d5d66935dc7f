"""PyTorch module names of the Flax Llama in `experiments.models.llama`, for the PEFT format.

The Flax modules carry Hugging Face's ``LlamaForCausalLM`` names, so the map is
mechanical: ``params/layers/self_attn/q_proj`` (a kernel stacked over the layers by
``nn.scan``) is the template ``model.layers.{layer}.self_attn.q_proj``, which
`lorax_lite.to_peft` fills with each layer index and `lorax_lite.from_peft` reads
back. The layer modules come from `llama_gguf.LAYER_TENSORS`, the table that loads
the GGUF file.

Example:
    >>> names = peft_name_map()
    >>> names["params/layers/mlp/down_proj"]
    'model.layers.{layer}.mlp.down_proj'
    >>> ll.to_peft("/tmp/peft", lora_params, config, names)  # doctest: +SKIP
"""

from __future__ import annotations

from experiments.models.llama_gguf import LAYER_TENSORS
from lorax_lite.peft import LAYER


def peft_name_map(*, collection: str = "params") -> dict[str, str]:
    """A name map ``lorax_lite module path -> torch module name`` for `Llama`.

    Keyed by module paths (``params/layers/self_attn/q_proj``), so it maps the
    module's kernel, embedding or norm scale alike; it is plain JSON, usable as
    ``lorax-lite export-peft --name-map``.

    Args:
        collection: the variable collection the paths start with (``""`` for none).

    Returns:
        ``{module path: torch module name}``, a ``{layer}`` template for the modules of
        the scanned layers.
    """
    layer_modules = ["/".join(module[:-1]) for module, _ in LAYER_TENSORS.values()]
    names = {f"layers/{m}": f"model.layers.{LAYER}." + m.replace("/", ".") for m in layer_modules}
    names |= {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
    return {f"{collection}/{path}" if collection else path: name for path, name in names.items()}
