"""Train-step and inference benchmark: lorax_lite LoRA against its yardsticks on a GPT-2.

Each variant runs in its own subprocess (clean peak memory, no shared compile
caches): it builds the model, compiles the step (compile time), warms up, then
answers ``run N`` requests from this process with N synchronized step times. With
``--repeats R > 1`` all workers stay alive and the repeats are interleaved across
variants (rotating the order), so that load from other programs hits every variant
alike; ratios are then taken within each repeat and summarized by their median
and range.

Train variants (``--mode train``):
  lora          lorax_lite: ``ll.init`` (all-linear, lm_head excluded), ``ll.lora(model.apply)``,
                gradients of the trainable partition only, ``ll.optimizer(optax.adamw)``.
  full          full fine-tuning of the same model, ``optax.adamw`` on every parameter.
  materialized  the same LoRA computed the naive way: ``model.apply(ll.merge(tree))``.
  inline        a hand-written inline LoRA GPT (``x@W + s*(x@A)@B`` in Flax; the yardstick).
  dora          ``lora`` with ``use_dora=True`` (DoRA, the norm from the factors); the
                Markdown adds its step time over ``lora``'s against target 10 (<= 1.3x).
  dora-materialized
                the same DoRA the naive way, as PEFT computes it: ``model.apply(ll.merge(tree))``
                forms ``m * V / ||V||`` densely every step.
  lora-bf16, lora-int8, lora-int4, lora-int4-asym, lora-nf4
                ``lora`` over a frozen base stored otherwise: ``ll.cast_base(tree, bfloat16)``,
                or ``ll.quantize(kind=..., block=--quant-block, also=--quantize-also)`` of the
                block linears' ``w`` and (by default) the embeddings and head, dequantizing to
                the compute dtype, with the rest (LayerNorms, biases) in bf16. ``lora`` is the
                fp32 base (under the default ``--base-dtype``). With ``lora-bf16`` in the run, a
                second table gives each base's bytes (``ll.count``) and step time over the bf16
                base's, and each quantized worker first checks its loss against the same model
                over the dequantized weights.
  peft, peft-eager, torch-full
                torch + transformers GPT-2 (+ peft LoRA), torch.compile'd except
                ``peft-eager``; skipped when torch, transformers or peft do not import.
Inference variants (``--mode inference``): ``base`` (the plain model), ``merged``
(``model.apply(ll.merge(tree))`` with the merge done once, outside the timing) and
``unmerged`` (``ll.lora(model.apply)(tree)``).

Example:
    python -m experiments.bench.train_step --config small --batch 16 --seq 1024 --dtype bfloat16
    python -m experiments.bench.train_step --small --variants lora,full
    python -m experiments.bench.train_step --small --variants lora,lora-bf16,lora-int4,lora-nf4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from experiments.bench.workers import (
    Runner,
    Worker,
    environment,
    failure_line,
    paired_ratios,
    read,
    request,
    serve,
    start,
)
from experiments.provenance import command, git_commit, loadavg
from experiments.runner import CHEAP_XLA_FLAGS, figure, publish

BASE_STORAGE = ("bf16", "int8", "int4", "int4-asym", "nf4")  # ``lora-<storage>`` variants
QUANT_REFERENCE = "lora-bf16"  # the quantized bases' byte and time ratios are over this one
# ../shared/BENCHMARKS.md target 9, for the int4 and nf4 bases: bytes and step time over bf16's.
QUANT_TARGETS = {"lora-int4": (0.3, 1.25), "lora-nf4": (0.3, 1.25)}
# A quantized-base worker refuses to be timed if its first loss differs from the same model's
# over the dequantized float base by more than this (relative): it would time a wrong step.
LOSS_TOLERANCE = 1e-5
# ../shared/BENCHMARKS.md target 10: the DoRA step's time over the LoRA step's.
DORA_TARGET = 1.3
TRAIN_VARIANTS = ("lora", "full", "materialized", "inline", "dora", "dora-materialized")
TRAIN_VARIANTS += tuple(f"lora-{storage}" for storage in BASE_STORAGE)
TRAIN_VARIANTS += ("peft", "peft-eager", "torch-full")
INFERENCE_VARIANTS = ("base", "merged", "unmerged")
TORCH_VARIANTS = ("peft", "peft-eager", "torch-full")
REFERENCE = {"train": "lora", "inference": "base"}
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # = "all-linear" without lm_head, as PEFT
# ``--small``: a tiny model, few steps; every flag given explicitly overrides these.
SMALL = dict(config="custom", d_model=64, layers=2, heads=2, vocab=256, batch=2, seq=32)
SMALL.update(steps=3, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--config", default="small", help="tiny|small|medium|large|xl|custom")
    p.add_argument("--d-model", type=int, help="override the preset's width")
    p.add_argument("--layers", type=int, help="override the preset's n_layer")
    p.add_argument("--heads", type=int, help="override the preset's n_head")
    p.add_argument("--vocab", type=int, help="override the vocabulary size (default 50257)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (>1: paired)")
    p.add_argument("--dtype", default="auto", help="compute dtype; auto: bf16 on GPU, else f32")
    p.add_argument("--base-dtype", default="float32", help="dtype of the frozen base weights")
    p.add_argument("--quant-block", type=int, default=64, help="lora-int*/nf4: entries per block")
    p.add_argument(
        "--quantize-also",
        default="wte,wpe,lm_head",
        help="lora-int*/nf4: frozen non-LoRA leaves to quantize too (comma-separated patterns "
        "for ll.quantize's also=; '' for the LoRA bases only)",
    )
    p.add_argument("--remat", action="store_true", help="activation checkpointing per block")
    p.add_argument(
        "--flat-tokens", action="store_true", help="linear layers see (batch*seq, d) inputs"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="for MFU (H200 bf16: 790)")
    p.add_argument("--variants", help="comma-separated; default: all of the mode's variants")
    p.add_argument("--small", action="store_true", help="a tiny run (< 1 min on CPU) for tests")
    p.add_argument("--out", default="experiments/results/bench", help="output path stem")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].small:  # defaults only: flags given explicitly still win
        p.set_defaults(**SMALL)
    return p.parse_args(argv)


# ----- the model and its FLOPs -------------------------------------------------------------


def model_config(args: argparse.Namespace, *, lora_rank: int = 0) -> Any:
    """The `GPTConfig` of a run (``lora_rank > 0``: the inline LoRA variant)."""
    import jax

    from experiments.models.gpt import PRESETS, make_config

    overrides = dict(d_model=args.d_model, n_layer=args.layers, n_head=args.heads)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.vocab is not None:
        overrides["vocab_size"] = args.vocab
    default_len = PRESETS.get(args.config, {}).get("max_len", 1024)
    max_len = args.seq if args.config == "custom" else max(default_len, args.seq)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    return make_config(
        args.config,
        **overrides,
        max_len=max_len,
        dtype=dtype,
        remat=args.remat,
        flat_tokens=args.flat_tokens,
        lora_rank=lora_rank,
        lora_alpha=args.alpha if lora_rank else 0.0,
    )


def flops_per_token(config: Any, seq: int, rank: int, variant: str, mode: str) -> float:
    """Model FLOPs per token, counted analytically (matmuls only, embeddings free).

    Forward: ``2N`` for the ``N`` weights of the linear layers (blocks and lm_head),
    ``4 L T d`` for attention scores and values, ``2 r (d_in + d_out)`` per adapter.
    Training triples the forward for trained weights (``6N``) and doubles it for
    frozen ones (``4N``: input gradients only); attention and adapters train (x3).
    """
    d, n_layer = config.d_model, config.n_layer
    n_linear = n_layer * 12 * d * d + d * config.vocab_size
    attention = 4 * n_layer * seq * d
    adapters = 2 * rank * n_layer * 16 * d  # sum of d_in + d_out over the 4 linears is 16d
    if mode == "inference":
        return 2 * n_linear + attention + (adapters if variant == "unmerged" else 0)
    if variant in ("full", "torch-full"):
        return 6 * n_linear + 3 * attention
    return 4 * n_linear + 3 * attention + 3 * adapters


def _tokens(config: Any, args: argparse.Namespace) -> Any:
    import jax

    key = jax.random.key(1)
    return jax.random.randint(key, (args.batch, args.seq), 0, config.vocab_size)


def _cast_floats(tree: Any, dtype: str) -> Any:
    import jax
    import jax.numpy as jnp

    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, tree)


def _lora_tree(
    args: argparse.Namespace, model: Any, params: Any, tokens: Any, *, use_dora: bool = False
) -> Any:
    import jax

    import lorax_lite as ll

    config = ll.LoraConfig(
        rank=args.rank, alpha=args.alpha, targets=LORA_TARGETS, use_dora=use_dora
    )
    return ll.init(params, config, key=jax.random.key(2), fn=model.apply, args=(tokens,))


def store_base(
    tree: Any,
    storage: str,
    *,
    compute_dtype: str = "float32",
    block: int = 64,
    also: tuple[str, ...] = (),
) -> Any:
    """A LoRA tree with its frozen base stored as ``storage`` (one of `BASE_STORAGE`).

    ``"bf16"``: ``ll.cast_base`` to bfloat16. A quantized kind: every LoRA base and
    every frozen leaf matching ``also`` quantized from its ``compute_dtype`` cast, so
    that it dequantizes straight to the dtype the model computes in (QLoRA's compute
    dtype; no cast after dequantizing), and the remaining frozen floats (LayerNorms,
    biases) in bfloat16, as in the ``"bf16"`` base. Adapters keep their dtype.
    """
    import jax.numpy as jnp

    import lorax_lite as ll

    if storage not in BASE_STORAGE:
        raise ValueError(f"unknown base storage {storage!r}; choose from {list(BASE_STORAGE)}")
    if storage == "bf16":
        return ll.cast_base(tree, jnp.bfloat16)
    tree = ll.cast_base(tree, compute_dtype)
    return _rest_in_bf16(ll.quantize(tree, kind=storage, block=block, also=also))


def _rest_in_bf16(tree: Any) -> Any:
    """Casts the frozen float leaves that are not quantized to bfloat16."""
    import jax
    import jax.numpy as jnp

    import lorax_lite as ll

    # Not ll.cast_base: it would make the quantized weights dequantize to bf16 too.
    is_node = lambda x: isinstance(x, ll.LoraWeight | ll.Trainable | ll.QuantizedWeight)
    floating = lambda x: not is_node(x) and jnp.issubdtype(x.dtype, jnp.floating)
    cast = lambda x: x.astype(jnp.bfloat16) if floating(x) else x
    return jax.tree_util.tree_map(cast, tree, is_leaf=is_node)


def dequantized(tree: Any) -> Any:
    """``tree`` with every `ll.QuantizedWeight` replaced by its float weights."""
    import jax

    import lorax_lite as ll

    is_quantized = lambda x: isinstance(x, ll.QuantizedWeight)
    undo = lambda x: x.dequantize() if is_quantized(x) else x
    return jax.tree_util.tree_map(undo, tree, is_leaf=is_quantized)


def _also(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(p for p in args.quantize_also.split(",") if p)


def inline_from_lora(tree: Any) -> Any:
    """The inline-LoRA model's parameters (``kernel``, ``lora_a``, ``lora_b``) from a LoRA tree."""
    import lorax_lite as ll

    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, ll.LoraWeight):
                out.update(kernel=value.w, lora_a=value.a, lora_b=value.b)
            else:
                out[key] = inline_from_lora(value)
        return out
    return tree.value if isinstance(tree, ll.Trainable) else tree


