"""Checkpoints of the whole training state, on Orbax, that resume a run exactly.

Counterpart of the tutorials' ``torch.save({"model": model.state_dict(),
"optimizer": optimizer.state_dict(), "epoch": epoch}, path)`` and
``load_state_dict``, with the guarantees a long run needs:

* the whole :class:`~jaxnet.state.TrainState` (parameters, optimizer state,
  model state, RNG key, step) is saved with a JSON record of everything else
  needed to resume (data position, run config, running metric sums);
* saves are asynchronous: :func:`save` returns once the arrays are copied to
  the host; their digests are computed and the files written in the
  background (a jaxnet thread hands the copy to Orbax, whose own thread
  writes it);
* the last ``max_to_keep`` checkpoints and the ``keep_best`` best ones by a
  chosen metric are kept (Orbax's ``LatestN`` and ``BestN`` policies);
* a save interrupted at any moment (``SIGKILL`` included) is invisible:
  Orbax writes into a ``<step>.orbax-checkpoint-tmp-*`` folder and renames it
  when complete, and only complete step folders are listed;
* a finished checkpoint whose bytes were later damaged is detected rather
  than restored as garbage. Each checkpoint records the SHA-256 of every file
  (``jaxnet_sha256.json``, written in Orbax's finalization step, before the
  rename that commits the checkpoint) and of every group of arrays
  (``state_sha256``, in the JSON record); restoring verifies both and raises
  :class:`CheckpointError` naming the step and the file.
  :func:`restore_latest_good` then falls back to the previous step;
* a save that cannot succeed (disk full, read-only, permissions, a file in
  the way) ends in one :class:`CheckpointError` line naming the step, the
  path and the cause, within a step of the failure (:func:`check_saves`);
  its partial folder is removed and the earlier checkpoints stay as they
  were. :func:`probe_writable` finds most of these before a run starts;
* a checkpoint records whether its state is finite; resuming, ``"latest"``
  and ``"best"`` pass over one holding NaN/inf;
* unfinished saves are deleted on opening only when no other live process
  holds the workdir's lock (:mod:`jaxnet.checkpoint.lock`): they may be its save in
  progress;
* Orbax's INFO log lines and failure tracebacks stay out of the terminal.

Layout of a checkpoint folder (``W/checkpoints`` for a run in ``--workdir W``,
see :mod:`jaxnet.checkpoint.workdir`)::

    <step>/state/arrays.npz     the TrainState arrays of a single-process run
                                (NumPy's format: ``np.load`` reads it)
    <step>/state/               ... or, for a state spread over several
                                processes, Orbax's own format (OCDBT)
    <step>/meta/                the JSON record (meta, metrics, digests)
    <step>/jaxnet_sha256.json   SHA-256 of every file
    corrupt/<step>/             damaged steps moved aside by restore_latest_good

Typed PRNG keys in the state (the ``nnx.RngKey`` of an ``nnx.Dropout(rate,
rngs=rngs)``, dtype ``key<fry>``) have no NumPy form: in either format they
are stored, recorded and hashed as their key data (``jax.random.key_data``,
uint32, one more axis), and restored as keys of the target's key type
(``jax.random.wrap_key_data(data, dtype=target.dtype)``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import math
import numbers
import os
import pathlib
import shutil
import zipfile
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxnet.checkpoint import integrity
from jaxnet.checkpoint import lock as lock_lib
from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.checkpoint.integrity import MANIFEST_FILE, params_sha256  # noqa: F401  (re-exported)
# The run-directory helpers that resuming needs live in jaxnet.checkpoint.workdir; they are
# re-exported here so that a resume reads as checkpoint.* calls.
from jaxnet.checkpoint.workdir import (  # noqa: F401
    CHECKPOINT_DIR,
    CONFIG_FILE,
    check_workdir,
    checkpoint_directory,
    read_config,
    rewind_jsonl,
)

logger = logging.getLogger("jaxnet.checkpoint")

QUARANTINE_DIR = "corrupt"  # damaged steps are moved here, under the checkpoint folder
ARRAYS_FILE = "arrays.npz"  # a single-process state, in <step>/state/
DEFAULT_BEST_METRIC = "test_accuracy"  # what `jaxnet train` ranks checkpoints by
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's JSON of each step (item handlers, time stamps)
PROBE_FILE = ".jaxnet-write-probe"  # probe_writable's file, removed again


class CheckpointError(JaxnetError):
    """A checkpoint is missing, unreadable, damaged or cannot be written.

    The message names the step and, where one is to blame, the file.
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint does not fit the state it is restored into.

    Raised when the arrays differ in number, shape or dtype, e.g. a different
    model or optimizer; never a reason to fall back to an older step.
    """


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """An Orbax ``CheckpointManager`` and the few facts jaxnet keeps beside it.

    Made by :func:`create_checkpoint_manager`; pass it to :func:`save`,
    :func:`restore`, :func:`latest`, :func:`best`, :func:`wait` and
    :func:`close`.

    Attributes:
        manager: the underlying ``orbax.checkpoint.CheckpointManager``.
        directory: the folder holding one sub-folder per step.
        best_metric: the metric that ranks checkpoints, or ``None``.
        best_mode: ``"max"`` or ``"min"``: which end of ``best_metric`` is best.
        async_save: whether :func:`save` returns before the files are written.
        array_format: ``"npz"`` or ``"orbax"``: how a state that this process
            holds whole is written (a state spread over processes always
            goes to Orbax's format).
        in_flight: the step being written in the background, if any (Orbax
            runs one save at a time); read by the manifest writer.
        worker: the thread that digests a host copy and hands it to Orbax.
        submitting: the worker's pending job (at most one), if any.
        reported: Orbax's exceptions of failed saves that were already raised
            as a CheckpointError (Orbax raises each once in every thread that
            waits; the later ones are ignored).
    """

    manager: ocp.CheckpointManager
    directory: pathlib.Path
    best_metric: str | None
    best_mode: str
    async_save: bool
    array_format: str
    in_flight: list[int] = dataclasses.field(default_factory=list)
    worker: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxnet-checkpoint"))
    submitting: list[concurrent.futures.Future] = dataclasses.field(default_factory=list)
    reported: list[BaseException] = dataclasses.field(default_factory=list)


class _StateHandler(ocp.AsyncCheckpointHandler):
    """Orbax item handler of ``state``: one uncompressed ``.npz`` for a state one process holds whole.

    A state spread over several processes goes to Orbax's
    ``StandardCheckpointHandler`` (TensorStore, OCDBT), which this handler
    wraps; the arguments of each call choose (:class:`_NpzSave` or
    ``StandardSave``, :class:`_NpzRestore` or ``StandardRestore``).

    Why not Orbax's format for everything: it is built for states sharded
    over many hosts and pays a fixed cost per array for it. For the MLP's 21
    arrays (6.4 MB) a whole save (digests and file manifest included) took
    53 ms of CPU in Orbax's format and 29 ms as ``.npz``, in the same run
    (``benchmarks/CHECKPOINTS.md``): CPU that the training loop competes
    for. The CheckpointManager around it is unchanged, so the atomic commit
    (temporary folder, rename), retention and asynchronous writing are
    Orbax's. Each array is stored under its path in the state, e.g.
    ``params/fc1/kernel/value``, so ``np.load(".../state/arrays.npz")`` reads
    a checkpoint without jaxnet.
    """

    def __init__(self) -> None:
        self._standard = ocp.StandardCheckpointHandler()

    async def _write(self, path: Any, arrays: Mapping[str, np.ndarray]) -> None:
        # What np.savez does, without its keyword-argument names (a leaf
        # called "file" would clash) and without pickles.
        with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                with archive.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    async def async_save(self, directory: Any, args: Any) -> list[Any] | None:
        if not isinstance(args, _NpzSave):
            return await self._standard.async_save(directory, args=args)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(directory / ARRAYS_FILE, args.arrays), name="jaxnet_npz_save")]

    def save(self, directory: Any, args: Any) -> None:
        if not isinstance(args, _NpzSave):
            return self._standard.save(directory, args=args)
        asyncio.run(self._write(directory / ARRAYS_FILE, args.arrays))
        return None

    def restore(self, directory: Any, args: Any = None) -> Any:
        if not isinstance(args, _NpzRestore):
            return self._standard.restore(directory, args=args)
        with np.load(os.fspath(directory / ARRAYS_FILE), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    def finalize(self, directory: Any) -> None:
        if not (directory / ARRAYS_FILE).exists():
            self._standard.finalize(directory)  # Orbax's format (merges the OCDBT files)

    def metadata(self, directory: Any) -> Any:
        return None if (directory / ARRAYS_FILE).exists() else self._standard.metadata(directory)

    def close(self) -> None:
        self._standard.close()


@ocp.args.register_with_handler(_StateHandler, for_save=True)
@dataclasses.dataclass
class _NpzSave(ocp.args.CheckpointArgs):
    arrays: dict[str, np.ndarray]


@ocp.args.register_with_handler(_StateHandler, for_restore=True)
@dataclasses.dataclass
class _NpzRestore(ocp.args.CheckpointArgs):
    pass


def _flat_arrays(state: Any) -> dict[str, np.ndarray] | None:
    """``{"params/fc1/kernel/value": array, ...}`` of a host state, or ``None`` if a path cannot be a key.

    ``None`` (Orbax's format is used instead) when a path element is empty or
    holds a ``/``, which would make the flat names ambiguous.
    """
    flat: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = [str(_key_name(key)) for key in path]
        if not parts or any(not part or "/" in part for part in parts):
            return None
        flat["/".join(parts)] = leaf
    return flat if len(flat) == len(jax.tree.leaves(state)) else None


def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The nested dicts of :func:`_flat_arrays`' names, for :func:`_fill`."""
    root: dict[str, Any] = {}
    for key, array in flat.items():
        *parents, last = key.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = array
    return root


_EXPECTED_ORBAX_WARNINGS = ("did not provide metrics", "read_only=True, setting save_interval_steps=0",
                            "Given directory is read only")
# Orbax's complaints about a step's _CHECKPOINT_METADATA (the raw file content included);
# restoring checks that file itself and names the damage (verify_files).
_STEP_METADATA_COMPLAINTS = ("Failed to json parse Metadata file", "Failed to read Metadata file",
                             "Metadata file does not exist")


class _OrbaxNoiseFilter(logging.Filter):
    """Drops Orbax's INFO/DEBUG records (~60 per save), the warnings about what jaxnet does on purpose,
    and the tracebacks of failures that jaxnet raises as one CheckpointError line.

    A failed save makes Orbax log ~150-240 lines of tracebacks from its
    threads; the failure itself reaches the caller of :func:`save`,
    :func:`wait` or :func:`close`. Those records (and any other Orbax
    record that carries a traceback) go to the ``jaxnet.checkpoint`` logger
    at DEBUG instead, for whoever debugs Orbax.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        # Saves without the ranking metric (mid-epoch ones) are intended, and
        # so is opening a folder read-only (jaxnet export, inspection).
        message = record.getMessage()
        if any(text in message for text in (*_EXPECTED_ORBAX_WARNINGS, *_STEP_METADATA_COMPLAINTS)):
            return False
        if record.exc_info:
            logger.debug("Orbax: %s", message, exc_info=record.exc_info)
            return False
        return True


_ORBAX_NOISE_FILTER = _OrbaxNoiseFilter()


def _quiet_orbax() -> None:
    # Orbax logs through absl, i.e. the "absl" logger; adding the same filter
    # twice is a no-op, and nothing else about logging is changed.
    logging.getLogger("absl").addFilter(_ORBAX_NOISE_FILTER)


def _metric_fn(name: str, mode: str):
    worst = -math.inf if mode == "max" else math.inf

    def metric(metrics: Any) -> float:
        # A missing or NaN metric ranks last instead of crashing the ranking.
        value = metrics.get(name) if isinstance(metrics, Mapping) else None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            return worst
        return float(value)

    return metric


def create_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    keep_best: int = 1,
    async_save: bool = True,
    array_format: str = "npz",
    read_only: bool = False,
    clean_unfinished: bool = True,
) -> Checkpointer:
    """Opens (creating if needed) a folder of checkpoints.

    Counterpart of choosing where ``torch.save`` writes, plus the retention
    rules of Lightning's ``ModelCheckpoint(save_top_k=..., monitor=...)``.
    Leftovers of saves that were interrupted (``<step>.orbax-checkpoint-tmp-*``)
    are deleted when the folder is opened for writing, unless another
    process holds the lock of the workdir above it (``W/.jaxnet.lock`` for
    ``W/checkpoints``, :class:`jaxnet.checkpoint.lock.WorkdirLock`): then they may be
    that live run's save in progress, and are kept (logged as a warning).

    Args:
        directory: the checkpoint folder, e.g. ``W/checkpoints``.
        max_to_keep: the newest checkpoints to keep (>= 1).
        best_metric: metric name in :func:`save`'s ``metrics`` that ranks
            checkpoints, e.g. ``"test_accuracy"``; ``None`` keeps only the newest.
        best_mode: ``"max"`` or ``"min"``: which values of ``best_metric`` are best.
        keep_best: how many of the best checkpoints to keep besides the newest.
            Checkpoints saved without the metric are kept only while among
            the newest ``max_to_keep``.
        async_save: finish writing in a background thread.
        array_format: ``"npz"`` (default) writes a state that this process
            holds whole as one ``arrays.npz`` that ``np.load`` reads, with
            less CPU per save; ``"orbax"`` uses Orbax's own format (what
            ``ocp.StandardCheckpointer`` reads) for every state. Restoring
            reads either, whatever this setting.
        read_only: open an existing folder without ever writing or deleting.
        clean_unfinished: ``False`` never deletes unfinished saves (e.g. when
            the caller does not hold the workdir's lock and another process
            may write there without taking it).

    Returns:
        A :class:`Checkpointer`; :func:`close` it when done.

    Raises:
        ConfigError: bad retention settings.
        CheckpointError: the folder is a file, cannot be created, or does not
            exist in ``read_only`` mode.

    Example:
        >>> ckpt = create_checkpoint_manager("/tmp/run/checkpoints", best_metric="test_accuracy")
        >>> latest(ckpt) is None
        True
        >>> close(ckpt)
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ConfigError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ConfigError(f"keep_best must be an integer >= 0, got {keep_best!r}")
    if best_mode not in ("max", "min"):
        raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if array_format not in ("npz", "orbax"):
        raise ConfigError(f"array_format must be 'npz' or 'orbax', got {array_format!r}")
    path = pathlib.Path(directory).absolute()
    if read_only and not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"the checkpoint folder {path} is a file, not a folder; move it or choose "
                              "another --workdir")
    _quiet_orbax()
    policies: list[Any] = [ocp_policies.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
        best_fn = _metric_fn(best_metric, best_mode)
        policies.append(ocp_policies.BestN(
            get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
            keep_checkpoints_without_metrics=False,
        ))
    if not read_only and clean_unfinished and jax.process_index() == 0:
        _remove_unfinished_saves(path)
    in_flight: list[int] = []
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        # Always Orbax's async checkpointer: its finalization hook writes the
        # manifest; async_save=False simply waits for each save to finish.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=lambda: _write_manifest(path, in_flight),
            # Orbax's default creates the step folder in a thread of its own
            # that the item writers wait for by a signal: when creating it
            # fails (a read-only disk, a file in the way), the writers wait
            # out the signal's timeout, multihost.coordination_timeout()
            # (300 s), and the process cannot exit before they give up. Made
            # synchronously, in jaxnet's worker thread, the failure is an
            # exception of manager.save() and no writer is started.
            create_directories_asynchronously=False,
        ),
        create=not read_only,
        read_only=read_only,
    )
    with _orbax_errors(f"opening the checkpoint folder {path}"):
        manager = _open_manager(path, options, read_only)
    return Checkpointer(manager, path, best_metric, best_mode, async_save, array_format, in_flight)


