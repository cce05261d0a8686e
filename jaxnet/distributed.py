"""Several processes, one program: JAX's distributed runtime for jaxnet runs.

PyTorch's multi-process recipe is ``torchrun`` (or SLURM) starting one process
per device, ``dist.init_process_group`` joining them, a
``DistributedSampler`` giving each rank its part of the data, and rank 0
alone writing logs and checkpoints. JAX's counterpart:

- every process calls ``jax.distributed.initialize`` (:func:`initialize_from_env`
  reads where the coordinator is, how many processes there are and which one
  this is, from the environment that ``jaxnet launch``, SLURM or you set);
- afterwards ``jax.devices()`` lists the devices of *all* processes, and one
  :class:`~jax.sharding.Mesh` over them all drives the same jit-compiled step
  in every process (single program, multiple data);
- each process reads only its own rows of every global batch
  (:func:`process_batch_slice`, the ``DistributedSampler`` counterpart) and
  the rows are assembled, without any copying between processes, into one
  global ``jax.Array`` (:func:`global_batch_from_local`);
- only :func:`is_main_process` writes files.

Environment (the same on one host or many)::

    JAXNET_COORDINATOR_ADDRESS=host0:12355   # MASTER_ADDR:MASTER_PORT in torch
    JAXNET_NUM_PROCESSES=4                   # WORLD_SIZE
    JAXNET_PROCESS_ID=0..3                   # RANK

Under SLURM with more than one task and none of these set, JAX reads the
SLURM variables itself (``srun jaxnet train ...`` needs nothing else).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxnet.data.loader import iterate_batches
from jaxnet.errors import ConfigError
from jaxnet.sharding import DATA_AXIS, batch_sharding, check_batch_divisible

COORDINATOR_ENV = "JAXNET_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXNET_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXNET_PROCESS_ID"
# Seconds without a heartbeat after which the coordinator declares a process
# dead and the others stop with an error (JAX's default is 100).
HEARTBEAT_TIMEOUT_SECONDS = 20

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run."""

    coordinator_address: str  # "host:port" of process 0's coordination service
    num_processes: int  # processes in the run (torch's WORLD_SIZE)
    process_id: int  # this process, 0 .. num_processes - 1 (torch's RANK)


