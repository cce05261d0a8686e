"""Saving: a host copy in the caller, the rest on a worker thread and Orbax's; failures in one line.

:func:`save` returns once the arrays are copied off the device, so the
training loop may donate its state at once. jaxnet's worker thread then
checks the copy for NaN/inf, computes its SHA-256 digests (hashing releases
the GIL) and hands it to Orbax, whose own thread writes the files; Orbax's
finalization hook (:func:`write_manifest`) adds the file manifest before the
rename that commits the step. A save that fails is cleaned up and raised,
one line naming the step, the path, the cause and the fix, by the next
:func:`save`, :func:`wait`, :func:`check_saves` or ``close``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxnet.checkpoint import arrays, integrity
from jaxnet.checkpoint.errors import CheckpointError
from jaxnet.checkpoint.folder import CheckpointFolder, PendingSave, finish_handover, metric_fn
from jaxnet.checkpoint.orbax_glue import WRITE_FIXES, call_orbax, write_failure
from jaxnet.errors import ConfigError

logger = logging.getLogger("jaxnet.checkpoint")

PROBE_FILE = ".jaxnet-write-probe"  # probe_writable's file, removed again


def save(
    ckpt: CheckpointFolder,
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
    ``latest`` only when complete. Older checkpoints are deleted according
    to the retention rules once this one is complete, never before. A failure
    in the background (disk full...) is raised by the next :func:`save`,
    :func:`wait`, ``close`` or :func:`check_saves`, after its partial
    folder is removed.

    The record notes whether the state is finite (``"finite"``: no NaN/inf
    in any float array; the optimizer state may hold inf, as optax's
    ``reduce_on_plateau`` does, but no NaN), checked on the host copy in the
    background. A non-finite state is saved, with a warning, but never
    ranked by ``best_metric``, and ``restore_latest_good`` and
    ``resolve_step``'s ``"latest"``/``"best"`` pass over it.

    Args:
        ckpt: from ``create_checkpoint_manager``.
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
        if math.isfinite(metric_fn(ckpt.best_metric, ckpt.best_mode)(metrics)):
            tracked = {ckpt.best_metric: float(metrics[ckpt.best_metric])}
    wait(ckpt)  # Orbax waits for the previous save anyway
    if step in ckpt.manager.all_steps():
        raise CheckpointError(
            f"checkpoint step {step} already exists in {ckpt.directory}; save each step once "
            "(an epoch-end save replaces the periodic save of the same step)"
        )
    host = host_copy(integrity.key_data_tree(state))  # typed PRNG keys: their uint32 data
    if not all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host)) or not ckpt.async_save:
        # Device arrays (another process's shards) must reach Orbax before
        # this returns: the caller may donate them next.
        _hand_over(ckpt, step, host, header, tracked)
    else:
        # Digesting and Orbax's synchronous part happen off the training loop (benchmarks/CHECKPOINTS.md).
        ckpt.pending.handover = ckpt.worker.submit(_hand_over, ckpt, step, host, header, tracked)
    if not ckpt.async_save:
        wait(ckpt)


def _hand_over(
    ckpt: CheckpointFolder, step: int, state: Any, header: dict[str, Any], tracked: dict[str, float] | None
) -> None:
    """Digests ``state`` and starts Orbax's (asynchronous) save of it and its record.

    In an ``"npz"`` folder a state held whole by this one process is written
    as ``arrays.npz``; any other goes to Orbax's ``StandardSave``. A host
    state is checked for NaN/inf here; the finiteness of a state spread over
    processes is not recorded (it is checked on restore).

    Raises:
        CheckpointError: Orbax refused the save (the step folder cannot be
            created...), after cleaning up (:func:`_save_failed`).
    """
    host_arrays = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(state))
    if host_arrays:
        bad = nonfinite_leaf(state)
        header = {**header, "finite": bad is None, **({"nonfinite": bad} if bad else {})}
        if bad is not None:
            tracked = None  # never the best
            logger.warning(
                "checkpoint step %d holds non-finite values (NaN/inf) in %s: it is saved, but "
                "never resumed from or chosen as latest or best",
                step,
                bad,
            )
    record = integrity.finish_record(header, state)
    flat = None
    if ckpt.array_format == "npz" and jax.process_count() == 1 and host_arrays:
        flat = arrays.flat_arrays(state)
    item = ocp.args.StandardSave(state) if flat is None else arrays.NpzSave(flat)
    args = ocp.args.Composite(state=item, meta=ocp.args.JsonSave(record))
    ckpt.pending.step = step
    try:
        call_orbax(ckpt.pending.reported, ckpt.manager.save, step, args=args, metrics=tracked, force=True)
    except Exception as exc:
        raise _save_failed(ckpt, step, exc) from None


def nonfinite_leaf(state: Any) -> str | None:
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
        name = arrays.path_name(path)
        nan_only = name.split("/")[0] == "opt_state"
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            ok = bool(~jnp.any(jnp.isnan(leaf)) if nan_only else jnp.all(jnp.isfinite(leaf)))
        else:
            array = np.asarray(leaf)
            ok = not np.isnan(array).any() if nan_only else bool(np.isfinite(array).all())
        if not ok:
            return name or "the state"
    return None


def host_copy(state: Any) -> Any:
    """``state`` with every array copied into host memory, when this process holds all of it.

    The copy (never a view of a device buffer, which the next donated train
    step may overwrite) lets the caller donate ``state`` at once, and is what
    :func:`save` hands to its worker thread. Orbax too spends less CPU on
    NumPy leaves than on device arrays (``benchmarks/CHECKPOINTS.md``);
    restoring places the arrays on the target's devices. Arrays spread over
    several processes stay as they are: Orbax writes each process's shards.
    Typed PRNG keys have no NumPy form: :func:`save` passes
    :func:`jaxnet.checkpoint.integrity.key_data_tree` of the state, their uint32 data.
    """
    leaves = jax.tree.leaves(state)
    if not all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves):
        return state
    if any(isinstance(x, jax.Array) and (not x.is_fully_addressable or integrity.is_prng_key(x)) for x in leaves):
        return state  # another process's shards, or typed PRNG keys not converted by the caller
    return jax.tree.map(lambda x: np.array(x, copy=True), state)


def write_manifest(directory: pathlib.Path, pending: PendingSave) -> None:
    """Orbax's post-finalization hook: the file manifest of the step being committed.

    Runs in Orbax's background thread after all items are written and before
    the temporary folder is renamed, so the manifest is committed atomically
    with the checkpoint. A failure here only costs the manifest (the array
    digests in the record still guard the checkpoint), never the save; a
    manifest cut short (disk full) is removed, so the step is not taken for
    a damaged one.
    """
    step, folder = pending.step, None
    if step is None:
        return
    try:
        (folder,) = [p for p in directory.glob(f"{step}.orbax-checkpoint-tmp*") if p.is_dir()]
        integrity.write_manifest(folder, step)
    except Exception as exc:  # never fail the save itself
        if folder is not None:
            with contextlib.suppress(OSError):
                (folder / integrity.MANIFEST_FILE).unlink(missing_ok=True)
        logger.warning("checkpoint step %d: could not write its file manifest: %s", step, exc)


def wait(ckpt: CheckpointFolder) -> None:
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
        finish_handover(ckpt)
    except CheckpointError as exc:  # reported after Orbax's own pending save is finished
        handover_error = exc
    try:
        call_orbax(ckpt.pending.reported, ckpt.manager.wait_until_finished)
    except Exception as exc:
        ckpt.pending.reported.append(exc)
        error = _save_failed(ckpt, ckpt.pending.step, exc)
        raise (handover_error or error) from None
    ckpt.pending.step = None
    if handover_error is not None:
        raise handover_error


def check_saves(ckpt: CheckpointFolder) -> None:
    """Raises now if a save handed over earlier has failed; never blocks.

    :func:`save` returns before its files are written, and a failure would
    otherwise surface only at the next :func:`save`, :func:`wait` or
    ``close``, perhaps an epoch later. A training loop calls this every
    step (it costs a few attribute reads) to stop within a step of a failure.

    Raises:
        CheckpointError: as :func:`wait`.
    """
    job = ckpt.pending.handover
    if job is not None and not job.done():
        return  # the worker is still handing it over
    finish_handover(ckpt)
    if ckpt.pending.step is not None and not ckpt.manager.is_saving_in_progress():
        wait(ckpt)  # finished: returns at once, or raises its failure


def _save_failed(ckpt: CheckpointFolder, step: int | None, exc: BaseException) -> CheckpointError:
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
    ckpt.pending.step = None
    with contextlib.suppress(Exception):
        ckpt.manager.reload()
    cause, fix = write_failure(exc, partial[0] if partial else ckpt.directory)
    found: list[int] = []
    with contextlib.suppress(Exception):
        found = sorted(ckpt.manager.all_steps())
    if step is not None and step in found:  # committed; what failed came after (retiring old steps)
        return CheckpointError(
            f"checkpoint step {step} was saved to {ckpt.directory}, but finishing the save failed: {cause}; {fix}"
        )
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
        raise CheckpointError(
            f"cannot write checkpoints to {path}: it is a file, not a folder [ENOTDIR]; {WRITE_FIXES[errno.ENOTDIR]}"
        )
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
        cause, fix = write_failure(exc, path)
        raise CheckpointError(f"cannot write checkpoints to {path}: {cause}; {fix}") from None
    return path