def _open_manager(path: pathlib.Path, options: Any, read_only: bool) -> ocp.CheckpointManager:
    """Orbax's manager of ``path``; steps whose ``_CHECKPOINT_METADATA`` stops Orbax from opening it are moved aside.

    Orbax skips a step metadata file that is not JSON, but one holding other
    JSON than an object (or fields of the wrong type) makes it raise for the
    whole folder. Opened for writing, the damaged steps go to ``corrupt/``
    as :func:`restore_latest_good` would move them; read-only, the error
    names them.
    """
    try:
        return ocp.CheckpointManager(path, options=options, handler_registry=_handler_registry())
    except ValueError:
        damaged = {int(p.name): problem for p in (path.iterdir() if path.is_dir() else ())
                   if p.name.isdigit() and p.is_dir() and (problem := _step_metadata_problem(p))}
        if not damaged:
            raise
        if read_only:
            step, problem = min(damaged.items())
            raise CheckpointError(f"checkpoint step {step} is damaged: {problem}, and Orbax cannot open "
                                  f"{path} with it; move {path / str(step)} aside") from None
        where = _move_aside(path, sorted(damaged))
        logger.warning("checkpoint step(s) %s are damaged (%s) and were moved to %s",
                       ", ".join(map(str, sorted(damaged))), "; ".join(damaged.values()), where)
    return ocp.CheckpointManager(path, options=options, handler_registry=_handler_registry())


