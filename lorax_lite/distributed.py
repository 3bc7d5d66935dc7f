"""Many hosts: start JAX's distributed runtime, and tell the main process from the others.

JAX's own multi-controller runtime is the engine: every process runs the same program, and a
sharded step (`lorax_lite.sharded_train_step`) over a mesh of all processes' devices trains one
model. Process 0 is the main process: it alone shows progress bars and writes logs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

logger = logging.getLogger("lorax_lite")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> bool:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``), if there is one to join.

    Call it before any other JAX call. Without arguments JAX looks for a cluster (Slurm,
    Open MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``); where it finds none, or where JAX
    has already started, this is a no-op and the program runs as one process.

    Args:
        coordinator_address: ``"host:port"`` of process 0's coordinator service.
        num_processes: the number of processes.
        process_id: this process's index, ``0 <= process_id < num_processes``.
        **kwargs: passed on to ``jax.distributed.initialize`` (e.g.
            ``local_device_ids``, ``initialization_timeout``).

    Returns:
        Whether the distributed runtime is running.

    Raises:
        RuntimeError, ValueError: from ``jax.distributed.initialize`` when arguments were
            given (or ``JAX_COORDINATOR_ADDRESS`` is set) and the runtime cannot start.

    Example:
        >>> import lorax_lite.distributed as dist
        >>> dist.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # doctest: +SKIP
        True
    """
    if jax.distributed.is_initialized():
        return True
    given = coordinator_address is not None or num_processes is not None or process_id is not None
    if given or kwargs or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
        return True
    try:
        jax.distributed.initialize()
    except ValueError as err:  # no cluster detected: nothing names a coordinator
        logger.info("distributed.initialize: no cluster found, running as one process (%s)", err)
        return False
    except RuntimeError as err:  # JAX has started already; it can only run as one process
        logger.warning("distributed.initialize: JAX already started, one process (%s)", err)
        return False
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that shows progress and writes logs.

    Example:
        >>> is_main_process()
        True
    """
    return jax.process_index() == 0
