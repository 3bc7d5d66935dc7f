"""A Llama in Flax linen: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers``,
``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``norm``), so LoRA targets and PEFT names carry over. The
layers are one ``nn.scan`` over a stacked block: every layer weight has a leading layer
axis (``params/layers/self_attn/q_proj/kernel`` is ``(n_layer, d_model, n_head *
head_dim)``, kernels are ``(in, out)``), and ``remat=True`` recomputes each layer's
activations in the backward pass (``nn.remat`` inside the scan).

RoPE rotates the two halves of each head (``x[:d/2]`` with ``x[d/2:]``), as Hugging Face
does; GGUF files store Q/K rows permuted for interleaved pairs, and the loader
(``experiments/models/llama_gguf.py``) un-permutes them.

The tied head multiplies by the whole ``(vocab, d_model)`` embedding, which dominates
the cost of a small model with a large vocabulary: `Llama.hidden_states` and
`Llama.logits_at` let a loss compute logits only where it needs them. `generate`
decodes with a key/value cache (greedy, or sampled with a key) through a jitted step
(`decode_step`), and runs float, quantized (`lorax_lite.QuantizedWeight`) and LoRA
parameter trees alike, or a batch whose rows each run with their own adapter
(``adapter_ids``, through ``ll.route``).

Example:
    >>> config = make_config("tiny")
    >>> model = Llama(config)
    >>> tokens = jnp.zeros((2, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)
    >>> model.apply(params, tokens).shape
    (2, 8, 256)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lorax_lite as ll

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, max_len=128
    ),
    "smollm2-135m": dict(),  # the defaults
    # Llama-3.1 shapes (its "llama3" RoPE frequency scaling is not modelled; shapes only).
    "llama-3.1-8b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_ff=14336,
        rope_theta=500000.0,
        max_len=131072,
        tie_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        vocab_size=128256,
        d_model=8192,
        n_layer=80,
        n_head=64,
        n_kv_head=8,
        d_ff=28672,
        rope_theta=500000.0,
        max_len=131072,
        tie_embeddings=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama; the defaults are SmolLM2-135M's.

    Attributes:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layer: number of layers.
        n_head: query heads.
        n_kv_head: key/value heads (grouped-query attention); must divide ``n_head``.
        head_dim: width of each head; 0 means ``d_model // n_head``.
        d_ff: width of the SwiGLU feed-forward layer.
        rope_theta: RoPE base.
        rms_eps: epsilon of every RMSNorm.
        max_len: the longest sequence the model was trained for (the cache's limit).
        tie_embeddings: compute the logits with the token embedding (no ``lm_head``).
        dtype: compute dtype (``"bfloat16"`` for mixed precision); norms, RoPE and
            softmax run in float32 whatever it is.
        param_dtype: dtype the parameters are created in.
        remat: recompute each layer's activations in the backward pass.
    """

    vocab_size: int = 49152
    d_model: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    head_dim: int = 0
    d_ff: int = 1536
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    max_len: int = 8192
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        problems = []
        if not self.head_dim:
            if self.d_model % self.n_head:
                problems.append(
                    f"d_model={self.d_model} is not a multiple of n_head={self.n_head} "
                    "(set head_dim)"
                )
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_head, 1))
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.head_dim % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
                problems.append(f"{name} must be a floating dtype, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("Invalid LlamaConfig:\n  " + "\n  ".join(problems))


def make_config(name: str = "smollm2-135m", **overrides: Any) -> LlamaConfig:
    """A preset (``tiny``, ``smollm2-135m``, ``llama-3.1-8b``, ``llama-3.1-70b``) with
    ``overrides`` applied.

    Raises:
        ValueError: for an unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown Llama config {name!r}; choose from {list(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


class KVCache(NamedTuple):
    """Keys and values of every layer, ``(n_layer, batch, length, n_kv_head, head_dim)``;
    entries past the current position are ignored (masked)."""

    k: jax.Array
    v: jax.Array


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``length`` tokens."""
    shape = (config.n_layer, batch, length, config.n_kv_head, config.head_dim)
    return KVCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` of ``position * theta ** (-2i / head_dim)``, ``(length, head_dim/2)``
    float32."""
    inverse = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inverse[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the pairs ``(x[i], x[i + d/2])`` of every head of ``x`` ``(batch, length,
    heads, d)`` by the angles of its position, in float32."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = [first * cos - second * sin, second * cos + first * sin]
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, dtype: Any
) -> jax.Array:
    """Softmax attention of ``q`` ``(b, t, n_head, d)`` over ``k``, ``v`` ``(b, s, n_kv, d)``;
    query head ``h`` reads key/value head ``h // (n_head // n_kv)``.

    Args:
        q, k, v: queries, keys and values.
        visible: ``(t, s)`` bool, which keys each query may see.
        dtype: the compute dtype; scores and the softmax are float32.

    Returns:
        ``(b, t, n_head, d)`` in ``dtype``.
    """
    b, t, n_head, d = q.shape
    n_kv = k.shape[2]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, t, n_kv, n_head // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dtype)).reshape(b, t, n_head, d)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_eps, config.dtype, config.param_dtype, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, over a cache when one is given.

    Without a cache, queries see the causal prefix of ``x``. With one (a layer's
    ``(k, v)``), this call's keys and values are written at ``start`` and the queries
    (positions ``start ...``) see every cached entry up to their own position.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: Any, start: jax.Array
    ) -> tuple[jax.Array, Any]:
        cfg = self.config
        b, t, _ = x.shape
        heads = lambda y, n: y.reshape(b, t, n, cfg.head_dim)
        q = _dense(cfg, cfg.n_head * cfg.head_dim, "q_proj")(x)
        q = apply_rope(heads(q, cfg.n_head), *rope)
        k = _dense(cfg, cfg.n_kv_head * cfg.head_dim, "k_proj")(x)
        k = apply_rope(heads(k, cfg.n_kv_head), *rope)
        v = heads(_dense(cfg, cfg.n_kv_head * cfg.head_dim, "v_proj")(x), cfg.n_kv_head)
        if cache is not None:
            at = (0, start, 0, 0)
            k = lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
            cache = (k, v)
        key_positions = jnp.arange(k.shape[1])
        visible = key_positions[None, :] <= (start + jnp.arange(t))[:, None]
        y = grouped_attention(q, k, v, visible, cfg.dtype)
        y = _dense(cfg, cfg.d_model, "o_proj")(y.reshape(b, t, cfg.n_head * cfg.head_dim))
        return y, cache


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = nn.silu(_dense(cfg, cfg.d_ff, "gate_proj")(x))
        return _dense(cfg, cfg.d_model, "down_proj")(gate * _dense(cfg, cfg.d_ff, "up_proj")(x))


class Block(nn.Module):
    """A pre-norm Llama layer: ``(x, cache, rope, start) -> (x, cache)``, so that it scans
    (the layer's cache scanned, ``rope`` and ``start`` broadcast)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: Any, rope: tuple[jax.Array, jax.Array], start: jax.Array
    ) -> tuple[jax.Array, Any]:
        cfg = self.config
        h, cache = Attention(cfg, name="self_attn")(
            _norm(cfg, "input_layernorm")(x), rope, cache, start
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
        return x, cache


class Llama(nn.Module):
    """Token embedding, ``n_layer`` scanned layers, final RMSNorm, tied (or untied) head.

    Methods (pass ``method=`` to ``apply``): ``__call__`` (all logits),
    `hidden_states`, `head`, `logits_at` and `decode`.
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
        )(cfg)
        self.norm = RMSNorm(cfg.rms_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nn.initializers.normal(0.02),
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, length, vocab)`` in the compute dtype for int ``tokens``."""
        return self.head(self.hidden_states(tokens))

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """The final normalized hidden states ``(batch, length, d_model)``, before the head."""
        return self._run(tokens, None, jnp.zeros((), jnp.int32))[0]

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits of hidden states of any leading shape."""
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def logits_at(self, tokens: jax.Array, index: jax.Array) -> jax.Array:
        """Logits ``(batch, k, vocab)`` at positions ``index`` ``(batch, k)`` only."""
        hidden = jnp.take_along_axis(self.hidden_states(tokens), index[..., None], axis=1)
        return self.head(hidden)

    def decode(
        self, tokens: jax.Array, cache: KVCache, start: jax.Array, index: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Logits of ``tokens`` ``(batch, t)`` at positions ``start ... start + t - 1``,
        attending to the cache, and the cache with their keys and values written in.
        With ``index`` ``(batch, k)`` (offsets into ``tokens``), the logits there only."""
        hidden, cache = self._run(tokens, cache, jnp.asarray(start, jnp.int32))
        if index is not None:
            hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        return self.head(hidden), cache

    def _run(self, tokens: jax.Array, cache: KVCache | None, start: jax.Array) -> tuple:
        cfg = self.config
        rope = rope_angles(start + jnp.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(tokens).astype(cfg.dtype)
        layer_caches = None if cache is None else (cache.k, cache.v)
        x, layer_caches = self.layers(x, layer_caches, rope, start)
        return self.norm(x), None if cache is None else KVCache(*layer_caches)


def count_params(config: LlamaConfig) -> int:
    """The parameter count of ``config`` by formula."""
    d, hd = config.d_model, config.head_dim
    attention = d * hd * (2 * config.n_head + 2 * config.n_kv_head)
    per_layer = attention + 3 * d * config.d_ff + 2 * d
    head = 0 if config.tie_embeddings else d * config.vocab_size
    return config.vocab_size * d + config.n_layer * per_layer + d + head


@functools.cache
def _forward(config: LlamaConfig, method: str | None) -> Callable:
    """``jit(lora(apply))`` for one method: float, quantized and LoRA trees alike."""
    apply = ll.lora(Llama(config).apply)
    if method is None:
        return jax.jit(apply)
    return jax.jit(lambda params, *args: apply(params, *args, method=method))


def forward(config: LlamaConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """All logits of ``tokens``, compiled once per config (any parameter tree `lora` runs)."""
    return _forward(config, None)(params, tokens)


def logits_at(config: LlamaConfig, params: Any, tokens: jax.Array, index: jax.Array) -> jax.Array:
    """Logits at positions ``index`` ``(batch, k)`` only, compiled once per config."""
    return _forward(config, "logits_at")(params, tokens, index)


def pick_token(
    logits: jax.Array, key: jax.Array | None, *, temperature: float = 0.0, top_k: int = 0
) -> jax.Array:
    """The next token ``(batch,)`` from the last logits ``(batch, vocab)``: the argmax without
    a key or at temperature 0, else a draw from ``softmax(logits / temperature)`` restricted
    to the ``top_k`` likeliest tokens (0: all)."""
    logits = logits.astype(jnp.float32)
    if key is None or temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k:
        threshold = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


@functools.cache
def decode_step(
    config: LlamaConfig, *, temperature: float = 0.0, top_k: int = 0, routed: bool = False
) -> Callable:
    """The jitted step of `generate`: run ``tokens`` at ``start`` over the cache (donated),
    pick the next token.

    ``step(params, tokens, cache, start, key)``, or with ``routed``
    ``step(adapters, adapter_ids, tokens, cache, start, key)``: every sequence runs with
    its own adapter of an `lorax_lite.AdapterSet` or `AdapterSlots` (``ll.route``, the
    cache mapped on its batch axis 1), ``-1`` the base model.
    """
    apply = Llama(config).apply
    run = ll.route(apply, in_axes=(0, 1, None), out_axes=(0, 1)) if routed else ll.lora(apply)

    def step(*args):
        *params, tokens, cache, start, key = args
        logits, cache = run(*params, tokens, cache, start, method="decode")
        return pick_token(logits[:, -1], key, temperature=temperature, top_k=top_k), cache

    return jax.jit(step, donate_argnums=3 if routed else 2)  # the cache


def generate(
    config: LlamaConfig,
    params: Any,
    prompt: jax.Array | np.ndarray,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    adapter_ids: jax.Array | np.ndarray | None = None,
    times: dict[str, float] | None = None,
) -> np.ndarray:
    """Continues ``prompt`` token by token with a key/value cache.

    The prompt runs once (prefill), then each new token is one call of a jitted step
    of length 1. Every step of a sampled run draws with ``fold_in(key, i)``.

    Args:
        config: the model's config.
        params: a float, quantized or LoRA parameter tree (run through `lorax_lite.lora`),
            or with ``adapter_ids`` an `lorax_lite.AdapterSet` or `AdapterSlots`.
        prompt: ``(batch, length)`` int token ids; the rows share one length.
        max_new_tokens: how many tokens to add at most.
        key: PRNG key for sampling; required when ``temperature > 0``.
        temperature: 0 for greedy decoding (the default), else the sampling temperature.
        top_k: sample among the ``top_k`` likeliest tokens only (0: all).
        eos_id: stop once every row has produced this token (it is included).
        adapter_ids: one adapter id per row (``-1``: the base model): each row runs with
            its own adapter of ``params`` (`decode_step`'s ``routed``).
        times: a dict that gets ``prefill_s`` (the prompt's step, to its first token on
            the host) and ``decode_s`` (every later step) in seconds.

    Returns:
        ``(batch, n)`` int32 new tokens, ``n <= max_new_tokens``.

    Raises:
        ValueError: no new tokens, a temperature without a key, a negative temperature or
            top_k, or a sequence longer than ``config.max_len``.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    batch, length = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    if temperature and key is None:
        raise ValueError(f"sampling at temperature {temperature} needs key=")
    if length + max_new_tokens > config.max_len:
        raise ValueError(
            f"prompt of {length} + {max_new_tokens} new tokens exceeds max_len={config.max_len}"
        )
    # Cache lengths rounded up to 64 reuse one compiled step across nearby lengths.
    cache = init_cache(config, batch, min(-(-(length + max_new_tokens) // 64) * 64, config.max_len))
    step = decode_step(
        config, temperature=float(temperature), top_k=int(top_k), routed=adapter_ids is not None
    )
    if adapter_ids is not None:
        step = functools.partial(step, params, jnp.asarray(adapter_ids, jnp.int32))
    else:
        step = functools.partial(step, params)
    step_key = lambda i: jax.random.fold_in(key, i) if temperature else None
    start = time.perf_counter()
    token, cache = step(prompt, cache, 0, step_key(0))
    out = [np.asarray(token)]
    prefilled = time.perf_counter()
    for i in range(1, max_new_tokens):
        if eos_id is not None and (out[-1] == eos_id).all():
            break
        token, cache = step(token[:, None], cache, length + i - 1, step_key(i))
        out.append(np.asarray(token))
    if times is not None:
        times.update(prefill_s=prefilled - start, decode_s=time.perf_counter() - prefilled)
    return np.stack(out, axis=1)