def _handler_registry() -> Any:
    """The items of a checkpoint and the handlers that read and write them.

    One handler per item (Orbax finalizes each item with the first handler
    registered for it): :class:`_StateHandler` for ``state``, whatever its
    format, and Orbax's JSON handler for ``meta``.
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler, json_handler = _StateHandler(), ocp.JsonCheckpointHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore, _NpzSave, _NpzRestore):
        registry.add("state", args, state_handler)
    registry.add("meta", ocp.args.JsonSave, json_handler)
    registry.add("meta", ocp.args.JsonRestore, json_handler)
    return registry


def _remove_unfinished_saves(directory: pathlib.Path) -> None:
    """Deletes the temporary folders of saves that a killed process left behind.

    Done here, synchronously, rather than with Orbax's background clean-up,
    which a process that exits soon after opening the folder would cut short.
    Nothing is deleted while another live process holds the workdir's lock:
    its save in progress looks just like a killed one's.
    """
    if not directory.is_dir():
        return
    leftovers = sorted(directory.glob("*.orbax-checkpoint-tmp*"))
    if not leftovers:
        return
    holder = lock_lib.held_by_another_process(directory.parent)
    if holder is not None:
        logger.warning(
            "keeping %s: the workdir %s is in use by PID %s on host %s, and this may be its save in "
            "progress", ", ".join(str(p) for p in leftovers), directory.parent, holder.get("pid", "?"),
            holder.get("host", "?"))
        return
    for leftover in leftovers:
        logger.info("removing %s, an unfinished save of a process that was killed", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _orbax_errors(action: str) -> Iterator[None]:
    """Turns Orbax's and the OS's exceptions into one-line CheckpointErrors."""
    try:
        yield
    except JaxnetError:
        raise
    except Exception as exc:  # Orbax/TensorStore raise bare Exception and ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{action} failed: {type(exc).__name__}: {first}") from exc


def _step_dir(ckpt: Checkpointer, step: int) -> pathlib.Path:
    return ckpt.directory / str(step)


def steps(ckpt: Checkpointer) -> list[int]:
    """Every finished checkpoint's step, ascending."""
    _join(ckpt)
    return sorted(ckpt.manager.all_steps())


