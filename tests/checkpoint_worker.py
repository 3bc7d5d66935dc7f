"""A tiny LoRA training problem, and the subprocesses of the checkpoint tests.

``python tests/checkpoint_worker.py resume DIR STEPS OUT`` restores the latest
training checkpoint in DIR onto a fresh state, trains STEPS more steps from the
restored data position and writes the final state's leaves to OUT (``.npz``).
``python tests/checkpoint_worker.py save-forever DIR`` saves a large state as
steps 0, 1, 2, ... until killed, printing ``saved N`` after each commit.
``python tests/checkpoint_worker.py overwrite-adapter PATH SEED [KILL_AFTER]`` saves
`big_adapter` (SEED) over the adapter at PATH; with KILL_AFTER (a sibling role:
``lorax-lite-old``, ``lorax-lite-trash``, or ``PATH`` for the new one renamed in) it
kills itself with SIGKILL right after renaming a directory to that name.
``python tests/checkpoint_worker.py export-peft DIR SEED [KILL_AFTER]`` exports it with
`to_peft` into DIR, killed likewise (see `export_peft`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

if __name__ == "__main__":  # same devices as the test process (conftest.py), before JAX starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_lite as ll
from lorax_lite import peft
from lorax_lite.train_checkpoint import TrainCheckpointer

CONFIG = ll.LoraConfig(rank=2, alpha=4, dropout=0.1, targets=("hidden", "out"), train=("head",))


def model(params: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"])
    return jnp.tanh(h @ params["out"]["kernel"]) @ params["head"]["kernel"]


def loss_fn(tree: Any, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> jax.Array:
    x, y = batch
    return jnp.mean((ll.lora(model)(tree, x, dropout_key=key) - y) ** 2)


STEP = ll.train_step(loss_fn, optax.adam(3e-2))  # donates the state: saves must copy first


def init_state() -> ll.TrainState:
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "hidden": {"kernel": jax.random.normal(keys[0], (6, 16)) / 3},
        "out": {"kernel": jax.random.normal(keys[1], (16, 8)) / 4},
        "head": {"kernel": jax.random.normal(keys[2], (8, 1)) / 3},
    }
    return STEP.init(ll.init(params, CONFIG, key=keys[3]), jax.random.key(1))


def batch(position: int) -> tuple[jax.Array, jax.Array]:
    """The batch at a data position: the same in every process."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(2), position), (8, 6))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


def train(state: ll.TrainState, position: int, steps: int) -> tuple[ll.TrainState, int]:
    """``steps`` steps from data position ``position``; returns the state and next position."""
    for _ in range(steps):
        state, _ = STEP.step(state, batch(position))
        position += 1
    return state, position


def flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf as a numpy array (PRNG keys as their key data), keyed by leaf index."""
    leaves = jax.tree_util.tree_leaves(tree)
    as_data = lambda x: (
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )
    return {str(i): np.asarray(as_data(x)) for i, x in enumerate(leaves)}


def resume(directory: str, steps: int, out: str) -> None:
    with TrainCheckpointer(directory) as ckpt:
        state, _, data = ckpt.restore(init_state())
    state, _ = train(state, data["position"], steps)
    np.savez(out, **flat_arrays(state))


def save_forever(directory: str) -> None:
    """Saves a ~32 MB state again and again; every leaf of step k holds the value k."""
    big = {f"w{i}": jnp.zeros((1024, 1024), jnp.float32) for i in range(8)}
    with TrainCheckpointer(directory, max_to_keep=2) as ckpt:
        for step in range(10**6):
            ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, big), data={"k": step})
            ckpt.wait()
            print(f"saved {step}", flush=True)


BIG_CONFIG = ll.LoraConfig(rank=64, targets="kernel", train="bias")


def big_base() -> dict[str, Any]:
    return {
        f"dense_{i}": {"kernel": jnp.ones((1024, 1024)), "bias": jnp.zeros(1024)} for i in range(4)
    }


def big_adapter(seed: int, config: ll.LoraConfig = BIG_CONFIG) -> Any:
    """A 2 MiB adapter of `big_base` whose every factor and trained leaf holds ``seed``."""
    tree = ll.init(big_base(), config, key=jax.random.key(0))
    fill = lambda x: jnp.full_like(x, seed) if x is not None else None

    def with_seed(node):
        if isinstance(node, ll.LoraWeight):
            return ll.LoraWeight(node.w, fill(node.a), fill(node.b), node.scale, node.layout)
        return ll.Trainable(fill(node.value)) if isinstance(node, ll.Trainable) else node

    return jax.tree_util.tree_map(
        with_seed, tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight | ll.Trainable)
    )


def overwrite_adapter(path: str, seed: int, kill_after: str | None) -> None:
    rename = os.rename

    def rename_then_maybe_die(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if kill_after is not None and str(dst).endswith(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_maybe_die
    tree = big_adapter(seed)
    print("saving", flush=True)
    ll.save_adapter(path, tree, BIG_CONFIG, overwrite=True)
    print("saved", flush=True)


def peft_config(seed: int) -> ll.LoraConfig:
    """`BIG_CONFIG` with alpha ``seed``: two exports differ in their scale, not only values."""
    return ll.LoraConfig(rank=64, alpha=float(seed), targets="kernel", train="bias")


def export_peft(path: str, seed: int, kill_after: str | None) -> None:
    """`to_peft` of `big_adapter` (SEED, alpha SEED) into PATH, killed with SIGKILL right
    after a rename or a tensors file write whose destination ends with KILL_AFTER."""

    def then_maybe_die(write):
        def wrapped(*args, **kwargs):
            write(*args, **kwargs)
            if kill_after is not None and str(args[1]).endswith(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)

        return wrapped

    os.rename, os.replace = then_maybe_die(os.rename), then_maybe_die(os.replace)
    peft.write.save_file = then_maybe_die(peft.write.save_file)
    config = peft_config(seed)
    ll.to_peft(path, big_adapter(seed, config), config, peft.default_name_map, overwrite=True)
    print("exported", flush=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "resume":
        resume(rest[0], int(rest[1]), rest[2])
    elif command == "save-forever":
        save_forever(rest[0])
    elif command == "overwrite-adapter":
        overwrite_adapter(rest[0], int(rest[1]), rest[2] if len(rest) > 2 else None)
    elif command == "export-peft":
        export_peft(rest[0], int(rest[1]), rest[2] if len(rest) > 2 else None)
    else:
        raise SystemExit(f"unknown command {command!r}")
