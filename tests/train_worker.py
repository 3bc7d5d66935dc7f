"""A tiny LoRA regression problem, and one process of the two-process training test.

``python tests/train_worker.py PROCESS_ID NUM_PROCESSES PORT OUT SHARED`` joins a loopback
cluster (``127.0.0.1:PORT``, CPU collectives) with 4 CPU devices per process, trains
``STEPS`` steps of `sharded_train_step` (FSDP base) on a (2, 4) mesh over all processes'
devices with `fit`, each process passing its own rows of every batch, and writes the final
trainable leaves to OUT (``.npz``). Then every process saves the trained adapter to
``SHARED/adapter`` (`save_adapter`) and the state to ``SHARED/ckpt`` (`TrainCheckpointer`),
and calls `fit` once more without batches (the warning is process 0's alone).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX starts: 4 CPU devices in this process
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll

CONFIG = ll.LoraConfig(rank=2, alpha=4, targets=("hidden", "out"), train=("head",))
TX = optax.adam(3e-2)
STEPS = 3
BATCH = 32


def model(params: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"])
    return jnp.tanh(h @ params["out"]["kernel"]) @ params["head"]["kernel"]


def lora_tree(dropout: float = 0.0) -> Any:
    """A base MLP with adapters on two kernels (B non-zero) and a fully trained head.

    Built from numpy draws (no per-op compilation), the same in every process.
    """
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    params = {
        "hidden": {"kernel": jnp.asarray(normal(8, 16) / 3)},
        "out": {"kernel": jnp.asarray(normal(16, 8) / 4)},
        "head": {"kernel": jnp.asarray(normal(8, 1) / 3)},
    }
    tree = ll.init(params, dataclasses.replace(CONFIG, dropout=dropout), key=jax.random.key(0))

    def nonzero_b(node: Any) -> Any:
        if isinstance(node, ll.LoraWeight):
            return dataclasses.replace(node, b=jnp.asarray(0.3 * normal(*node.b.shape)))
        return node

    return jax.tree_util.tree_map(nonzero_b, tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight))


def batch(index: int, size: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of a fixed regression task, as host arrays."""
    rng = np.random.default_rng(index)
    x = rng.normal(size=(size, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(axis=1, keepdims=True)) + 0.5 * np.cos(x[:, 4:].sum(axis=1))[:, None]
    return x, y.astype(np.float32)


def loss_fn(tree: Any, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> jax.Array:
    x, y = batch
    return jnp.mean((ll.lora(model)(tree, x, dropout_key=key) - y) ** 2)


def trainable_arrays(state: ll.TrainState) -> dict[str, np.ndarray]:
    """The trainable leaves on the host, keyed by leaf index (one process's copy)."""
    leaves = jax.tree_util.tree_leaves(state.trainable)
    return {str(i): np.asarray(x.addressable_shards[0].data) for i, x in enumerate(leaves)}


def local_rows(sharding: jax.sharding.Sharding, size: int) -> slice:
    """The rows of a global batch that this process's devices hold."""
    spans = sharding.addressable_devices_indices_map((size, 8)).values()
    return slice(min(s[0].start or 0 for s in spans), max(s[0].stop or size for s in spans))


def main(process_id: int, num_processes: int, port: int, out: str, shared: str) -> None:
    if not ll.distributed.initialize(
        f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=60
    ):
        raise SystemExit("the distributed runtime did not start")
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    init, step = ll.sharded_train_step(
        loss_fn, TX, mesh=mesh, axis_name="data", base_sharding="fsdp"
    )
    state = init(lora_tree(), jax.random.key(1))
    rows = local_rows(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), BATCH)
    local_batches = ((x[rows], y[rows]) for x, y in map(batch, range(STEPS)))
    state, history = ll.fit(step, state, local_batches, steps=STEPS, desc="two-process")
    np.savez(out, **trainable_arrays(state), losses=[h["loss"] for h in history])
    print(f"process {jax.process_index()} of {jax.process_count()}: rows {rows}", flush=True)
    print(f"saved {ll.save_adapter(f'{shared}/adapter', state.tree, CONFIG)}", flush=True)
    with ll.TrainCheckpointer(f"{shared}/ckpt") as ckpt:
        ckpt.save(STEPS, state, data={"position": STEPS})
    ll.fit(step, state, iter(()), steps=1, desc="no batches")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
