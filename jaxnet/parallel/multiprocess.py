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
  global ``jax.Array`` (:func:`global_batch_from_local`); these live in
  :mod:`jaxnet.parallel.process_batches` and are importable from here;
- only :func:`is_main_process` writes files.

Environment (the same on one host or many)::

    JAXNET_COORDINATOR_ADDRESS=host0:12355   # MASTER_ADDR:MASTER_PORT in torch
    JAXNET_NUM_PROCESSES=4                   # WORLD_SIZE
    JAXNET_PROCESS_ID=0..3                   # RANK

Under SLURM with more than one task and none of these set, JAX reads the
SLURM variables itself (``srun jaxnet train ...`` needs nothing else).

Joining waits until every process has arrived, at most
``JAXNET_INIT_TIMEOUT`` seconds (default 300), with a ``waiting for ...``
line every 15 s; Ctrl-C stops the wait. JAX's own wait, in C++, could be
neither interrupted nor survived: it ends the process with a C++ stack trace.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax

from jaxnet.errors import ConfigError
from jaxnet.parallel.process_batches import (
    gather_to_host,
    global_batch_from_local,
    global_batches,
    iterate_process_batches,
    process_batch_slice,
)

__all__ = [
    "COORDINATOR_ENV",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "INIT_TIMEOUT_ENV",
    "INIT_TIMEOUT_SECONDS",
    "JAX_DEADLINE_MARGIN_SECONDS",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
    "PROGRESS_SECONDS",
    "SLURM_STEP_VARIABLES",
    "WAIT_SLICE_SECONDS",
    "DistributedConfig",
    "config_from_env",
    "gather_to_host",
    "global_batch_from_local",
    "global_batches",
    "init_timeout_from_env",
    "initialize_from_env",
    "is_main_process",
    "iterate_process_batches",
    "process_batch_slice",
    "slurm_tasks_from_env",
]

COORDINATOR_ENV = "JAXNET_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXNET_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXNET_PROCESS_ID"
INIT_TIMEOUT_ENV = "JAXNET_INIT_TIMEOUT"
# Seconds without a heartbeat after which the coordinator declares a process
# dead and the others stop with an error (JAX's default is 100).
HEARTBEAT_TIMEOUT_SECONDS = 20
INIT_TIMEOUT_SECONDS = 300.0  # default wait for all processes to join (JAX's default too)
PROGRESS_SECONDS = 15.0  # between "waiting for ..." lines while joining
# JAX's own deadline is set this much later than ours, as a safety net only:
# when it passes, JAX's C++ client aborts the whole process.
JAX_DEADLINE_MARGIN_SECONDS = 60
WAIT_SLICE_SECONDS = 0.2  # the main thread wakes this often, so that Ctrl-C is handled at once
# Variables JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py), set by srun for each task.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

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


def init_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for all processes to join: ``JAXNET_INIT_TIMEOUT``, default 300.

    Raises:
        ConfigError: not a positive number.

    >>> init_timeout_from_env({"JAXNET_INIT_TIMEOUT": "30"})
    30.0
    """
    environ = os.environ if environ is None else environ
    text = environ.get(INIT_TIMEOUT_ENV, "").strip()
    if not text:
        return INIT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{INIT_TIMEOUT_ENV} must be a positive number of seconds (e.g. 600), got {text!r}")
    return seconds


def slurm_tasks_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(number of tasks, this task)`` of a SLURM job step of several tasks; ``None`` otherwise.

    Checks what JAX's SLURM detection reads, so that a SLURM allocation
    entered without ``srun`` (``SLURM_NTASKS`` set, the step's variables not)
    or a malformed variable gets one line instead of a traceback from JAX.

    Raises:
        ConfigError: ``SLURM_NTASKS`` > 1 with a step variable missing, or a
            variable that is not an integer.

    >>> slurm_tasks_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    True
    """
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ or not environ.get("SLURM_NTASKS"):
        return None
    ntasks = _slurm_int(environ, "SLURM_NTASKS")
    if ntasks <= 1:
        return None
    missing = [n for n in SLURM_STEP_VARIABLES if not environ.get(n)]
    if missing:
        raise ConfigError(
            f"SLURM_NTASKS={ntasks} asks for {ntasks} processes, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set, as when a job script runs the command itself: start "
            f"each task with srun (srun jaxnet train ...), or unset SLURM_NTASKS to run a single process"
        )
    for name in ("SLURM_JOB_ID", "SLURM_LOCALID"):  # JAX reads them as integers too
        _slurm_int(environ, name)
    task = _slurm_int(environ, "SLURM_PROCID")
    if not 0 <= task < ntasks:
        raise ConfigError(f"SLURM_PROCID={task} must be in [0, SLURM_NTASKS={ntasks}); start the tasks with srun")
    return ntasks, task