def _nonzero_adapters(tree: Any) -> Any:
    """``B = 0.01`` everywhere, so that merged and unmerged weights differ from the base."""
    import dataclasses

    import jax

    import lorax_lite as ll

    bump = lambda n: dataclasses.replace(n, b=n.b + 0.01) if isinstance(n, ll.LoraWeight) else n
    return jax.tree_util.tree_map(bump, tree, is_leaf=lambda n: isinstance(n, ll.LoraWeight))


def _compile(fn: Callable, state: Any, *extras: Any, donate: bool = True) -> tuple[Callable, float]:
    """AOT-compiles ``fn(state, *extras)``; returns ``step(state)`` and the compile seconds."""
    import jax

    start = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    compiled = jitted.lower(state, *extras).compile()
    return (lambda s: compiled(s, *extras)), time.perf_counter() - start


def _adamw_step(loss_fn: Callable, tx: Any) -> Callable:
    """``(params, opt_state), *extras -> (new state, loss)`` for ``loss_fn(params, *extras)``."""
    import jax
    import optax

    def step(state, *extras):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *extras)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def _train_parts(variant: str, args: argparse.Namespace) -> tuple[Callable, Any, Any, Any]:
    """``(loss(trainable, frozen, tokens), trainable, frozen, tx)`` of a JAX train variant."""
    import jax
    import optax
    from flax import traverse_util

    import lorax_lite as ll
    from experiments.models.gpt import GPT, causal_lm_loss

    config = model_config(args)
    model, tokens = GPT(config), _tokens(config, args)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])
    loss_of = lambda apply: lambda p, t: causal_lm_loss(apply(p, t), t)
    if variant == "full":
        loss = loss_of(model.apply)
        return (lambda tr, fr, t: loss(tr, t)), params, {}, optax.adamw(args.lr)
    if variant.startswith("lora-"):  # lora over a bf16 or quantized base
        tree = _lora_tree(args, model, params, tokens)
        tree = store_base(
            tree, variant[5:], compute_dtype=config.dtype, block=args.quant_block, also=_also(args)
        )
        trainable, frozen = ll.partition(tree)
        loss = loss_of(ll.lora(model.apply))
        return (
            lambda tr, fr, t: loss(ll.combine(tr, fr), t),
            trainable,
            frozen,
            ll.optimizer(optax.adamw(args.lr)),
        )
    if variant in ("lora", "materialized", "dora", "dora-materialized"):
        tree = _lora_tree(args, model, params, tokens, use_dora=variant.startswith("dora"))
        trainable, frozen = ll.partition(tree)
        if variant in ("lora", "dora"):
            loss = loss_of(ll.lora(model.apply))
        else:  # the naive way: form w + s*A@B (m * V / ||V|| for DoRA), then the plain model
            loss = loss_of(lambda p, t: model.apply(ll.merge(p), t))
        return (
            lambda tr, fr, t: loss(ll.combine(tr, fr), t),
            trainable,
            _cast_floats(frozen, args.base_dtype),
            ll.optimizer(optax.adamw(args.lr)),
        )
    if variant == "inline":
        inline = GPT(model_config(args, lora_rank=args.rank))
        flat = traverse_util.flatten_dict(inline_from_lora(_lora_tree(args, model, params, tokens)))
        trainable = {k: v for k, v in flat.items() if k[-1] in ("lora_a", "lora_b")}
        frozen = {k: v for k, v in flat.items() if k not in trainable}
        loss = loss_of(inline.apply)
        return (
            lambda tr, fr, t: loss(traverse_util.unflatten_dict({**tr, **fr}), t),
            trainable,
            _cast_floats(frozen, args.base_dtype),
            optax.adamw(args.lr),
        )
    raise ValueError(f"unknown JAX train variant {variant!r}")


