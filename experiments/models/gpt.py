"""A GPT-2 in Flax linen: pre-LN blocks, learned positions, an untied ``lm_head``.

Module names follow GPT-2 (``attn/c_attn``, ``attn/c_proj``, ``mlp/c_fc``,
``mlp/c_proj``), so LoRA targets written for GPT-2 (``("c_attn", "c_proj")``,
``"all-linear"``) select the same layers here. With ``scan=True`` (the default)
the blocks are one ``nn.scan`` over a stacked block, so every block weight has a
leading layer axis (``params/h/attn/c_attn/kernel`` is ``(n_layer, d, 3d)``);
with ``scan=False`` the blocks are ``h_0 ... h_{n-1}``.

``lora_rank > 0`` builds the hand-written inline LoRA variant used as the
yardstick in ``experiments/bench``: every block linear layer computes
``x @ W + b + s * (x @ A) @ B`` itself, with ``A``/``B`` stored next to the
kernel as ``lora_a``/``lora_b``.

Example:
    >>> config = make_config("tiny")
    >>> model = GPT(config)
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)
    >>> model.apply(params, tokens).shape
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, max_len=128, d_model=64, n_layer=2, n_head=2),
    "small": dict(d_model=768, n_layer=12, n_head=12),
    "medium": dict(d_model=1024, n_layer=24, n_head=16),
    "large": dict(d_model=1280, n_layer=36, n_head=20),
    "xl": dict(d_model=1600, n_layer=48, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a GPT-2.

    Attributes:
        vocab_size: number of token ids (50257 for the GPT-2 BPE).
        max_len: number of learned positions.
        d_model: width of the residual stream.
        n_layer: number of blocks.
        n_head: attention heads; ``d_model`` must be a multiple of it.
        dropout: residual, attention-output and embedding dropout rate (training only).
        dtype: compute dtype (``"bfloat16"`` for mixed precision).
        param_dtype: dtype the parameters are created in.
        scan: one ``nn.scan`` over a stacked block (``True``) or unrolled blocks.
        remat: recompute each block's activations in the backward pass.
        attention: ``"xla"``, ``"cudnn"`` or ``"auto"`` (cuDNN on a GPU in 16-bit
            compute, XLA otherwise), passed to ``jax.nn.dot_product_attention``.
        lora_rank: rank of the inline LoRA on every block linear layer (0: none).
        lora_alpha: LoRA scale numerator; the adapter is scaled by ``alpha / rank``.
        tie_head: compute the logits with the token embedding (as the released GPT-2)
            instead of a separate ``lm_head`` Dense.
        flat_tokens: feed every linear layer (and ``lm_head``) a 2-D ``(batch * length,
            d)`` view of its input. Same function; on XLA:CPU the weight gradient of a
            3-D input (two contracting dimensions) is far slower than of a 2-D one
            (see experiments/bench/NOTES.md).
    """

    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan: bool = True
    remat: bool = False
    attention: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    tie_head: bool = False
    flat_tokens: bool = False

    def __post_init__(self):
        problems = []
        if self.d_model % self.n_head:
            problems.append(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if self.attention not in ("auto", "xla", "cudnn"):
            problems.append(f"attention must be 'auto', 'xla' or 'cudnn', got {self.attention!r}")
        if self.lora_rank < 0:
            problems.append(f"lora_rank must be >= 0, got {self.lora_rank}")
        if problems:
            raise ValueError("Invalid GPTConfig:\n  " + "\n  ".join(problems))


def make_config(name: str = "small", **overrides: Any) -> GPTConfig:
    """A preset (``tiny``, ``small``, ``medium``, ``large``, ``xl``) or ``custom``.

    Args:
        name: the preset; ``"custom"`` starts from the `GPTConfig` defaults (GPT-2 small).
        **overrides: any `GPTConfig` field.

    Returns:
        The config.

    Raises:
        ValueError: for an unknown preset name.
    """
    if name != "custom" and name not in PRESETS:
        raise ValueError(f"unknown GPT config {name!r}; choose from {[*PRESETS, 'custom']}")
    return GPTConfig(**{**PRESETS.get(name, {}), **overrides})


def attention_implementation(config: GPTConfig) -> str | None:
    """The ``implementation`` argument for ``jax.nn.dot_product_attention``."""
    if config.attention != "auto":
        return config.attention
    half = jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
    head_dim = config.d_model // config.n_head
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def _normal(std: float) -> Any:
    return nn.initializers.normal(stddev=std)


class LoraDense(nn.Module):
    """``x @ W + b + (alpha / rank) * (x @ A) @ B``, written out (the inline yardstick).

    ``A`` is kaiming-uniform in ``+-1/sqrt(d_in)`` and ``B`` zeros, both float32
    and cast to the compute dtype, as `lorax_lite` does. The adapter path runs on a
    2-D ``(-1, d_in)`` view of ``x``, so that the gradients of ``A`` and ``B`` are
    plain matrix products (on XLA:CPU, much faster than with two contracting axes).
    """

    features: int
    rank: int
    alpha: float
    dtype: Any
    param_dtype: Any
    kernel_init: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        bound = 1.0 / math.sqrt(d_in)
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        a_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        lora_a = self.param("lora_a", a_init, (d_in, self.rank), jnp.float32)
        lora_b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        flat = x.reshape(-1, d_in)
        t = (flat @ lora_a.astype(self.dtype)) * jnp.asarray(self.alpha / self.rank, self.dtype)
        return y + (t @ lora_b.astype(self.dtype)).reshape(y.shape)


def _linear(config: GPTConfig, features: int, name: str, std: float = 0.02) -> Any:
    """A GPT-2 linear layer: ``nn.Dense``, or `LoraDense` for the inline LoRA variant.

    With ``config.flat_tokens`` the layer sees a 2-D view of its input.
    """
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, kernel_init=_normal(std))
    if config.lora_rank:
        layer = LoraDense(features, config.lora_rank, config.lora_alpha, name=name, **common)
    else:
        layer = nn.Dense(features, name=name, **common)
    return _flat(layer) if config.flat_tokens else layer