def latest(ckpt: Checkpointer) -> int | None:
    """The newest finished checkpoint's step, or ``None``; interrupted saves never count."""
    _join(ckpt)
    return ckpt.manager.latest_step()


def best(ckpt: Checkpointer) -> int | None:
    """The step of the best checkpoint by ``best_metric``, or ``None``.

    ``None`` when no metric was chosen or no kept checkpoint was saved with it.
    """
    if ckpt.best_metric is None:
        return None
    _join(ckpt)
    # Orbax ranks only checkpoints saved with metrics, and save() passes the
    # metric only when it is a finite number.
    return ckpt.manager.best_step()


def _write_manifest(directory: pathlib.Path, in_flight: list[int]) -> None:
    """Orbax's post-finalization hook: the file manifest of the step being committed.

    Runs in Orbax's background thread after all items are written and before
    the temporary folder is renamed, so the manifest is committed atomically
    with the checkpoint. A failure here only costs the manifest (the array
    digests in the record still guard the checkpoint), never the save; a
    manifest cut short (disk full) is removed, so the step is not taken for
    a damaged one.
    """
    if not in_flight:
        return
    step, folder = in_flight[0], None
    try:
        (folder,) = [p for p in directory.glob(f"{step}.orbax-checkpoint-tmp*") if p.is_dir()]
        integrity.write_manifest(folder, step)
    except Exception as exc:  # never fail the save itself
        if folder is not None:
            with contextlib.suppress(OSError):
                (folder / MANIFEST_FILE).unlink(missing_ok=True)
        logger.warning("checkpoint step %d: could not write its file manifest: %s", step, exc)


def _join(ckpt: Checkpointer) -> None:
    """Waits until the worker has handed the pending save to Orbax (not until it is committed).

    Raises:
        CheckpointError: handing it over failed; the save did not happen.
    """
    while ckpt.submitting:
        ckpt.submitting.pop().result()


def _call_orbax(ckpt: Checkpointer, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, once more if it raised a save failure that was already reported.

    Orbax raises a failed save's exception once in every thread that waits
    for it (``manager.save`` waits for the previous save first, in
    jaxnet's worker thread); the second call goes on.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not any(exc is seen for seen in ckpt.reported):
            raise
    return fn(*args, **kwargs)


def wait(ckpt: Checkpointer) -> None:
    """Blocks until the pending save, if any, is committed.

    A failed save is cleaned up before this raises: its partial temporary
    folder is deleted and the earlier checkpoints are left as they were.

    Raises:
        CheckpointError: a background save failed (disk full, read-only,
            permissions, a file in the way); one line naming the step, the
            path and the cause.
    """
    handover_error = None
    try:
        _join(ckpt)
    except CheckpointError as exc:  # reported after Orbax's own pending save is finished
        handover_error = exc
    try:
        _call_orbax(ckpt, ckpt.manager.wait_until_finished)
    except Exception as exc:
        ckpt.reported.append(exc)
        error = _save_failed(ckpt, ckpt.in_flight[0] if ckpt.in_flight else None, exc)
        raise (handover_error or error) from None
    ckpt.in_flight.clear()
    if handover_error is not None:
        raise handover_error


def check_saves(ckpt: Checkpointer) -> None:
    """Raises now if a save handed over earlier has failed; never blocks.

    :func:`save` returns before its files are written, and a failure would
    otherwise surface only at the next :func:`save`, :func:`wait` or
    :func:`close`, perhaps an epoch later. A training loop calls this every
    step (it costs a few attribute reads) to stop within a step of a failure.

    Raises:
        CheckpointError: as :func:`wait`.
    """
    if ckpt.submitting and not ckpt.submitting[-1].done():
        return  # the worker is still handing it over
    _join(ckpt)
    if ckpt.in_flight and not ckpt.manager.is_saving_in_progress():
        wait(ckpt)  # finished: returns at once, or raises its failure


def close(ckpt: Checkpointer) -> None:
    """Finishes pending saves (:func:`wait`) and releases the manager.

    Raises:
        CheckpointError: as :func:`wait`; the manager is released anyway.
    """
    try:
        wait(ckpt)
    finally:
        ckpt.worker.shutdown(wait=True)
        with _orbax_errors(f"closing the checkpoint folder {ckpt.directory}"):
            _call_orbax(ckpt, ckpt.manager.close)


# What to do about a failed write, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free some space or choose another --workdir",
    errno.EDQUOT: "free some space (the disk quota is used up) or choose another --workdir",
    errno.EROFS: "the file system is mounted read-only; choose another --workdir",
    errno.EACCES: "make it writable or choose another --workdir",
    errno.EPERM: "make it writable or choose another --workdir",
    errno.ENOTDIR: "a file stands where a folder should be; move it or choose another --workdir",
}


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in ``exc``'s chain of causes (Orbax wraps the OS's errors)."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current
        todo += [current.__cause__, current.__context__]
    return None


def _cause(exc: BaseException, where: pathlib.Path | None) -> tuple[str, str]:
    """``("No space left on device [ENOSPC] at PATH", what to do)`` for an exception of a write."""
    os_error = _os_error_in(exc)
    if os_error is None:
        text = str(exc).strip()
        return (f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": "),
                "choose another --workdir")
    name = errno.errorcode.get(os_error.errno, str(os_error.errno))
    path = os_error.filename or where
    text = f"{os_error.strerror or os_error} [{name}]" + (f" at {path}" if path else "")
    return text, _WRITE_FIXES.get(os_error.errno, "choose another --workdir")