def _counts(variant: str, trainable: Any, frozen: Any) -> dict[str, int]:
    """Trainable and total parameters, and the frozen base's bytes as stored."""
    import jax

    import lorax_lite as ll

    if variant in ("full", "inline"):  # plain dicts: the split is the partition itself
        leaves = jax.tree_util.tree_leaves
        size = lambda tree: int(sum(x.size for x in leaves(tree)))
        base_bytes = int(sum(x.nbytes for x in leaves(frozen)))
        return dict(n_trainable=size(trainable), n_total=size(trainable) + size(frozen),
                    base_bytes=base_bytes)  # fmt: skip
    counts = ll.count(ll.combine(trainable, frozen))
    return dict(
        n_trainable=counts["trainable"],
        n_total=counts["total"],
        base_bytes=counts["total_bytes"] - counts["trainable_bytes"],
    )


def build_jax_train(variant: str, args: argparse.Namespace) -> Runner:
    """The compiled train step of a JAX train variant (``lora``, ``full``, ``lora-nf4``, ...).

    Its facts: parameter counts and the frozen base's bytes as stored (``ll.count``:
    ``total_bytes - trainable_bytes``); over a quantized base also ``loss_dequantized``,
    the first loss over the dequantized float base, for `worker` to check the step by.
    """
    import jax

    import lorax_lite as ll

    loss, trainable, frozen, tx = _train_parts(variant, args)
    tokens = _tokens(model_config(args), args)
    info = _counts(variant, trainable, frozen)
    is_quantized = lambda x: isinstance(x, ll.QuantizedWeight)
    if any(map(is_quantized, jax.tree_util.tree_leaves(frozen, is_leaf=is_quantized))):
        info["loss_dequantized"] = float(jax.jit(loss)(trainable, dequantized(frozen), tokens))
    state = (trainable, tx.init(trainable))  # the step donates it: the check above comes first
    run, info["compile_s"] = _compile(_adamw_step(loss, tx), state, frozen, tokens)
    return Runner(run, state, info, jax.block_until_ready)


