"""Several processes (hosts) on JAX's own distributed runtime: starting it, each process's share of a subject
list, gathering what each process counted alone, and which process writes files.

A launch is described by ``run.py``'s flags (``--coordinator_address``, ``--num_processes``, ``--process_id``,
``--distributed``), never by the run's Config: the same run may be resumed on another machine. With none of them
and no launcher of several processes detected (``srun`` or ``mpirun`` with more than one task), nothing is
started and the process is the whole run. On CPU, collectives between processes go through gloo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, TypeVar

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mrirecon_jax.config import UserError

T = TypeVar("T")
# Set by a launcher that started several tasks of this program: srun (a job step) and Open MPI's mpirun.
LAUNCHER_TASKS_ENV = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: explicit coordinates, or `detect` for jax.distributed's own detection
    (SLURM, Open MPI, Cloud TPU); `detect=None` detects only when a launcher of several tasks is found."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    detect: Optional[bool] = None
    timeout_s: int = 300  # to connect, and to wait for the others at shutdown

    def explicit(self) -> bool:
        given = [v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise UserError("Give all three of --coordinator_address, --num_processes and --process_id, or none.")
        if all(given) and not 0 <= self.process_id < self.num_processes:
            raise UserError(f"--process_id={self.process_id} must be between 0 and --num_processes-1 "
                            f"({self.num_processes - 1}).")
        return all(given)

    def starts_runtime(self) -> bool:
        """Whether this launch starts jax.distributed (explicit coordinates, --distributed, or a launcher)."""
        if self.explicit():
            return True
        if self.detect is None:
            return any(int(os.environ.get(name, "1") or 1) > 1 for name in LAUNCHER_TASKS_ENV)
        return self.detect


_started = False


def initialize(launch: Launch) -> bool:
    """Start JAX's distributed runtime if `launch` asks for it (before any JAX computation); True if started."""
    global _started
    if not launch.starts_runtime():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce through gloo
    try:
        jax.distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id,
                                   initialization_timeout=launch.timeout_s,
                                   shutdown_timeout_seconds=launch.timeout_s)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"The distributed runtime did not start ({first[:300]}).") from None
    _started = True
    logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def shutdown() -> None:
    """Leave the distributed runtime (waiting for the other processes), if this process started it."""
    global _started
    if _started:
        jax.distributed.shutdown()
        _started = False


def is_writer() -> bool:
    """Whether this process writes the run's files (logs, metrics, figures, reports): process 0 only."""
    return jax.process_index() == 0


def share() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def process_share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Process `index`'s share of `items` among `count` processes: every count-th item from the index-th, so the
    shares are disjoint, cover every item and differ in size by at most one."""
    if count > len(items):
        raise UserError(f"{len(items)} training subjects cannot be shared among {count} processes; use fewer "
                        "processes or more subjects.")
    return list(items)[index::count]


def gather(value) -> np.ndarray:
    """One number (or array of one shape) from every process, stacked in process order; on one process, (1, ...)."""
    if jax.process_count() == 1:
        return np.asarray(value)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def gather_strings(strings: Sequence[str]) -> list[list[str]]:
    """Each process's list of strings, in process order (sent as padded UTF-8 bytes)."""
    data = np.frombuffer("\n".join(strings).encode(), np.uint8)
    sizes = gather(len(data))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    rows = gather(padded)
    return [bytes(row[:size]).decode().split("\n") if size else [] for row, size in zip(rows, sizes)]


def to_host(tree):
    """Every array of `tree` as one numpy array on this process, gathered from the others where it spans them."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)
