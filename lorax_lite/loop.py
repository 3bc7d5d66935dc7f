"""The host training loop: `fit` runs steps, reads their metrics now and then, and reports.

The device runs ahead between host reads; the history, the progress bar and the warnings
about skipped (non-finite) steps come from those reads, and too many non-finite steps in a
row stop the loop with a `NonFiniteError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from .checks import is_int
from .distributed import is_main_process
from .trees import TrainState

logger = logging.getLogger("lorax_lite")


def fit(
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]],
    state: TrainState,
    batches: Iterable[Any],
    *,
    steps: int,
    eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    tokens_per_batch: int | None = None,
    log_every: int = 10,
    desc: str = "train",
    max_consecutive_nonfinite: int | None = 5,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Runs ``steps`` training steps with a progress bar; returns the state and a history.

    The host reads the metrics every ``log_every`` steps (and at the first, last and
    eval steps), so the device runs ahead in between; the bar and warnings show on
    process 0 only (every process calls `fit` with its own batches). Skipped
    non-finite steps are marked ``"skipped"`` in the history and counted in a warning.

    Args:
        step: a step function, e.g. ``ll.train_step(...).step``.
        state: the state to start from.
        batches: an iterable of batches; training stops early (with a warning) if it
            runs out.
        steps: the number of steps to take.
        eval_fn: ``eval_fn(state) -> dict`` of scalars, called every ``eval_every``
            steps; its results enter that step's history entry prefixed ``"eval_"``.
        eval_every: steps between evaluations (0: never).
        tokens_per_batch: tokens (or examples) per batch, for the throughput figure.
        log_every: steps between host reads of the metrics.
        desc: the progress bar's label.
        max_consecutive_nonfinite: how many steps in a row may have a non-finite loss
            or gradients (the ``"nonfinite"`` metric, else a non-finite ``"loss"``)
            before `fit` stops; None never stops.

    Returns:
        ``(state, history)``: one dict per step with ``step`` (the state's step count
        after it), ``loss``, ``grad_norm``, ``nonfinite``, ``skipped``, other scalar
        metrics, ``tokens_per_s`` (measured over the steps since the previous host
        read, so the first entry includes compilation; None without
        ``tokens_per_batch``) and eval results.

    Raises:
        NonFiniteError: after ``max_consecutive_nonfinite`` non-finite steps in a row,
            naming them; its ``state`` and ``history`` are those `fit` would have
            returned (the state passed in was donated to the steps).
        ValueError: if ``max_consecutive_nonfinite`` is not None or an int >= 1.

    Example:
        >>> init, step = ll.train_step(loss_fn, optax.adam(1e-3))  # doctest: +SKIP
        >>> state, history = ll.fit(step, init(tree, key), batches, steps=100)  # doctest: +SKIP
    """
    limit = max_consecutive_nonfinite
    if limit is not None and not is_int(limit, 1):
        raise ValueError(f"max_consecutive_nonfinite must be None or an int >= 1, got {limit!r}")
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    run: list[int] = []  # the steps of the current run of non-finite steps

    def read(pending: list[dict[str, Any]]) -> None:
        """Records the pending metrics; raises once a run of non-finite steps is too long."""
        nonlocal run
        _record(
            history,
            pending,
            first_step=first_step,
            tokens=tokens_per_batch,
            started=started,
            bar=bar,
        )
        run, too_long = _nonfinite_run(history[-len(pending) :], run, limit)
        if too_long:
            bar.close()
            raise NonFiniteError(_nonfinite_message(run, history, limit), state, history)

    first_step = int(_host_value(state.step))
    iterator = iter(batches)
    bar = tqdm(total=steps, desc=desc, disable=not is_main_process(), dynamic_ncols=True)
    started = time.perf_counter()
    for done in range(1, steps + 1):
        batch = next(iterator, _END)
        if batch is _END:
            if is_main_process():
                logger.warning("fit: the batches ran out after %d of %d steps", done - 1, steps)
            break
        state, metrics = step(state, batch)
        pending.append(metrics)
        evaluate = bool(eval_fn and eval_every and done % eval_every == 0)
        if done in (1, steps) or done % log_every == 0 or evaluate:
            read(pending)
            pending = []
            if evaluate and eval_fn is not None:
                results = eval_fn(state)
                history[-1].update({f"eval_{k}": _host_value(v) for k, v in results.items()})
            started = time.perf_counter()
    if pending:  # the batches ran out between host reads
        read(pending)
    bar.close()
    _warn_skipped(history)
    return state, history


_END = object()


class NonFiniteError(FloatingPointError):
    """`fit` met too many steps in a row whose loss or gradients were NaN or inf.

    Attributes:
        state: the training state when `fit` stopped (skipped steps changed no adapter).
        history: the history up to that point.
    """

    def __init__(self, message: str, state: TrainState, history: list[dict[str, Any]]):
        super().__init__(message)
        self.state = state
        self.history = history


def _nonfinite_run(
    entries: list[dict[str, Any]], run: list[int], limit: int | None
) -> tuple[list[int], bool]:
    """The run of non-finite steps after ``entries`` (continuing ``run``), and whether it
    reached ``limit`` (then the run is the one that did)."""
    for entry in entries:
        nonfinite = entry.get("nonfinite", not np.isfinite(entry.get("loss", 0.0)))
        run = [*run, entry["step"]] if nonfinite else []
        if limit is not None and len(run) >= limit:
            return run, True
    return run, False


def _nonfinite_message(run: list[int], history: list[dict[str, Any]], limit: int | None) -> str:
    first, last = run[0], run[-1]
    if all(h.get("skipped") for h in history if first <= h["step"] <= last):
        effect = "their updates were skipped (they changed no adapter)"
    else:
        effect = "their updates were applied (a step built with skip_nonfinite=False)"
    return (
        f"fit: steps {first} to {last} ({len(run)} in a row, max_consecutive_nonfinite="
        f"{limit}) had a NaN or inf loss or gradients; {effect}. Check the batches for "
        "NaN/inf and the learning rate; the exception's state and history attributes hold "
        "where training stopped."
    )


def _warn_skipped(history: list[dict[str, Any]]) -> None:
    skipped = [h["step"] for h in history if h.get("skipped")]
    if skipped and is_main_process():
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        logger.warning(
            "fit: skipped %d of %d updates with a NaN or inf loss or gradients (steps %s)",
            len(skipped),
            len(history),
            shown,
        )


def _record(
    history: list[dict[str, Any]],
    pending: list[dict[str, Any]],
    *,
    first_step: int,
    tokens: int | None,
    started: float,
    bar: tqdm,
) -> None:
    """Reads the pending steps' metrics on the host into ``history``; updates the bar.

    Throughput counts from ``started`` to the completion of the last pending step.
    """
    jax.block_until_ready(pending[-1])
    rate = None if tokens is None else tokens * len(pending) / (time.perf_counter() - started)
    for metrics in pending:
        scalars = {k: _host_value(v) for k, v in metrics.items() if np.size(v) == 1}
        history.append({"step": first_step + len(history) + 1, **scalars, "tokens_per_s": rate})
    shown = {"loss": f"{history[-1]['loss']:.4g}"}
    if rate is not None:
        shown["tok/s"] = f"{rate:.4g}"
    bar.set_postfix(shown, refresh=False)
    bar.update(len(pending))


def _host_value(x: Any) -> Any:
    """A size-1 (or replicated) array's value as a Python scalar, read from this
    process's first shard, so it works for arrays spanning processes."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return np.asarray(x).reshape(-1)[0].item()