def build_jax_inference(variant: str, args: argparse.Namespace) -> Runner:
    """The compiled forward pass of ``base``, ``merged`` or ``unmerged`` (non-zero adapters)."""
    import jax

    import lorax_lite as ll
    from experiments.models.gpt import GPT

    config = model_config(args)
    model, tokens = GPT(config), _tokens(config, args)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])
    tree = _cast_floats(_lora_tree(args, model, params, tokens), args.base_dtype)
    tree = _nonzero_adapters(tree)
    if variant == "base":
        apply, weights = model.apply, _cast_floats(params, args.base_dtype)
    elif variant == "merged":
        apply, weights = model.apply, jax.jit(ll.merge)(tree)
    elif variant == "unmerged":
        apply, weights = ll.lora(model.apply), tree
    else:
        raise ValueError(f"unknown inference variant {variant!r}")
    # Summing all logits keeps every position's lm_head product alive in the compiled graph.
    forward = lambda state, w, t: (state, apply(w, t).astype("float32").sum())
    run, compile_s = _compile(forward, jax.numpy.zeros(()), weights, tokens, donate=False)
    n_total = sum(x.size for x in jax.tree_util.tree_leaves(weights))
    info = dict(compile_s=compile_s, n_trainable=0, n_total=int(n_total))
    return Runner(run, jax.numpy.zeros(()), info, jax.block_until_ready)