def _save_failed(ckpt: Checkpointer, step: int | None, exc: BaseException) -> CheckpointError:
    """Cleans up after a failed save and describes it in one line.

    The step's partial temporary folder is deleted (a full disk stays full
    otherwise) and Orbax's list of steps is read again from disk: Orbax drops
    the steps that the new one would retire from its list when the save
    starts, and deletes them only once it is committed, so they are all
    still there.
    """
    logger.debug("checkpoint step %s failed", step, exc_info=exc)  # the whole traceback, for debugging
    partial = []
    with contextlib.suppress(OSError):
        partial = sorted(ckpt.directory.glob(f"{step if step is not None else '*'}.orbax-checkpoint-tmp*"))
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    ckpt.in_flight.clear()
    with contextlib.suppress(Exception):
        ckpt.manager.reload()
    cause, fix = _cause(exc, partial[0] if partial else ckpt.directory)
    found: list[int] = []
    with contextlib.suppress(Exception):
        found = sorted(ckpt.manager.all_steps())
    if step is not None and step in found:  # committed; what failed came after (retiring old steps)
        return CheckpointError(f"checkpoint step {step} was saved to {ckpt.directory}, but finishing the save "
                               f"failed: {cause}; {fix}")
    kept = f"the newest checkpoint is still step {found[-1]}" if found else "there is no earlier checkpoint"
    what = f"saving checkpoint step {step}" if step is not None else "saving a checkpoint"
    removed = "the partial save was removed, " if partial else ""
    return CheckpointError(f"{what} to {ckpt.directory} failed: {cause}; {removed}{kept}; {fix}")


def probe_writable(directory: str | os.PathLike) -> pathlib.Path:
    """Checks, by doing it, that checkpoints can be written to ``directory``; before a run's first step.

    Creates the folder (and its parents) if needed, then creates, writes,
    fsyncs, renames and removes a small file in it: what a save does. A run
    whose saves cannot succeed then stops before training, not at its first
    save.

    Args:
        directory: the checkpoint folder, e.g. ``W/checkpoints``.

    Returns:
        The folder's absolute path.

    Raises:
        CheckpointError: one line naming the path and the cause (the errno's
            name and text: read-only file system, permission denied, not a
            directory, no space left on device) and what to do.

    Example:
        >>> import tempfile
        >>> probe_writable(tempfile.mkdtemp()).is_dir()
        True
    """
    path = pathlib.Path(directory).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot write checkpoints to {path}: it is a file, not a folder [ENOTDIR]; "
                              f"{_WRITE_FIXES[errno.ENOTDIR]}")
    probe = path / f"{PROBE_FILE}-{os.getpid()}"
    moved = probe.with_name(probe.name + ".renamed")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"jaxnet checks that checkpoints can be written here\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(probe, moved)
        os.remove(moved)
    except OSError as exc:
        for leftover in (probe, moved):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        cause, fix = _cause(exc, path)
        raise CheckpointError(f"cannot write checkpoints to {path}: {cause}; {fix}") from None
    return path


