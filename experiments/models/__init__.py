"""Models for the experiments (Flax linen), with loaders for pretrained weights.

`LLAMA_LINEAR` names the linear layers of a Llama layer by sub-block; `LLAMA_PROJECTIONS`
lists all seven, the LoRA targets of the Llama experiments (PEFT's ``target_modules``).
"""

LLAMA_LINEAR = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
LLAMA_PROJECTIONS = (*LLAMA_LINEAR["self_attn"], *LLAMA_LINEAR["mlp"])