def build_torch_train(variant: str, args: argparse.Namespace) -> Runner:
    """A torch + transformers GPT-2 train step: PEFT LoRA or full fine-tuning, AdamW."""
    import torch
    import transformers

    config = model_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_len,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(hf_config).to(device)
    if args.remat:
        model.gradient_checkpointing_enable()
    if variant != "torch-full":
        import peft

        model = model.to(getattr(torch, args.base_dtype))
        lora_config = peft.LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            target_modules=list(LORA_TARGETS),
            lora_dropout=0.0,
            fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out) like a Flax kernel
        )
        model = peft.get_peft_model(model, lora_config)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, fused=device == "cuda")
    forward = model if variant == "peft-eager" else torch.compile(model)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    half = config.dtype in ("bfloat16", "float16")

    def step(state):
        with torch.autocast(device, dtype=getattr(torch, config.dtype), enabled=half):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return state, loss.detach()

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    info = dict(
        compile_s=None,  # torch.compile compiles in the first step
        n_trainable=sum(p.numel() for p in trained),
        n_total=sum(p.numel() for p in model.parameters()),
    )
    return Runner(step, None, info, sync)


def build(variant: str, args: argparse.Namespace) -> Runner:
    """The runner of ``variant`` in ``args.mode``."""
    if args.mode == "inference":
        return build_jax_inference(variant, args)
    if variant in TORCH_VARIANTS:
        return build_torch_train(variant, args)
    return build_jax_train(variant, args)


# ----- the worker process ---------------------------------------------------------------


def check_first_loss(loss: float, reference: float | None) -> None:
    """Raises ValueError if the first loss is not ``reference`` (None: nothing to check).

    Over a quantized base the reference is the same model's loss over the dequantized
    float weights: a step that computes anything else is not worth timing.
    """
    if reference is not None and abs(loss - reference) > LOSS_TOLERANCE * max(1, abs(reference)):
        raise ValueError(
            f"first loss {loss!r} over the quantized base differs from {reference!r} over its "
            f"dequantized weights by more than {LOSS_TOLERANCE:g} (relative)"
        )


def worker(args: argparse.Namespace) -> int:
    """Builds one variant, compiles and warms it up, then serves ``run N`` / ``stop``."""
    return serve(
        lambda: build(args.worker, args),
        warmup=args.warmup,
        check=lambda loss, info: check_first_loss(loss, info.get("loss_dequantized")),
        torch_row=args.worker in TORCH_VARIANTS,
    )


# ----- the parent: workers, interleaving, summary ---------------------------------------