def _flat(layer: Any) -> Any:
    """``layer`` applied to the ``(-1, d)`` view of its input, reshaped back."""
    return lambda x: layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused ``c_attn`` (q, k, v) projection."""

    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        qkv = _linear(cfg, 3 * width, "c_attn")(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3, cfg.n_head, -1), 3, axis=2)
        y = jax.nn.dot_product_attention(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=True,
            implementation=attention_implementation(cfg),
        )  # fmt: skip
        y = _linear(cfg, width, "c_proj", 0.02 / math.sqrt(2 * cfg.n_layer))(
            y.reshape(batch, length, width)
        )
        return nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)


class MLP(nn.Module):
    """``c_fc`` to 4d, tanh-GELU, ``c_proj`` back to d."""

    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.gelu(_linear(cfg, 4 * cfg.d_model, "c_fc")(x), approximate=True)
        h = _linear(cfg, cfg.d_model, "c_proj", 0.02 / math.sqrt(2 * cfg.n_layer))(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)


class Block(nn.Module):
    """A pre-LN transformer block; ``(x, _) -> (x, None)`` so that it scans."""

    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(
            1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        x = x + Attention(cfg, self.deterministic, name="attn")(norm("ln_1")(x))
        x = x + MLP(cfg, self.deterministic, name="mlp")(norm("ln_2")(x))
        return x, None


class GPT(nn.Module):
    """GPT-2: token and position embeddings, ``n_layer`` blocks, final LayerNorm, ``lm_head``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Logits ``(batch, length, vocab)`` in the compute dtype for int ``tokens``."""
        cfg = self.config
        embed = lambda n, name: nn.Embed(
            n,
            cfg.d_model,
            embedding_init=_normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name=name,
        )
        wte = embed(cfg.vocab_size, "wte")
        x = wte(tokens) + embed(cfg.max_len, "wpe")(jnp.arange(tokens.shape[-1]))
        x = nn.Dropout(cfg.dropout)(x.astype(cfg.dtype), deterministic=deterministic)
        block = nn.remat(Block, prevent_cse=not cfg.scan) if cfg.remat else Block
        if cfg.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=cfg.n_layer,
            )
            x, _ = stack(cfg, deterministic, name="h")(x, None)
        else:
            for i in range(cfg.n_layer):
                x, _ = block(cfg, deterministic, name=f"h_{i}")(x)
        x = nn.LayerNorm(1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ln_f")(x)
        if cfg.tie_head:
            return wte.attend(x)
        head = nn.Dense(
            cfg.vocab_size,
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_normal(0.02),
            name="lm_head",
        )
        return _flat(head)(x) if cfg.flat_tokens else head(x)


def random_params(config: GPTConfig, seed: int = 0, std: float = 0.02) -> Any:
    """Parameters at the shapes of ``GPT(config).init``, drawn in numpy (nothing is compiled).

    Every leaf is ``N(0, std)`` except LayerNorm scales, ``1 + N(0, std)``; inline-LoRA
    ``lora_b`` leaves are random too. Tests use this instead of a jitted ``init``,
    whose compile costs seconds on a CPU.

    Args:
        config: the model's config.
        seed: numpy seed.
        std: standard deviation of every draw.

    Returns:
        ``{"params": ...}`` with float leaves in ``config.param_dtype`` (float32 for
        the inline LoRA factors, as `LoraDense` creates them).
    """
    import numpy as np

    tokens = jax.ShapeDtypeStruct((1, min(8, config.max_len)), jnp.int32)
    shapes = jax.eval_shape(GPT(config).init, jax.random.key(0), tokens)
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        value = rng.normal(0.0, std, leaf.shape)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value += 1.0
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def stack_layers(params: Any, n_layer: int) -> Any:
    """Unrolled parameters (``h_0 ... h_{n-1}``) in the scanned layout (``h``, layer axis 0)."""
    inner = dict(params["params"])
    layers = [inner.pop(f"h_{i}") for i in range(n_layer)]
    inner["h"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "params": inner}


def causal_lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32) of ``logits`` for ``tokens``."""
    logits = logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return -jnp.mean(target)


def count_params(config: GPTConfig) -> int:
    """The parameter count of ``config`` by formula (biases, LayerNorms, head if untied)."""
    d, v, n = config.d_model, config.vocab_size, config.n_layer
    per_layer = 12 * d * d + 13 * d  # c_attn 3d^2+3d, c_proj d^2+d, c_fc 4d^2+4d, proj 4d^2+d, 2 LN
    head = 0 if config.tie_head else d * v
    return v * d + config.max_len * d + n * per_layer + 2 * d + head
