"""The work of `experiments.scale` inside one process of N fake devices: abstract training
states of a Llama, their sharded steps compiled without allocating, and a real step's RSS.

Import it only in a process whose ``XLA_FLAGS`` already set the device count.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import lorax_lite as ll
from experiments import runner
from experiments.bench.workers import compiled_sizes
from experiments.memory import largest_batch, next_token_loss, tree_bytes
from experiments.models import LLAMA_PROJECTIONS
from experiments.models.llama import Llama, LlamaConfig, make_config

GB = 1e9


def model_config(name: str, variant: str, remat: bool) -> LlamaConfig:
    """bf16 compute; float32 weights for full fine-tuning (master weights), bf16 under LoRA."""
    param_dtype = "float32" if variant == "full" else "bfloat16"
    return make_config(name, dtype="bfloat16", param_dtype=param_dtype, remat=remat)


def build_tree(config: LlamaConfig, variant: str, args: argparse.Namespace) -> Any:
    """The variant's parameter tree: every leaf `ll.Trainable`, LoRA, or LoRA over NF4."""
    model = Llama(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    if variant == "full":
        return jax.tree_util.tree_map(ll.Trainable, params)
    lora = ll.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=LLAMA_PROJECTIONS)
    tree = ll.init(params, lora, key=jax.random.key(1), fn=model.apply, args=(tokens,))
    if variant == "qlora":  # the adapted weights only, as QLoRA does
        tree = ll.quantize(tree, kind="nf4", block=args.quant_block)
    return tree


def data_mesh() -> jax.sharding.Mesh:
    """Every device on one ``data`` axis, in Auto mode (as `ll.sharded_train_step` uses it)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def sharded_step(config: LlamaConfig, mesh: jax.sharding.Mesh) -> ll.TrainStep:
    """AdamW on `memory.next_token_loss`, batch over ``data``, the base FSDP-sharded."""
    loss = next_token_loss(Llama(config))
    return ll.sharded_train_step(loss, optax.adamw(1e-4), mesh=mesh, base_sharding="fsdp")


def abstract_state(step: ll.TrainStep, tree: Any, mesh: jax.sharding.Mesh) -> ll.TrainState:
    """``step.init(tree)`` as shapes carrying the shardings `ll.place` gives them.

    `ll.place` takes arrays only, and a jitted one's compiled output shardings come back
    replicated (a ``device_put`` inside ``jit`` does not pin them), so the shardings are
    read from the one ``device_put`` that `ll.place` traces to.
    """
    state = jax.eval_shape(step.init, tree, jax.random.key(0))
    place = lambda s: ll.place(s, mesh=mesh, base_sharding="fsdp")[0]
    puts = [e for e in jax.make_jaxpr(place)(state).eqns if e.primitive.name == "device_put"]
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if len(puts) != 1 or len(puts[0].params["devices"]) != len(leaves):
        raise RuntimeError("ll.place no longer traces to one device_put of the whole state")
    shaped = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        for x, s in zip(leaves, puts[0].params["devices"], strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, shaped)


def lower_abstract(step: ll.TrainStep, state: ll.TrainState, batch: Any) -> Any:
    """``step.step.lower`` for abstract arguments.

    The public ``step.step.lower`` places its arguments with ``jax.device_put``, which
    takes no ``ShapeDtypeStruct``; this lowers the jitted update it wraps
    (``CompiledStep.compiled``) with the arguments as it passes them: the state without
    its frozen base, the base, the batch.
    """
    return step.step.compiled.lower(dataclasses.replace(state, frozen=None), state.frozen, batch)


def layer_flops_per_token(config: LlamaConfig, seq: int, variant: str, remat: bool) -> float:
    """FLOPs of one layer per token of a training step, by formula: matmuls ``2 P`` forward
    (P = the layer's weights), attention ``4 seq d_head n_head`` forward (the causal mask
    is applied to the full square); backward 2x forward, without the weight gradients under
    LoRA (1x for the matmuls); remat adds one forward."""
    d, hd = config.d_model, config.head_dim
    weights = d * hd * (2 * config.n_head + 2 * config.n_kv_head) + 3 * d * config.d_ff
    attention = 4 * seq * hd * config.n_head
    matmul_passes = (3 if variant == "full" else 2) + remat
    return matmul_passes * 2 * weights + (3 + remat) * attention


class Cell:
    """One model, variant and remat setting on this process's mesh, compiled per batch."""

    def __init__(self, name: str, variant: str, remat: bool, args: argparse.Namespace):
        self.config = model_config(name, variant, remat)
        self.mesh, self.seq = data_mesh(), args.seq
        self.devices = self.mesh.size
        tree = jax.eval_shape(lambda: build_tree(self.config, variant, args))
        self.bytes = tree_bytes(tree)
        self.step = sharded_step(self.config, self.mesh)
        self.state = abstract_state(self.step, tree, self.mesh)
        self.layer_flops = layer_flops_per_token(self.config, args.seq, variant, remat)
        self.cache: dict[int, dict[str, Any]] = {}

    def at(self, batch: int) -> dict[str, Any]:
        """Compiled sizes, FLOPs and compile time at ``batch`` sequences per device."""
        if batch not in self.cache:
            tick = time.perf_counter()
            sharding = NamedSharding(self.mesh, PartitionSpec("data"))
            tokens = jax.ShapeDtypeStruct(
                (batch * self.devices, self.seq + 1), jnp.int32, sharding=sharding
            )
            compiled = lower_abstract(self.step, self.state, tokens).compile()
            seconds = time.perf_counter() - tick
            raw = float(compiled.cost_analysis().get("flops", 0.0)) / (batch * self.seq)
            extra_layers = (self.config.n_layer - 1) * self.layer_flops
            self.cache[batch] = dict(
                compiled_sizes(compiled),
                xla_flops_per_token=raw,
                flops_per_token=raw + extra_layers,
                compile_s=round(seconds, 2),
            )
        return self.cache[batch]