def _slurm_int(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"{name} must be an integer, got {text!r}: start the tasks with srun (which sets it), "
            "or unset SLURM_NTASKS to run a single process"
        ) from None


def initialize_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
    init_timeout_seconds: float | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> DistributedConfig | None:
    """Joins the multi-process run described by the environment, if any (``init_process_group``).

    Call it first, before any JAX computation. With ``JAXNET_*`` set it calls
    ``jax.distributed.initialize`` with them; with none set but a SLURM job
    step of more than one task, it lets JAX read SLURM's variables; otherwise
    it does nothing (a single-process run). Calling it again is a no-op. On
    CPU the processes exchange data with gloo (JAX's default CPU collectives).

    While the other processes are awaited it logs ``waiting for the other 1
    of 2 processes at HOST:PORT (15 s of 300 s)`` (a warning of the
    ``jaxnet.parallel.multiprocess`` logger) every ``progress_seconds``, and Ctrl-C
    raises ``KeyboardInterrupt`` at once. JAX's rendezvous runs in a daemon
    thread because it cannot be cancelled: after a timeout or Ctrl-C it is
    abandoned (detached from JAX, so that the process exits at once; a
    single-process JAX still works) and this process cannot join a run any
    more: end it (``jaxnet train`` exits with status 2 or 130), as JAX's
    C++ client aborts it ``JAX_DEADLINE_MARGIN_SECONDS`` (60 s) after the
    timeout.

    Args:
        environ: the environment (default ``os.environ``; JAX's SLURM
            detection always reads ``os.environ``).
        heartbeat_timeout_seconds: after this long without news from a
            process, the others stop with an error instead of waiting forever.
        init_timeout_seconds: how long to wait for every process to join;
            default ``JAXNET_INIT_TIMEOUT``, else 300.
        progress_seconds: seconds between the ``waiting for ...`` lines.

    Returns:
        The configuration used (``None`` for a single-process run or SLURM).

    Raises:
        ConfigError: malformed ``JAXNET_*`` or ``JAXNET_INIT_TIMEOUT``, a
            partial or malformed SLURM environment, or not every process
            joined within the timeout (the message says what to check).
        KeyboardInterrupt: Ctrl-C while waiting.
    """
    environ = os.environ if environ is None else environ
    config = config_from_env(environ)
    slurm = None if config is not None else slurm_tasks_from_env(environ)
    if jax.distributed.is_initialized():
        return config
    timeout = init_timeout_from_env(environ) if init_timeout_seconds is None else float(init_timeout_seconds)
    if not timeout > 0:
        raise ConfigError(f"init_timeout_seconds must be > 0, got {init_timeout_seconds!r}")
    if config is not None and config.num_processes > 1:
        kwargs = dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
        who = _Rendezvous(
            config.process_id,
            config.num_processes,
            f"at {config.coordinator_address}",
            f"start all {config.num_processes} processes (on one machine, jaxnet launch --nproc "
            f"{config.num_processes} -- train ... does), check that {COORDINATOR_ENV}="
            f"{config.coordinator_address} is process 0's address and the same in every process",
        )
    elif slurm is not None:  # JAX reads the SLURM variables itself
        kwargs = {}
        who = _Rendezvous(
            slurm[1],
            slurm[0],
            f"at the coordinator of SLURM job {environ['SLURM_JOB_ID']} (the "
            f"first node of SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']})",
            f"check that srun started all {slurm[0]} tasks",
        )
    else:
        return config
    _join({**kwargs, "heartbeat_timeout_seconds": heartbeat_timeout_seconds}, who, timeout, progress_seconds)
    log.info("process %d of %d joined the others %s", who.process_id, who.num_processes, who.where)
    return config


