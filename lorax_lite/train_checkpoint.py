"""Training checkpoints: whole training states saved asynchronously with their data position.

`TrainCheckpointer` keeps the last few steps of a run with orbax's ``CheckpointManager``:
the state (adapters, optimizer state, step counter, PRNG key; never the frozen base) and a
JSON dict of bookkeeping such as the data position, checked against a digest on restore.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from .checks import raise_problems
from .json_values import check_json, clipped, json_digest


class Restored(NamedTuple):
    """What `TrainCheckpointer.restore` returns.

    Attributes:
        state: the restored state, with ``like``'s ``frozen`` field put back.
        step: the step restored.
        data: the JSON bookkeeping saved with it.
    """

    state: Any
    step: int
    data: dict[str, Any]


class TrainCheckpointer:
    """Saves and restores training states with an orbax ``CheckpointManager``.

    Each step directory holds the state (adapters, optimizer state, step counter, PRNG
    key) and a JSON dict of bookkeeping such as the data position. Saves are asynchronous
    and atomic (a killed save leaves the earlier steps, and the half-written one is
    cleaned up); the last ``max_to_keep`` steps are kept. A state's ``frozen`` field (the
    base weights of a `TrainState`) is never written: `restore` takes it from ``like``.

    Args:
        directory: where the step directories go (created if missing).
        max_to_keep: how many of the most recent steps to keep (None keeps all).
        save_interval_steps: `save` skips steps not divisible by this.
        async_save: write in a background thread; `wait` or `close` to finish.

    Raises:
        ValueError: if the metadata file of a saved step in ``directory`` is corrupted.

    Example:
        >>> with TrainCheckpointer("/tmp/run/ckpt", max_to_keep=3) as ckpt:  # doctest: +SKIP
        ...     if ckpt.latest_step() is not None:
        ...         state, step, data = ckpt.restore(state)
        ...     ckpt.save(step, state, data={"epoch": 0, "batch": 120})
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = pathlib.Path(directory).absolute()
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                # Handlers known up front, so a fresh process reads a step's metadata.
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError:
            raise
        except Exception as err:  # orbax reads every step's metadata file here
            raise ValueError(
                f"Cannot open the training checkpoints in {self.directory}: the metadata of a "
                f"step (its _CHECKPOINT_METADATA file) is corrupted ({type(err).__name__}: "
                f"{err}). Move the broken step directory aside to use the others."
            ) from err

    def save(
        self, step: int, state: Any, *, data: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Starts saving ``state`` and the JSON-serializable ``data`` as ``step``.

        Args:
            step: the step number naming the checkpoint.
            state: any pytree of arrays (a ``frozen`` field is left out).
            data: JSON-serializable bookkeeping, e.g. the data position.
            force: save even if ``save_interval_steps`` would skip this step.

        Returns:
            Whether a save was started (``save_interval_steps`` may skip the step).

        Raises:
            TypeError: if ``data`` is not JSON-serializable (the message names every
                offending key), before anything is written.
        """
        data = dict(data or {})
        check_json(data, "TrainCheckpointer.save", "data")
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_frozen(state)),
                data=ocp.args.JsonSave(data),
            ),
            force=force,
            custom_metadata={_DATA_DIGEST: json_digest(data)},
        )

    def restore(self, like: Any, *, step: int | None = None) -> Restored:
        """Restores ``step`` (the latest by default) onto the structure of ``like``.

        Args:
            like: a state of the same structure, e.g. freshly initialised; its
                shapes, dtypes and shardings are the restore target, and its
                ``frozen`` field, if any, is put back in the restored state.
            step: the step to restore; the latest saved one by default.

        Returns:
            ``Restored(state, step, data)``.

        Raises:
            FileNotFoundError: if there is no saved step (or not ``step``).
            ValueError: if ``like`` does not have the saved state's structure and
                shapes (the message lists each leaf that differs, with both shapes),
                or if the step cannot be read (truncated or corrupted files).
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No training checkpoint for step {step} in {self.directory}; "
                f"saved steps: {self.all_steps()}"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _without_frozen(like))
        self._check_like(step, abstract)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
            data = self._checked_data(step, restored["data"])
        except Exception as err:
            raise ValueError(
                f"Cannot restore step {step} from {self.directory}: the files are truncated or "
                f"corrupted ({type(err).__name__}: {err}). Restore an earlier step with "
                f"step=... (saved: {self.all_steps()})."
            ) from err
        return Restored(_with_frozen(restored["state"], like), step, data)

    def _check_like(self, step: int, abstract: Any) -> None:
        """Raises if the saved state's leaves differ in path or shape from ``abstract``'s.

        Unreadable metadata is left for the restore to report as corruption.
        """
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = _leaf_shapes(saved.tree if hasattr(saved, "tree") else saved)
        except Exception:
            return
        if not saved:
            return
        wanted = _leaf_shapes(abstract)
        problems = [
            f"{p}: saved with shape {saved[p]}, `like` has shape {wanted[p]}"
            for p in wanted
            if p in saved and saved[p] != wanted[p]
        ]
        problems += [f"{p}: in `like`, not in the saved state" for p in wanted if p not in saved]
        problems += [f"{p}: in the saved state, not in `like`" for p in saved if p not in wanted]
        raise_problems(
            f"Cannot restore step {step} from {self.directory} onto `like`: its leaves differ "
            "from the saved state's",
            problems,
        )

    def _checked_data(self, step: int, data: Any) -> dict[str, Any]:
        """The restored ``data``, checked against the digest saved with it (if any)."""
        if not isinstance(data, dict):
            raise TypeError(f"the data of step {step} is not a JSON object: {clipped(data)}")
        custom = self._manager.metadata(step).custom_metadata or {}
        digest = custom.get(_DATA_DIGEST) if isinstance(custom, dict) else None
        if digest is not None and digest != json_digest(data):
            raise ValueError(f"the data of step {step} does not match the checksum saved with it")
        return data

    def latest_step(self) -> int | None:
        """The most recent completely saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every completely saved step, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# The key of the SHA-256 of a training step's ``data`` in the step's orbax metadata.
_DATA_DIGEST = "lorax_lite_data_sha256"


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"/"-joined path: shape}`` of the array leaves of an abstract or metadata tree, a
    PRNG key by the shape of its key data (as orbax saves it)."""
    shapes = {}
    for path, leaf in ocp.tree.to_flat_dict(tree).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        if getattr(leaf, "shape", None) is not None:
            shapes["/".join(str(k) for k in path)] = tuple(leaf.shape)
    return shapes


def _without_frozen(state: Any) -> Any:
    """``state``'s fields other than ``frozen`` (the base weights) as a dict, if it has one.

    A plain dict, not ``state``'s own type: orbax probes the item with ``isinstance``
    against a protocol, which would evaluate properties such as `TrainState.tree`.
    """
    if dataclasses.is_dataclass(state) and any(
        f.name == "frozen" for f in dataclasses.fields(state)
    ):
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    elif "frozen" in getattr(state, "_fields", ()):
        fields = state._asdict()
    else:
        return state
    del fields["frozen"]
    return fields


def _with_frozen(state: Any, like: Any) -> Any:
    if _without_frozen(like) is like:
        return state
    if dataclasses.is_dataclass(like) and not isinstance(like, type):
        return dataclasses.replace(like, **state)
    return like._replace(**state)