def compile_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every model, variant and remat setting at batch 1 per device, and the largest batch
    per budget where ``--search`` asks for it (the ``--anchor`` model on its meshes only)."""
    n = jax.device_count()
    anchor = args.anchor
    models = [m for m in args.models if m != anchor["model"] or n in anchor["devices"]]
    rows = []
    for name in models:
        for variant in args.variants:
            for remat in args.remat:
                cell = Cell(name, variant, remat, args)
                search = _searched(args, name, variant, n, remat)
                rows.append(cell_row(cell, name, variant, remat, args if search else None))
    return rows


def cell_row(
    cell: Cell, name: str, variant: str, remat: bool, search: argparse.Namespace | None
) -> dict[str, Any]:
    """A row of the table: batch 1 per device, and with ``search`` (the arguments) the
    largest batch within each budget with its peak and the next batch's."""
    row = dict(model=name, variant=variant, remat=remat, devices=cell.devices)
    row.update(n_layer=cell.config.n_layer, bytes=cell.bytes, batch1=cell.at(1), largest={})
    peak = lambda b: cell.at(b)["peak"]
    for budget in search.budgets_gb if search else ():
        best = largest_batch(peak, budget * GB, search.max_batch)
        row["largest"][str(budget)] = dict(
            batch=best,
            peak=peak(best) if best else None,
            next_peak=peak(best + 1) if best < search.max_batch else None,
        )
    row["compiles"] = len(cell.cache)
    return row


def _searched(
    args: argparse.Namespace, model: str, variant: str, devices: int, remat: bool
) -> bool:
    s = args.search
    return (
        model in s["models"]
        and devices in s["devices"]
        and ("on" if remat else "off") in s["remat"]
        and variant in s["variants"]
    )


# ----- the method against reality --------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_rss(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """Peak RSS of a real step (``spec`` = ``variant:devices``, remat off) beside the
    compiled prediction: the per-device peak times the devices (fake devices share the
    host's memory)."""
    variant = spec.split(":")[0]
    jax.devices()
    start_rss = resident_bytes()
    args = argparse.Namespace(**{**vars(args), "seq": args.rss_seq})
    cell = Cell(args.rss_model, variant, False, args)
    predicted = cell.at(args.rss_batch)
    config, mesh = cell.config, cell.mesh
    step = sharded_step(config, mesh)
    state = step.init(build_tree(config, variant, args), jax.random.key(0))
    gc.collect()
    state_rss = resident_bytes()
    shape = (args.rss_batch * mesh.size, args.rss_seq + 1)
    tokens = jax.random.randint(jax.random.key(2), shape, 0, config.vocab_size)
    losses = []
    for _ in range(2):
        state, metrics = step.step(state, tokens)
        losses.append(float(metrics["loss"]))
    peak = runner.peak_rss_bytes()
    return dict(
        variant=variant, devices=mesh.size, batch_per_device=args.rss_batch, seq=args.rss_seq,
        start_rss=start_rss, state_rss=state_rss, peak_rss=peak, step_rss=peak - start_rss,
        predicted_per_device=predicted, predicted=predicted["peak"] * mesh.size,
        predicted_arguments=predicted["arguments"] * mesh.size, losses=losses,
    )  # fmt: skip