@dataclasses.dataclass(frozen=True)
class _Rendezvous:
    """Who waits for whom, in words, for the progress and timeout lines."""

    process_id: int
    num_processes: int
    where: str  # "at host:port", or which SLURM job
    fix: str  # what to check first when the others never come

    def waiting(self, elapsed: float, timeout: float) -> str:
        return (
            f"waiting for the other {self.num_processes - 1} of {self.num_processes} processes {self.where} "
            f"({elapsed:.0f} s of {timeout:g} s)"
        )

    def timed_out(self, timeout: float) -> str:
        others = self.num_processes - 1
        return (
            f"process {self.process_id} of {self.num_processes} gave up after {timeout:g} s waiting {self.where} "
            f"for the other {others} process{'es' if others > 1 else ''} to join: {self.fix}, or allow more "
            f"time with {INIT_TIMEOUT_ENV}=SECONDS"
        )


def _join(kwargs: dict[str, Any], who: _Rendezvous, timeout: float, progress_seconds: float) -> None:
    """``jax.distributed.initialize(**kwargs)`` in a daemon thread, awaited with a deadline, interruptibly."""
    outcome: list[BaseException | None] = []

    def rendezvous() -> None:
        try:
            jax.distributed.initialize(
                initialization_timeout=math.ceil(timeout) + JAX_DEADLINE_MARGIN_SECONDS, **kwargs
            )
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the waiting thread
            outcome.append(exc)

    thread = threading.Thread(target=rendezvous, name="jaxnet-rendezvous", daemon=True)
    start, next_line = time.monotonic(), progress_seconds
    try:
        thread.start()
        while thread.is_alive():
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                _abandon_rendezvous()
                raise ConfigError(who.timed_out(timeout))
            if elapsed >= next_line:
                log.warning(who.waiting(elapsed, timeout))
                next_line += progress_seconds
            thread.join(min(WAIT_SLICE_SECONDS, timeout - elapsed))  # interruptible, unlike the C++ call
    except KeyboardInterrupt:
        if not outcome:  # still joining (or about to)
            _abandon_rendezvous()
        raise
    if outcome and outcome[0] is not None:
        raise outcome[0]


def _abandon_rendezvous() -> None:
    """Detaches JAX's half-connected client and service now and at exit, so that leaving is immediate.

    The rendezvous thread stays blocked in C++. Left attached, JAX's exit
    hook would shut the service down (5 s and a page of C++ errors), and
    destroying either object under the blocked call is unsafe, so both are
    kept alive for good (a deliberate leak of two objects). The exit hook,
    registered after JAX's and so run before it, also catches a client that
    the thread creates after this call. Afterwards
    ``jax.distributed.is_initialized()`` is false again.
    """
    _detach_jax_distributed()
    atexit.register(_detach_jax_distributed)


def _detach_jax_distributed() -> None:
    from jax._src import distributed as jax_distributed  # JAX keeps the objects in this module's state

    state = getattr(jax_distributed, "global_state", None)
    for name in ("preemption_sync_manager", "client", "service"):
        obj = getattr(state, name, None)
        if obj is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
            setattr(state, name, None)


def is_main_process() -> bool:
    """Whether this process writes logs and checkpoints (``dist.get_rank() == 0``)."""
    return jax.process_index() == 0