def _env(coexisting: bool, small: bool = False) -> dict[str, str]:
    extra = {}
    if coexisting:  # several workers share the accelerator: allocate on demand
        extra["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if small:
        extra["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *CHEAP_XLA_FLAGS]).strip()
    return environment(**extra)


def probe() -> dict[str, Any]:
    """`machine_facts` from a short subprocess (the parent never holds a device).

    Only needed when no worker started: each worker reports the facts itself.
    """
    code = "import json; from experiments.bench.workers import machine_facts as f; "
    code += "print(json.dumps(f()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_argv(args: argparse.Namespace, variant: str) -> list[str]:
    flags = ["mode", "config", "d_model", "layers", "heads", "vocab", "batch", "seq", "steps"]
    flags += ["warmup", "dtype", "base_dtype", "quant_block", "quantize_also", "rank", "alpha"]
    flags += ["lr"]
    argv = [sys.executable, "-m", "experiments.bench.train_step", "--worker", variant]
    for flag in flags:
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    argv += ["--remat"] if args.remat else []
    return argv + (["--flat-tokens"] if args.flat_tokens else [])


def _start(args: argparse.Namespace, variant: str, coexisting: bool) -> Worker:
    return start(variant, _worker_argv(args, variant), _env(coexisting, args.small))


def run_variants(args: argparse.Namespace, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Runs every variant; with ``repeats > 1`` all workers live at once and take turns."""
    from tqdm import tqdm

    records = {v: dict(variant=v, times=[], cpu_times=[]) for v in variants}
    groups = [variants] if args.repeats > 1 else [[v] for v in variants]
    bar = tqdm(total=len(variants) * (args.repeats + 1), desc=f"bench {args.mode}", file=sys.stderr)
    for group in groups:
        workers = []
        for variant in group:  # one at a time, so that compile times are not contended
            bar.set_postfix_str(f"compiling {variant}")
            worker = _start(args, variant, coexisting=len(group) > 1)
            records[variant].update(read(worker))
            bar.update()
            if records[variant]["status"] == "ok":
                workers.append(worker)
            else:
                worker.proc.wait()
        for repeat in range(args.repeats):
            shift = repeat % max(len(workers), 1)
            for worker in workers[shift:] + workers[:shift]:
                bar.set_postfix_str(f"repeat {repeat + 1}: {worker.variant}")
                reply = request(worker, f"run {args.steps}")
                if "times" in reply:
                    records[worker.variant]["times"].append(reply["times"])
                    records[worker.variant]["cpu_times"].append(reply["cpu_times"])
                else:  # the worker died; its record says why
                    records[worker.variant].update(reply)
                bar.update()
        for worker in workers:
            records[worker.variant].update(request(worker, "stop"))
            worker.proc.wait()
    bar.close()
    return records


def summarize(args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians, tokens/s, TFLOP/s, MFU per variant, and paired ratios to the reference."""
    config = model_config(args)
    tokens_per_step = args.batch * args.seq
    rows = {}
    for variant, rec in records.items():
        row = {k: v for k, v in rec.items() if k not in ("times", "cpu_times")}
        repeats = [t for t in rec["times"] if t]
        cpu_repeats = [t for t in rec["cpu_times"] if t]
        if rec.get("status") == "ok" and repeats:
            step_s = statistics.median(t for r in repeats for t in r)
            fpt = flops_per_token(config, args.seq, args.rank, variant, args.mode)
            tflops = tokens_per_step / step_s * fpt / 1e12
            row.update(
                step_s=step_s,
                repeat_medians_s=[statistics.median(r) for r in repeats],
                step_times_s=repeats,
                cpu_step_s=statistics.median(t for r in cpu_repeats for t in r),
                cpu_repeat_medians_s=[statistics.median(r) for r in cpu_repeats],
                cpu_times_s=cpu_repeats,
                tokens_per_s=tokens_per_step / step_s,
                flops_per_token=fpt,
                tflops=tflops,
                mfu=tflops / args.peak_tflops,
            )
        rows[variant] = row
    reference = REFERENCE[args.mode]
    return dict(
        variants=rows,
        ratios=paired_ratios(rows, reference),
        cpu_ratios=paired_ratios(rows, reference, key="cpu_repeat_medians_s"),
        speedups=speedups(rows),
        base_storage=base_storage(rows),
    )


def base_storage(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each LoRA base's bytes and step time over the bf16 base's (`QUANT_REFERENCE`).

    Covers ``lora`` and the ``lora-*`` variants that ran; empty unless the reference ran.
    Per variant: ``base_bytes``, ``bytes_ratio``, ``time_ratio`` and ``cpu_time_ratio``
    (paired per repeat, as `paired_ratios`; None for the reference), ``loss_gap`` (first
    loss minus the dequantized base's) over a quantized base, and ``targets`` where
    `QUANT_TARGETS` has some (met: the ratio, median for time, at most the target).
    """
    if "base_bytes" not in rows.get(QUANT_REFERENCE, {}):
        return {}
    family = {
        v: r
        for v, r in rows.items()
        if (v == "lora" or v.startswith("lora-")) and "base_bytes" in r
    }
    wall = paired_ratios(family, QUANT_REFERENCE)
    cpu = paired_ratios(family, QUANT_REFERENCE, key="cpu_repeat_medians_s")
    out = {}
    for variant, row in family.items():
        name = f"{variant}/{QUANT_REFERENCE}"
        entry = dict(
            base_bytes=row["base_bytes"],
            bytes_ratio=row["base_bytes"] / family[QUANT_REFERENCE]["base_bytes"],
            time_ratio=wall.get(name),
            cpu_time_ratio=cpu.get(name),
        )
        if "loss_dequantized" in row:
            entry["loss_gap"] = row["loss_start"] - row["loss_dequantized"]
        if variant in QUANT_TARGETS:
            max_bytes, max_time = QUANT_TARGETS[variant]
            time = entry["time_ratio"] and entry["time_ratio"]["median"]
            entry["targets"] = dict(
                bytes_ratio=max_bytes,
                time_ratio=max_time,
                bytes_met=entry["bytes_ratio"] <= max_bytes,
                time_met=None if time is None else time <= max_time,
            )
        out[variant] = entry
    return out


def speedups(
    rows: dict[str, dict[str, Any]],
    of: tuple[str, ...] = ("lora", "inline"),
    over: tuple[str, ...] = ("full", "materialized"),
) -> dict[str, dict[str, Any]]:
    """``time of Y / time of X`` for each LoRA variant X and baseline Y (the targets' form).

    Wall clock and CPU time, paired per repeat; keys ``"Y/X"`` and ``"Y/X cpu"``.
    """
    out = {}
    for x in of:
        for key, suffix in (("repeat_medians_s", ""), ("cpu_repeat_medians_s", " cpu")):
            pairs = paired_ratios({y: rows[y] for y in (x, *over) if y in rows}, x, key)
            out.update({name + suffix: ratio for name, ratio in pairs.items()})
    return out


def _load(load: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio_text(ratio: dict[str, Any] | None, is_reference: bool) -> str:
    if is_reference:
        return "1"
    if not ratio:
        return "-"
    return f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"


def markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The results table, in Markdown; ratios are medians (range) over paired repeats."""
    m, ref = result["machine"], REFERENCE[args.mode]
    lines = [
        f"## {args.mode} step, GPT {result['model']}, batch {args.batch} x seq {args.seq}",
        "",
        f"`{result['command']}`  ",
        f"commit {result['commit'][:12]}, {m['device']} ({m['backend']}), jax {m['jax']}, "
        f"{m['cpu_count']} CPUs, "
        f"compute {args.dtype}, base {args.base_dtype}, remat {args.remat}, "
        f"flat tokens {args.flat_tokens}, "
        f"rank {args.rank}, {args.repeats} repeat(s) x {args.steps} steps, "
        f"load average {_load(result['load_average']['before'])} before, "
        f"{_load(result['load_average']['after'])} after"
        + (f"; uncommitted changes in {', '.join(result['dirty'])}" if result["dirty"] else ""),
        "",
        f"| variant | tokens/s | step ms (median) | repeat medians ms | time / {ref} "
        f"| CPU time / {ref} | TFLOP/s | MFU | peak memory | first step s | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in result["variants"].items():
        if "step_s" not in row:
            reason = failure_line(row.get("reason", "no timings"))
            lines.append(f"| {variant} | {row.get('status', 'failed')}: {reason} |" + " |" * 9)
            continue
        medians, peak = row["repeat_medians_s"], row.get("peak_bytes")
        wall = _ratio_text(result["ratios"].get(f"{variant}/{ref}"), variant == ref)
        cpu = _ratio_text(result["cpu_ratios"].get(f"{variant}/{ref}"), variant == ref)
        lines.append(
            f"| {variant} | {row['tokens_per_s']:,.0f} | {row['step_s'] * 1e3:.1f} "
            f"| {min(medians) * 1e3:.1f}-{max(medians) * 1e3:.1f} | {wall} | {cpu} "
            f"| {row['tflops']:.3f} | {row['mfu'] * 100:.2f}% "
            f"| {_fmt(peak and peak / 2**30, '.2f')} GiB ({row.get('memory_source', '')}) "
            f"| {row['first_step_s']:.1f} | {row['n_trainable']:,} |"
        )
    if result.get("speedups"):
        lines += [
            "",
            "| speed-up (baseline time / LoRA time) | wall clock | CPU time |",
            "|---|---|---|",
        ]
        for name, ratio in result["speedups"].items():
            if not name.endswith(" cpu"):
                cpu = _ratio_text(result["speedups"].get(name + " cpu"), False)
                lines.append(f"| {name} | {_ratio_text(ratio, False)} | {cpu} |")
    lines += [
        "",
        f"Ratios: step time of the variant over {ref}'s, per interleaved repeat; median (range). "
        f"MFU against {args.peak_tflops:g} TFLOP/s; FLOPs per token counted analytically.",
    ]
    if result.get("base_storage"):
        lines += ["", *base_storage_markdown(args, result["base_storage"])]
    dora = result["ratios"].get(f"dora/{ref}")
    if dora:
        met = "met" if dora["median"] <= DORA_TARGET else "missed"
        cpu = _ratio_text(result["cpu_ratios"].get(f"dora/{ref}"), False)
        lines += [
            "",
            f"DoRA step / LoRA step: {_ratio_text(dora, False)} wall clock, {cpu} CPU time "
            f"(target <= {DORA_TARGET:g}x: {met}).",
        ]
    return "\n".join(lines) + "\n"


def _storage_label(variant: str, args: argparse.Namespace) -> str:
    if variant == "lora":
        return args.base_dtype
    storage = variant[len("lora-") :]
    if storage == "bf16":
        return "bfloat16"
    also = f" + {args.quantize_also}" if args.quantize_also else ""
    return f"{storage}, block {args.quant_block} (LoRA bases{also}; rest bf16)"


def _target_text(targets: dict[str, Any] | None) -> str:
    if not targets:
        return ""
    met = lambda ok: "-" if ok is None else "met" if ok else "missed"
    return (
        f"bytes <= {targets['bytes_ratio']:g}x: {met(targets['bytes_met'])}; "
        f"time <= {targets['time_ratio']:g}x: {met(targets['time_met'])}"
    )


def base_storage_markdown(args: argparse.Namespace, table: dict[str, dict[str, Any]]) -> list[str]:
    """The frozen-base table's lines: bytes and step time over the bf16 base's."""
    ref = QUANT_REFERENCE
    lines = [
        f"### LoRA step by frozen base storage (ratios over {ref})",
        "",
        f"| variant | base stored as | base MiB | bytes / {ref} | time / {ref} "
        f"| CPU time / {ref} | first loss - dequantized base's | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        gap = row.get("loss_gap")
        lines.append(
            f"| {variant} | {_storage_label(variant, args)} | {row['base_bytes'] / 2**20:.3f} "
            f"| {row['bytes_ratio']:.3f} | {_ratio_text(row['time_ratio'], variant == ref)} "
            f"| {_ratio_text(row['cpu_time_ratio'], variant == ref)} "
            f"| {'-' if gap is None else f'{gap:.1e}'} | {_target_text(row.get('targets'))} |"
        )
    lines += [
        "",
        "Base bytes as stored (`ll.count`: total minus trainable bytes). Time ratios paired per "
        "interleaved repeat, median (range). Targets: ../shared/BENCHMARKS.md 9.",
    ]
    return lines


def plot(result: dict[str, Any], path: str) -> None:
    """Tokens/s per variant with the range of the repeat medians (or, with a frozen-base
    table, `plot_base_storage`)."""
    if result.get("base_storage"):
        plot_base_storage(result, path)
        return
    rows = [(v, r) for v, r in result["variants"].items() if "step_s" in r]
    tokens = [r["tokens_per_s"] for _, r in rows]
    per_step = [r["tokens_per_s"] * r["step_s"] for _, r in rows]
    low = [t - n / max(r["repeat_medians_s"]) for t, n, (_, r) in zip(tokens, per_step, rows)]
    high = [n / min(r["repeat_medians_s"]) - t for t, n, (_, r) in zip(tokens, per_step, rows)]
    with figure(path, size=(6, 3.5)) as (_, ax):
        ax.bar([v for v, _ in rows], tokens, yerr=[low, high], capsize=4, color="tab:blue")
        ax.set_ylabel("tokens / s (median; bars: repeat range)")
        ax.set_title(f"{result['mode']} step, GPT {result['model']}", fontsize=10)


def plot_base_storage(result: dict[str, Any], path: str) -> None:
    """Bars of base bytes and step time (wall, CPU) over the bf16 base's, with the targets."""
    table = result["base_storage"]
    names = list(table)
    base_dtype = result["args"]["base_dtype"]
    labels = [f"lora ({base_dtype})" if v == "lora" else v for v in names]
    one = dict(median=1.0, min=1.0, max=1.0)
    with figure(path, 1, 2, size=(10, 3.8)) as (fig, (left, right)):
        left.bar(labels, [table[v]["bytes_ratio"] for v in names], color="tab:blue")
        left.axhline(0.3, color="tab:red", ls="--", lw=1, label="target for int4/nf4: 0.3")
        left.set_ylabel(f"base bytes / {QUANT_REFERENCE}'s")
        left.legend(fontsize=8)
        x = range(len(names))
        bars = ((-0.2, "time_ratio", "tab:green", "wall clock"),
                (0.2, "cpu_time_ratio", "tab:gray", "CPU time"))  # fmt: skip
        for shift, key, color, label in bars:
            ratios = [table[v][key] or (one if v == QUANT_REFERENCE else None) for v in names]
            shown = [(i + shift, r) for i, r in zip(x, ratios) if r]
            if not shown:
                continue
            right.bar(
                [i for i, _ in shown],
                [r["median"] for _, r in shown],
                width=0.4,
                yerr=[
                    [r["median"] - r["min"] for _, r in shown],
                    [r["max"] - r["median"] for _, r in shown],
                ],
                capsize=3,
                color=color,
                label=label,
            )
        right.axhline(1.25, color="tab:red", ls="--", lw=1, label="target for int4/nf4: 1.25")
        right.set_xticks(list(x), labels)
        right.set_ylabel(f"step time / {QUANT_REFERENCE}'s (median; range)")
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.tick_params(axis="x", labelsize=8, rotation=20)
        fig.suptitle(f"LoRA train step by frozen base, GPT {result['model']}", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--worker``, one variant of it)."""
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    allowed = TRAIN_VARIANTS if args.mode == "train" else INFERENCE_VARIANTS
    variants = args.variants.split(",") if args.variants else list(allowed)
    unknown = [v for v in variants if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {args.mode} variants {unknown}; choose from {list(allowed)}")
    load_before, (commit, dirty) = loadavg(), git_commit()  # the code that runs
    records = run_variants(args, variants)
    load_after = loadavg()
    reported = [rec.pop("machine") for rec in records.values() if "machine" in rec]
    machine = reported[0] if reported else probe()
    if args.dtype == "auto":  # as the workers resolved it (the parent never starts a backend)
        args.dtype = "bfloat16" if machine["backend"] == "gpu" else "float32"
    config = model_config(args)
    result = dict(
        mode=args.mode,
        model=f"d={config.d_model} L={config.n_layer} H={config.n_head} V={config.vocab_size}",
        command=command("experiments.bench.train_step", argv),
        commit=commit,
        dirty=dirty,
        machine=machine,
        load_average=dict(before=load_before, after=load_after),
        args={k: v for k, v in vars(args).items() if k != "worker"},
        **summarize(args, records),
    )
    folder, stem = os.path.split(os.path.abspath(args.out))
    publish(folder, stem, result, markdown(args, result).rstrip("\n"), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
