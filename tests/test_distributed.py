"""Many hosts: two processes on loopback train like one; the main process alone reports."""

import logging
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import train_worker as worker

import lorax_lite as ll
from lorax_lite import distributed

WORKER = pathlib.Path(__file__).with_name("train_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_run() -> tuple[ll.TrainState, ll.TrainState, np.ndarray]:
    """The same steps as the workers, on one device with the whole batch: the initial
    and final states and the losses."""
    init, step = ll.train_step(worker.loss_fn, worker.TX, donate=False)
    start = state = init(worker.lora_tree(), jax.random.key(1))
    losses = []
    for i in range(worker.STEPS):
        state, metrics = step(state, worker.batch(i))
        losses.append(float(metrics["loss"]))
    return start, state, np.array(losses)


def test_two_processes_on_loopback_train_like_one(tmp_path):
    port, outs = free_port(), [tmp_path / f"process{i}.npz" for i in range(2)]
    shared = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), "2", str(port), str(outs[i]), str(shared)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()  # no-op for a process that has exited
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"worker failed:\n{out}\n{err[-3000:]}"
    assert "process 0 of 2: rows slice(0, 16" in results[0][0]
    assert "process 1 of 2: rows slice(16, 32" in results[1][0]
    start, state, losses = single_process_run()
    expected = {**worker.trainable_arrays(state), "losses": losses}
    for out in outs:  # each process's copy of the adapters, and the losses fit recorded
        chex.assert_trees_all_close(dict(np.load(out)), expected, rtol=1e-5, atol=1e-6)
    # Only process 0 shows the progress bar and logs warnings.
    assert "two-process" in results[0][1] and "ran out after 0 of 1" in results[0][1]
    assert "two-process" not in results[1][1] and "ran out" not in results[1][1]
    # Both processes saved to the same directories: one adapter and one step, committed once
    # (a second writer would have found the directory there, or left a temporary one).
    for out, _ in results:
        assert f"saved {shared / 'adapter'}" in out
    assert sorted(p.name for p in shared.iterdir()) == ["adapter", "ckpt"]
    loaded = ll.load_adapter(shared / "adapter", worker.lora_tree())  # the base fingerprint too
    chex.assert_trees_all_close(loaded, state.tree, rtol=1e-5, atol=1e-6)
    with ll.TrainCheckpointer(shared / "ckpt") as ckpt:
        assert ckpt.all_steps() == [worker.STEPS]
        restored = ckpt.restore(start)
    assert restored.data == {"position": worker.STEPS} and int(restored.state.step) == worker.STEPS
    chex.assert_trees_all_close(
        (restored.state.trainable, restored.state.opt_state),
        (state.trainable, state.opt_state),
        rtol=1e-5,
        atol=1e-6,
    )


def test_initialize_is_a_no_op_in_a_single_process(caplog):
    with caplog.at_level(logging.INFO, logger="lorax_lite"):
        assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()
    assert "one process" in caplog.text
    assert jax.process_count() == 1 and distributed.is_main_process()
