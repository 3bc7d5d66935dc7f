"""The Llama of `experiments.models.llama` as a Flax NNX module, for the NNX peer rows.

The same arithmetic (RMSNorm, half-split RoPE, grouped-query attention, SwiGLU, tied
head), built from `llama.py`'s functions, with one `nnx.Linear` per projection and a
Python loop over the layers (NNX users write it so; qwix's NNX LoRA intercepts each
``Linear``). ``linear`` picks the projection class: ``nnx.Linear`` for lorax_lite or
qwix, or ``nnx.LoRALinear`` for LoRA written by hand. `from_linen` copies the weights of
a linen ``Llama`` (stacked ``(n_layer, in, out)`` kernels) into it.

Example:
    >>> config = make_config("tiny")
    >>> model = LlamaNNX(config, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 256)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from experiments.models import LLAMA_LINEAR
from experiments.models.llama import LlamaConfig, apply_rope, grouped_attention, rope_angles


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale.astype(jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` in float32, as linen ``RMSNorm``."""

    def __init__(self, config: LlamaConfig):
        self.scale = nnx.Param(jnp.ones((config.d_model,), config.param_dtype))
        self.eps, self.dtype = config.rms_eps, config.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _rms_norm(x, self.scale.value, self.eps, self.dtype)


def _modules(config: LlamaConfig, linear: Callable, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    d, hd = config.d_model, config.head_dim
    shapes = {"q_proj": (d, config.n_head * hd), "k_proj": (d, config.n_kv_head * hd)}
    shapes |= {"v_proj": (d, config.n_kv_head * hd), "o_proj": (config.n_head * hd, d)}
    shapes |= {"gate_proj": (d, config.d_ff), "up_proj": (d, config.d_ff)}
    shapes |= {"down_proj": (config.d_ff, d)}
    make = lambda n_in, n_out: linear(
        n_in, n_out, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
    )
    return {name: make(*shape) for name, shape in shapes.items()}


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (no cache: training only)."""

    def __init__(self, config: LlamaConfig, linear: Callable, rngs: nnx.Rngs):
        for name, module in _modules(config, linear, rngs).items():
            if name in LLAMA_LINEAR["self_attn"]:
                setattr(self, name, module)
        self.config = config

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        heads = lambda y, n: y.reshape(b, t, n, cfg.head_dim)
        q = apply_rope(heads(self.q_proj(x), cfg.n_head), *rope)
        k = apply_rope(heads(self.k_proj(x), cfg.n_kv_head), *rope)
        v = heads(self.v_proj(x), cfg.n_kv_head)
        visible = jnp.tril(jnp.ones((t, t), bool))
        y = grouped_attention(q, k, v, visible, cfg.dtype)
        return self.o_proj(y.reshape(b, t, cfg.n_head * cfg.head_dim))


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, linear: Callable, rngs: nnx.Rngs):
        for name, module in _modules(config, linear, rngs).items():
            if name in LLAMA_LINEAR["mlp"]:
                setattr(self, name, module)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """A pre-norm Llama layer."""

    def __init__(self, config: LlamaConfig, linear: Callable, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, linear, rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config, linear, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaNNX(nnx.Module):
    """Token embedding, ``n_layer`` blocks, final RMSNorm and the tied head: logits of
    int ``tokens`` ``(batch, length)``.

    Args:
        config: the model's shapes and dtypes (tied embeddings only).
        linear: the projection class, called as ``nnx.Linear`` is.
        rngs: initialisation keys.
    """

    def __init__(self, config: LlamaConfig, *, linear: Callable = nnx.Linear, rngs: nnx.Rngs):
        if not config.tie_embeddings:
            raise ValueError("LlamaNNX implements the tied head only (tie_embeddings=True)")
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.d_model, param_dtype=config.param_dtype, rngs=rngs
        )
        self.layers = nnx.List([Block(config, linear, rngs) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config)
        self.config = config

    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        rope = rope_angles(jnp.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(tokens).astype(cfg.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.embed_tokens.attend(self.norm(x))


def from_linen(model: LlamaNNX, params: dict[str, Any]) -> LlamaNNX:
    """Copies a linen `Llama`'s ``{"params": ...}`` into ``model`` (in place; returned).

    Raises:
        ValueError: if a weight's shape differs from the module's.
    """
    linen = params["params"]
    problems = []

    def put(variable: nnx.Variable, value: jax.Array, path: str) -> None:
        if variable.value.shape != value.shape:
            problems.append(f"{path}: module {variable.value.shape}, weights {value.shape}")
        else:
            variable.value = jnp.asarray(value, variable.value.dtype)

    put(model.embed_tokens.embedding, linen["embed_tokens"]["embedding"], "embed_tokens")
    put(model.norm.scale, linen["norm"]["scale"], "norm")
    layers = linen["layers"]
    for i, block in enumerate(model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(getattr(block, norm).scale, layers[norm]["scale"][i], f"layers/{i}/{norm}")
        for group, names in LLAMA_LINEAR.items():
            for name in names:
                kernel = layers[group][name]["kernel"][i]
                put(getattr(getattr(block, group), name).kernel, kernel, f"{i}/{group}/{name}")
    if problems:
        raise ValueError("linen weights do not fit the NNX Llama:\n  " + "\n  ".join(problems))
    return model