def save(
    ckpt: Checkpointer,
    step: int,
    state: Any,
    *,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Saves ``state`` as checkpoint ``step``, asynchronously.

    Counterpart of ``torch.save({"model": ..., "optimizer": ..., ...}, path)``.
    Returns once the arrays are copied off the device (the caller may then
    donate or delete ``state``, and change ``meta``); the digests are computed
    and the files written in the background, and the checkpoint appears in
    :func:`latest` only when complete. Older checkpoints are deleted according
    to the retention rules once this one is complete, never before. A failure
    in the background (disk full...) is raised by the next :func:`save`,
    :func:`wait`, :func:`close` or :func:`check_saves`, after its partial
    folder is removed.

    The record notes whether the state is finite (``"finite"``: no NaN/inf
    in any float array; the optimizer state may hold inf, as optax's
    ``reduce_on_plateau`` does, but no NaN), checked on the host copy in the
    background. A non-finite state is saved, with a warning, but never
    ranked by ``best_metric``, and :func:`restore_latest_good` and
    :func:`resolve_step`'s ``"latest"``/``"best"`` pass over it.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        step: the checkpoint's number, normally ``int(state.step)``; at most
            one save per step.
        state: a pytree of arrays, normally a :class:`~jaxnet.state.TrainState`;
            typed PRNG keys are stored as their key data.
        meta: JSON-serializable dict with everything else needed to resume,
            e.g. ``{"epoch": 1, "batch_in_epoch": 7, "seed": 0, "config":
            {...}, "train_sums": {"loss": 12.5}}`` (floats round-trip exactly).
        metrics: numbers describing this checkpoint, e.g. ``{"test_accuracy":
            0.97}`` at an epoch end; the ``best_metric`` among them ranks it.

    Raises:
        ConfigError: ``meta``/``metrics`` are not JSON, or a negative step.
        CheckpointError: ``step`` is already saved, or writing failed.
    """
    if isinstance(step, bool) or int(step) != step or int(step) < 0:
        raise ConfigError(f"checkpoint step must be an integer >= 0, got {step!r}")
    step = int(step)
    header = integrity.record_header(meta, metrics)
    tracked = None
    if ckpt.best_metric is not None and metrics is not None:
        if math.isfinite(_metric_fn(ckpt.best_metric, ckpt.best_mode)(metrics)):
            tracked = {ckpt.best_metric: float(metrics[ckpt.best_metric])}
    wait(ckpt)  # Orbax waits for the previous save anyway
    if step in ckpt.manager.all_steps():
        raise CheckpointError(
            f"checkpoint step {step} already exists in {ckpt.directory}; save each step once "
            "(an epoch-end save replaces the periodic save of the same step)"
        )
    host = _host_copy(integrity.key_data_tree(state))  # typed PRNG keys: their uint32 data
    if not all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host)) or not ckpt.async_save:
        # Device arrays (another process's shards) must reach Orbax before
        # this returns: the caller may donate them next.
        _hand_over(ckpt, step, host, header, tracked)
    else:
        # Digesting and Orbax's synchronous part (~10 ms for the MLP) happen off the training loop.
        ckpt.submitting.append(ckpt.worker.submit(_hand_over, ckpt, step, host, header, tracked))
    if not ckpt.async_save:
        wait(ckpt)


def _hand_over(ckpt: Checkpointer, step: int, state: Any, header: dict[str, Any],
               tracked: dict[str, float] | None) -> None:
    """Digests ``state`` and starts Orbax's (asynchronous) save of it and its record.

    A state held whole by this one process is written as ``arrays.npz``
    (:class:`_StateHandler`), any other with Orbax's ``StandardSave``. A host
    state is checked for NaN/inf here (~1 ms per 6 MB); the finiteness of a
    state spread over processes is not recorded (it is checked on restore).

    Raises:
        CheckpointError: Orbax refused the save (the step folder cannot be
            created...), after cleaning up (:func:`_save_failed`).
    """
    host_arrays = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(state))
    if host_arrays:
        bad = _nonfinite_leaf(state)
        header = {**header, "finite": bad is None, **({"nonfinite": bad} if bad else {})}
        if bad is not None:
            tracked = None  # never the best
            logger.warning("checkpoint step %d holds non-finite values (NaN/inf) in %s: it is saved, but "
                           "never resumed from or chosen as latest or best", step, bad)
    record = integrity.finish_record(header, state)
    flat = None
    if ckpt.array_format == "npz" and jax.process_count() == 1 and host_arrays:
        flat = _flat_arrays(state)
    item = ocp.args.StandardSave(state) if flat is None else _NpzSave(flat)
    args = ocp.args.Composite(state=item, meta=ocp.args.JsonSave(record))
    ckpt.in_flight[:] = [step]
    try:
        _call_orbax(ckpt, ckpt.manager.save, step, args=args, metrics=tracked, force=True)
    except Exception as exc:
        raise _save_failed(ckpt, step, exc) from None


def _nonfinite_leaf(state: Any) -> str | None:
    """The name of ``state``'s first float array holding NaN/inf (``"params/fc1/kernel/value"``), or ``None``.

    Under ``opt_state`` only NaN counts: optax's own states may start at
    inf (``reduce_on_plateau``'s best value, the line searches of L-BFGS).
    Host arrays are checked in NumPy; arrays spread over processes with
    one jitted reduction each (every process must call this then).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(integrity.key_data_tree(state))[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        name = "/".join(str(_key_name(key)) for key in path)
        nan_only = name.split("/")[0] == "opt_state"
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            ok = bool(~jnp.any(jnp.isnan(leaf)) if nan_only else jnp.all(jnp.isfinite(leaf)))
        else:
            array = np.asarray(leaf)
            ok = not np.isnan(array).any() if nan_only else bool(np.isfinite(array).all())
        if not ok:
            return name or "the state"
    return None


def _host_copy(state: Any) -> Any:
    """``state`` with every array copied into host memory, when this process holds all of it.

    The copy (never a view of a device buffer, which the next donated train
    step may overwrite) lets the caller donate ``state`` at once, and is what
    :func:`save` hands to its worker thread and writes as ``arrays.npz``.
    In Orbax's format too, NumPy leaves cost less CPU than device arrays (its
    device-array path tracks shards and transfers in extra threads: 43 vs 55
    ms per save of the MLP's 6.4 MB state, ``benchmarks/CHECKPOINTS.md``).
    :func:`restore` places the arrays on the target's devices. Arrays spread
    over several processes stay as they are: Orbax writes each process's
    shards. Typed PRNG keys have no NumPy form: :func:`save` passes
    :func:`jaxnet.checkpoint.integrity.key_data_tree` of the state, their uint32 data.
    """
    leaves = jax.tree.leaves(state)
    if not all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves):
        return state
    if any(isinstance(x, jax.Array) and (not x.is_fully_addressable or integrity.is_prng_key(x))
           for x in leaves):
        return state  # another process's shards, or typed PRNG keys not converted by the caller
    return jax.tree.map(lambda x: np.array(x, copy=True), state)


def resolve_step(ckpt: Checkpointer, step: int | str | None) -> int:
    """The step number that ``step`` (``None``/``"latest"``, ``"best"`` or a number) names.

    ``"latest"`` and ``"best"`` name the newest (best ranked) checkpoint
    whose state is finite, passing over one that holds NaN/inf with a
    warning. The ``finite`` flag recorded at save makes that a read of the
    JSON record; a checkpoint saved without the flag (before it existed, or
    by a multi-process run) has its arrays read and checked. A step given
    by number is returned as it is.

    Raises:
        CheckpointError: no checkpoint at all, none ranked (for ``"best"``),
            none finite, or no such step (the available ones are listed).
    """
    available = steps(ckpt)
    if step is None or step == "latest":
        if not available:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        return _first_finite(ckpt, available[::-1], "latest")
    if step == "best":
        found = best(ckpt)
        if found is None:
            metric = ckpt.best_metric or "(no best_metric chosen)"
            raise CheckpointError(
                f"no checkpoint in {ckpt.directory} is ranked by {metric}; "
                f"use 'latest' or one of the steps {available}"
            )
        if _nonfinite_problem(ckpt, found) is None:
            return found
        return _first_finite(ckpt, _ranked(ckpt, available), "best")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in available:
        raise CheckpointError(
            f"no checkpoint step {step!r} in {ckpt.directory}; available: {available or 'none'}"
        )
    return int(step)


def _ranked(ckpt: Checkpointer, available: list[int]) -> list[int]:
    """The steps ranked by ``best_metric``, best first (ties: the newest first), as Orbax ranks them."""
    score = _metric_fn(ckpt.best_metric, ckpt.best_mode)
    sign = 1 if ckpt.best_mode == "max" else -1
    ranked = []
    for step in available:
        value = score(ckpt.manager.metrics(step) or {})
        if math.isfinite(value):
            ranked.append((sign * value, step))
    return [step for _, step in sorted(ranked, reverse=True)]


def _first_finite(ckpt: Checkpointer, candidates: list[int], what: str) -> int:
    problems = []
    for step in candidates:
        problem = _nonfinite_problem(ckpt, step)
        if problem is None:
            if problems:
                logger.warning("%s; the %s finite checkpoint is step %d", "; ".join(problems), what, step)
            return step
        problems.append(problem)
    raise CheckpointError(f"no checkpoint in {ckpt.directory} holds finite values: {'; '.join(problems)}")


def _nonfinite_reason(step: int, leaf: str | None) -> str:
    return f"checkpoint step {step} holds non-finite values (NaN/inf) in {leaf or 'its state'}"


def _nonfinite_problem(ckpt: Checkpointer, step: int) -> str | None:
    """Why ``step`` is not finite, or ``None`` when it is (or cannot be read: restoring names the damage)."""
    try:
        record = _read_record(ckpt, step)
        if record.get("finite") is True:
            return None
        if record.get("finite") is False:
            return _nonfinite_reason(step, record.get("nonfinite"))
        leaf = _nonfinite_leaf(_read_arrays(ckpt, step, record))  # saved without the flag
    except CheckpointError:
        return None
    return None if leaf is None else _nonfinite_reason(step, leaf)


def _read_arrays(ckpt: Checkpointer, step: int, record: dict[str, Any]) -> dict[str, Any]:
    """A step's arrays without a target: ``{"params/fc1/kernel/value": array, ...}`` or Orbax's nested dicts."""
    where = _step_dir(ckpt, step) / "state"
    if not (where / ARRAYS_FILE).is_file():
        return _read_orbax_untargeted(ckpt, step, where)
    flat = _read_npz(ckpt, step, where / ARRAYS_FILE)
    # .npy stores ml_dtypes (bfloat16, float8) as raw bytes; the record has each
    # part's dtypes in the order of its arrays, which is their order in the file.
    for part, shapes in record.get("state_shapes", {}).items():
        keys = [key for key in flat if key.split("/")[0] == part]
        if len(keys) == len(shapes):
            for key, (_, dtype) in zip(keys, shapes):
                if flat[key].dtype.kind == "V":
                    flat[key] = flat[key].view(jnp.dtype(dtype))
    return flat


def _read_orbax_untargeted(ckpt: Checkpointer, step: int, where: pathlib.Path) -> Any:
    """A step in Orbax's format, read onto this process's first device (shapes from its metadata).

    Orbax restores without a target only onto the topology that saved it; a
    multi-process run's checkpoint is read whole by each process instead.
    """
    with _orbax_errors(f"restoring checkpoint step {step} from {where}"):
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = ckpt.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        return ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def verify_files(ckpt: Checkpointer, step: int) -> None:
    """Checks every file of a finished step against the size and SHA-256 recorded at save.

    A step without a manifest (its writing failed) is checked by the array
    digests alone, in :func:`restore`. Orbax's ``_CHECKPOINT_METADATA``,
    which it rewrites at commit and so is not in the manifest, must be a
    JSON object.

    Raises:
        CheckpointError: naming the step and the first missing, truncated or
            altered file.
    """
    folder = _step_dir(ckpt, step)
    problem = integrity.manifest_problem(folder) or _step_metadata_problem(folder)
    if problem:
        raise CheckpointError(f"checkpoint step {step} is damaged: {problem}")


def _step_metadata_problem(folder: pathlib.Path) -> str | None:
    path = folder / STEP_METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None  # older Orbax versions wrote none
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    try:
        metadata = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{path} is not valid JSON ({str(exc).splitlines()[0]})"
    return None if isinstance(metadata, dict) else f"{path} holds no JSON object"


def _read_record(ckpt: Checkpointer, step: int) -> dict[str, Any]:
    where = _step_dir(ckpt, step) / "meta"
    with _orbax_errors(f"reading checkpoint step {step} ({where})"):
        record = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    problem = integrity.record_problem(record)
    if problem:
        raise CheckpointError(f"checkpoint step {step} is damaged: {where} {problem}")
    return record


def _check_shapes(record: dict[str, Any], target: Any, step: int, names: Collection[str]) -> None:
    problem = integrity.shapes_problem(record, target, names)
    if problem:
        raise CheckpointMismatchError(
            f"checkpoint step {step} does not fit: {problem}; restore with the model and "
            "optimizer of the saved run"
        )


def _check_digests(record: dict[str, Any], restored: Any, step: int, names: Collection[str], where: pathlib.Path) -> None:
    name = integrity.digest_problem(record, restored, names)
    if name:
        raise CheckpointError(
            f"checkpoint step {step} is damaged: the {name} arrays read from {where} differ "
            "from the ones saved (SHA-256 mismatch)"
        )


def restore(
    ckpt: Checkpointer, abstract_state: Any, *, step: int | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure of ``abstract_state``.

    Counterpart of ``model.load_state_dict(ckpt["model"])`` plus
    ``optimizer.load_state_dict(ckpt["optimizer"])``. The restore always has a
    target, so optax's NamedTuple states come back as NamedTuples and arrays
    land on the target's devices. The files and the arrays are verified
    against the SHA-256 digests recorded at save time.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        abstract_state: a state of the right structure: a live one (e.g. a
            fresh ``create_train_state``), ``jax.eval_shape`` of one, or
            ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``.
        step: ``None`` or ``"latest"``, ``"best"``, or a step number.

    Returns:
        ``(state, meta)``: the restored state and the ``meta`` dict given to
        :func:`save`.

    Raises:
        CheckpointMismatchError: the checkpoint holds other shapes or dtypes.
        CheckpointError: no such checkpoint, or it is damaged (the message
            names the step and the file).
    """
    state, record = _restore(ckpt, abstract_state, resolve_step(ckpt, step))
    return state, record["meta"]


def _restore(ckpt: Checkpointer, abstract_state: Any, step: int, *,
             finite_only: bool = False) -> tuple[Any, dict[str, Any]]:
    """:func:`restore` of a step number; returns the whole record.

    ``finite_only`` raises CheckpointError for a state holding NaN/inf, from
    its record's flag before any array is read, or by checking the restored
    arrays when the record has no flag.
    """
    wait(ckpt)
    verify_files(ckpt, step)
    record = _read_record(ckpt, step)
    if finite_only and record.get("finite") is False:
        raise CheckpointError(_nonfinite_reason(step, record.get("nonfinite")))
    names = list(integrity.state_parts(abstract_state))
    _check_shapes(record, abstract_state, step, names)
    stored = integrity.key_data_tree(abstract_state)  # what was written: typed keys as their key data
    target = jax.tree.map(_restore_target, stored)
    where = _step_dir(ckpt, step) / "state"
    if (where / ARRAYS_FILE).is_file():
        where = where / ARRAYS_FILE
        flat = _read_npz(ckpt, step, where)
        host = _fill(stored, _nest(flat), step, "state")
        _check_digests(record, host, step, names, where)
        state = jax.tree.map(_place, host, target)
    else:  # Orbax's format: a multi-process run's, or any checkpoint from before jaxnet wrote .npz
        with _orbax_errors(f"restoring checkpoint step {step} from {where}"):
            state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        _check_digests(record, state, step, names, where)
    if finite_only and "finite" not in record:
        leaf = _nonfinite_leaf(state)
        if leaf is not None:
            raise CheckpointError(_nonfinite_reason(step, leaf))
    return _wrap_keys(state, abstract_state), record


def _read_npz(ckpt: Checkpointer, step: int, where: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of a step's ``arrays.npz``; damage (bad CRC, truncation) is a CheckpointError naming the file."""
    try:
        return ckpt.manager.restore(step, args=ocp.args.Composite(state=_NpzRestore())).state
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint step {step} is damaged: {where} cannot be read ({first})") from exc


def _wrap_keys(restored: Any, abstract: Any) -> Any:
    """``restored`` with the key data of each leaf that is a typed PRNG key in ``abstract`` wrapped back into a key.

    The key keeps the data's placement; its key type is the target's
    (``dtype=`` works for a live key and for a ``ShapeDtypeStruct`` alike).
    """
    def wrap(data: Any, ref: Any) -> Any:
        return jax.random.wrap_key_data(data, dtype=ref.dtype) if integrity.is_prng_key(ref) else data

    return jax.tree.map(wrap, restored, abstract)


def _place(array: np.ndarray, target: Any) -> Any:
    """A host array placed like ``target`` (a ``ShapeDtypeStruct`` with a sharding), on any number of processes."""
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return array
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _restore_target(leaf: Any) -> Any:
    """A leaf's restore target: its shape, dtype and placement (the default device when it has none).

    Without a placement Orbax would return whatever type was saved (NumPy
    arrays, as :func:`save` writes them), not device arrays.
    """
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if isinstance(target, jax.ShapeDtypeStruct) and target.sharding is None:
        device = jax.local_devices()[0]
        target = jax.ShapeDtypeStruct(target.shape, target.dtype,
                                      sharding=jax.sharding.SingleDeviceSharding(device))
    return target


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _fill(abstract: Any, raw: Any, step: int, what: str) -> Any:
    """Puts the arrays of a target-less restore into ``abstract``'s structure."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, ref in leaves_with_paths:
        node = raw
        for key in path:
            name = _key_name(key)
            if isinstance(node, Mapping):
                node = node.get(name, node.get(str(name)))
            elif isinstance(node, (list, tuple)) and isinstance(name, int) and name < len(node):
                node = node[name]
            else:
                node = None
            if node is None:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} has no {what} array {jax.tree_util.keystr(path)}; "
                    "restore with the model of the saved run"
                )
        array = np.asarray(node)
        want = np.dtype(getattr(ref, "dtype", array.dtype))
        if array.dtype == np.dtype(f"V{want.itemsize}") and want != array.dtype:
            array = array.view(want)  # .npy stores ml_dtypes (bfloat16, float8) as raw bytes
        leaves.append(array)
    return jax.tree.unflatten(treedef, leaves)


def restore_variables(
    ckpt: Checkpointer, abstract_params: Any, abstract_model_state: Any, *, step: int | str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only a checkpoint's model variables, without its optimizer state.

    For deployment (``jaxnet export``): no optimizer has to be rebuilt, since
    the optimizer state is read without a target and dropped. The parameters
    and model state are verified like :func:`restore`'s.

    Args:
        ckpt: from :func:`create_checkpoint_manager` (``read_only=True`` is fine).
        abstract_params, abstract_model_state: ``nnx.split(model, nnx.Param, ...)``
            of the model the run trained, or their ``jax.eval_shape``.
        step: ``None``/``"latest"``, ``"best"`` or a step number.

    Returns:
        ``(params, model_state, meta)`` with numpy arrays as leaves; a typed
        PRNG key of the model (an ``nnx.RngKey``) comes back as a JAX key
        array on the default device, since keys have no NumPy form.

    Raises:
        CheckpointMismatchError, CheckpointError: as :func:`restore`.
    """
    step = resolve_step(ckpt, step)
    wait(ckpt)
    verify_files(ckpt, step)
    record = _read_record(ckpt, step)
    wanted = {"params": abstract_params, "model_state": abstract_model_state}
    _check_shapes(record, wanted, step, list(wanted))
    stored = integrity.key_data_tree(wanted)  # typed keys as the key data that was written
    where = _step_dir(ckpt, step) / "state"
    if (where / ARRAYS_FILE).is_file():
        where = where / ARRAYS_FILE
        raw = _nest(_read_npz(ckpt, step, where))
    else:
        raw = _read_orbax_untargeted(ckpt, step, where)
    restored = {name: _fill(tree, raw.get(name, {}), step, name) for name, tree in stored.items()}
    _check_digests(record, restored, step, list(wanted), where)
    restored = _wrap_keys(restored, wanted)
    return restored["params"], restored["model_state"], record["meta"]


def _quarantine(ckpt: Checkpointer, bad_steps: list[int]) -> pathlib.Path:
    """Moves damaged step folders aside so that the resumed run can save those steps again."""
    target_dir = _move_aside(ckpt.directory, bad_steps)
    ckpt.manager.reload()
    return target_dir


def _move_aside(directory: pathlib.Path, bad_steps: list[int]) -> pathlib.Path:
    target_dir = directory / QUARANTINE_DIR
    target_dir.mkdir(exist_ok=True)
    for step in bad_steps:
        target, n = target_dir / str(step), 0
        while target.exists():
            n += 1
            target = target_dir / f"{step}.{n}"
        os.replace(directory / str(step), target)
    return target_dir


def restore_latest_good(ckpt: Checkpointer, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that is sound and finite, skipping the others.

    What ``--resume`` calls. A step is skipped when it is damaged, or when
    its state holds NaN/inf (written before ``fit`` refused to save such
    states; see :func:`save` for what counts). Each skipped step is logged
    (logger ``jaxnet.checkpoint``, WARNING) with the reason; once an older
    step restores, the skipped folders are moved to
    ``<directory>/corrupt/<step>`` (nothing is deleted) so the resumed run
    can write those steps anew.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        abstract_state: as for :func:`restore`.

    Returns:
        ``(state, meta)``, or ``None`` when there is no checkpoint at all (a
        run killed before its first save starts from scratch).

    Raises:
        CheckpointMismatchError: the checkpoints belong to another model.
        CheckpointError: every checkpoint is damaged or non-finite (each one
            is named).
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(steps(ckpt)):
        try:
            state, record = _restore(ckpt, abstract_state, step, finite_only=True)
        except CheckpointMismatchError:
            raise
        except CheckpointError as exc:
            logger.warning("skipping checkpoint step %d: %s", step, exc)
            skipped.append((step, str(exc)))
            continue
        if skipped:
            where = _quarantine(ckpt, [s for s, _ in skipped])
            logger.warning(
                "resuming from checkpoint step %d; the skipped step(s) %s were moved to %s",
                step, ", ".join(str(s) for s, _ in skipped), where,
            )
        else:
            logger.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
        return state, record["meta"]
    if skipped:
        raise CheckpointError(
            f"no sound checkpoint in {ckpt.directory}: "
            + "; ".join(reason for _, reason in skipped)
            + ". Start a fresh run with another --workdir"
        )
    return None