def _int_env(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None


def config_from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """Reads the ``JAXNET_*`` variables; ``None`` when none is set (a single-process run).

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        The :class:`DistributedConfig`, or ``None``.

    Raises:
        ConfigError: some but not all variables set, non-integers, or a
            process id outside ``[0, num_processes)``.

    >>> config_from_env({}) is None
    True
    >>> config_from_env({"JAXNET_COORDINATOR_ADDRESS": "127.0.0.1:1234",
    ...                  "JAXNET_NUM_PROCESSES": "2", "JAXNET_PROCESS_ID": "1"}).process_id
    1
    """
    environ = os.environ if environ is None else environ
    names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    present = [n for n in names if environ.get(n)]
    if not present:
        return None
    if len(present) < len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise ConfigError(f"multi-process run: {', '.join(present)} set but {missing} missing; set all three")
    address = environ[COORDINATOR_ENV]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{COORDINATOR_ENV} must be HOST:PORT (e.g. 127.0.0.1:12355), got {address!r}")
    num, pid = _int_env(environ, NUM_PROCESSES_ENV), _int_env(environ, PROCESS_ID_ENV)
    if num < 1 or not 0 <= pid < num:
        raise ConfigError(
            f"{PROCESS_ID_ENV}={pid} must be in [0, {NUM_PROCESSES_ENV}) with {NUM_PROCESSES_ENV}={num} >= 1"
        )
    return DistributedConfig(address, num, pid)


def initialize_from_env(
    environ: Mapping[str, str] | None = None, *, heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS
) -> DistributedConfig | None:
    """Joins the multi-process run described by the environment, if any (``init_process_group``).

    Call it first, before any JAX computation. With ``JAXNET_*`` set it calls
    ``jax.distributed.initialize`` with them; with none set but a SLURM job of
    more than one task, it lets JAX read SLURM's variables; otherwise it does
    nothing (a single-process run). Calling it again is a no-op. On CPU the
    processes exchange data with gloo (JAX's default CPU collectives).

    Args:
        environ: the environment (default ``os.environ``).
        heartbeat_timeout_seconds: after this long without news from a
            process, the others stop with an error instead of waiting forever.

    Returns:
        The configuration used (``None`` for a single-process run or SLURM).

    Raises:
        ConfigError: malformed ``JAXNET_*`` variables.
    """
    environ = os.environ if environ is None else environ
    config = config_from_env(environ)
    if jax.distributed.is_initialized():
        return config
    if config is not None:
        if config.num_processes > 1:
            jax.distributed.initialize(
                coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                process_id=config.process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            )
            log.info("process %d of %d joined %s", config.process_id, config.num_processes,
                     config.coordinator_address)
        return config
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return None


def is_main_process() -> bool:
    """Whether this process writes logs and checkpoints (``dist.get_rank() == 0``)."""
    return jax.process_index() == 0


def process_batch_slice(global_batch_indices: np.ndarray, process_index: int | None = None,
                        process_count: int | None = None) -> np.ndarray:
    """This process's part of a global batch: its contiguous block of the indices.

    Counterpart of ``DistributedSampler``: every process computes the same
    shuffled order (a pure function of seed and epoch) and keeps block
    ``process_index`` of each global batch -- the rows that
    :func:`global_batch_from_local` places on this process's devices.

    Args:
        global_batch_indices: ``(B,)`` example indices of one global batch.
        process_index: default ``jax.process_index()``.
        process_count: default ``jax.process_count()``.

    Returns:
        ``(B / process_count,)`` indices.

    Raises:
        ConfigError: if ``B`` is not divisible by the number of processes.

    >>> process_batch_slice(np.arange(8), 1, 2).tolist()
    [4, 5, 6, 7]
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process index {index} must be in [0, {count})")
    size = len(global_batch_indices)
    if size % count:
        raise ConfigError(f"global batch size {size} is not divisible by {count} processes; use a multiple of {count}")
    per = size // count
    return np.asarray(global_batch_indices)[index * per : (index + 1) * per]


def iterate_process_batches(
    images: Any, labels: Any, global_batch_size: int, *, shuffle: bool = True, seed: int = 0,
    epoch: int = 0, start_batch: int = 0,
) -> Iterator[dict[str, Any]]:
    """This process's rows of every global batch of one epoch (incomplete last batch dropped).

    The same order as ``iterate_batches(..., drop_last=True)`` in a
    single-process run, so both runs see the same global batches.

    Args:
        images, labels: the whole split (each process holds or can index it).
        global_batch_size: examples per step over all processes.
        shuffle, seed, epoch, start_batch: as for :func:`jaxnet.data.iterate_batches`.

    Returns:
        An iterator of ``{"image", "label"}`` numpy batches of
        ``global_batch_size / jax.process_count()`` rows.
    """
    if global_batch_size % jax.process_count():
        check_batch_divisible(global_batch_size, jax.process_count())
    order = iterate_batches(np.arange(len(labels)), labels, global_batch_size, shuffle=shuffle, seed=seed,
                            epoch=epoch, drop_last=True, start_batch=start_batch)
    for batch in order:
        idx = process_batch_slice(batch["image"])
        yield {"image": images[idx], "label": labels[idx]}


def global_batch_from_local(local_batch: Any, mesh: Mesh, *, axis: str = DATA_AXIS) -> Any:
    """Assembles the processes' local batches into one global batch, split over ``axis``.

    Each process passes its own ``(B / P, ...)`` rows; the result is a global
    ``(B, ...)`` ``jax.Array`` whose shards already sit on the devices that
    use them (``jax.make_array_from_process_local_data``). With one process it
    is ``jax.device_put`` onto the batch sharding.

    Args:
        local_batch: pytree of host arrays, this process's rows.
        mesh: the mesh over all processes' devices.
        axis: the batch's mesh axis.

    Returns:
        The global batch, a pytree of ``jax.Array``.

    Raises:
        ConfigError: local rows not divisible by this process's devices.
    """
    sharding = batch_sharding(mesh, axis=axis)
    local_devices = len(sharding.addressable_devices)

    def assemble(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ConfigError(
                f"this process holds {x.shape[0]} rows of the batch for {local_devices} local devices; "
                f"the global batch size must be a multiple of {mesh.shape[axis]} devices"
            )
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(assemble, local_batch)


def global_batches(local_batches: Iterable[Any], mesh: Mesh, *, size: int = 2, axis: str = DATA_AXIS) -> Iterator[Any]:
    """:func:`global_batch_from_local` over an iterator, ``size`` batches in flight.

    The multi-process counterpart of :func:`jaxnet.data.prefetch_to_device`.
    """
    if size < 1:
        raise ConfigError(f"prefetch size must be >= 1, got {size}")
    source = iter(local_batches)
    queue = collections.deque(global_batch_from_local(b, mesh, axis=axis) for b in itertools.islice(source, size))
    while queue:
        yield queue.popleft()
        queue.extend(global_batch_from_local(b, mesh, axis=axis) for b in itertools.islice(source, 1))


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a whole numpy array in every process, however it is sharded.

    For checkpoints and logs written by the main process. With several
    processes it is a collective: every process must call it.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
