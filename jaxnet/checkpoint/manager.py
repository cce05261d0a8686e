"""Opening and closing a checkpoint folder: Orbax's CheckpointManager, its retention and its item handlers.

A step holds two Orbax items, ``state`` (the arrays) and ``meta`` (the JSON
record), each written by the handler registered for it here. In the default
``"orbax"`` format that is Orbax's own ``StandardCheckpointHandler``, and
Orbax records its name in the step's ``_CHECKPOINT_METADATA``: so plain
``orbax.checkpoint.CheckpointManager(directory).restore(step)`` opens the
checkpoint without jaxnet. ``"npz"`` registers
:class:`jaxnet.checkpoint.arrays.NpzHandler` instead.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxnet.checkpoint import arrays, recovery
from jaxnet.checkpoint.errors import CheckpointError
from jaxnet.checkpoint.folder import CheckpointFolder, PendingSave, metric_fn
from jaxnet.checkpoint.orbax_glue import call_orbax, orbax_errors, quiet_orbax
from jaxnet.checkpoint.saving import wait, write_manifest
from jaxnet.errors import ConfigError

logger = logging.getLogger("jaxnet.checkpoint")

ARRAY_FORMATS = ("orbax", "npz")  # how a state held whole by one process is written; the first is the default


def create_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    keep_best: int = 1,
    async_save: bool = True,
    array_format: str = "orbax",
    read_only: bool = False,
    clean_unfinished: bool = True,
) -> CheckpointFolder:
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
        best_metric: metric name in ``save``'s ``metrics`` that ranks
            checkpoints, e.g. ``"test_accuracy"``; ``None`` keeps only the newest.
        best_mode: ``"max"`` or ``"min"``: which values of ``best_metric`` are best.
        keep_best: how many of the best checkpoints to keep besides the newest.
            Checkpoints saved without the metric are kept only while among
            the newest ``max_to_keep``.
        async_save: finish writing in a background thread.
        array_format: ``"orbax"`` (default) writes the state in Orbax's own
            format, which plain ``orbax-checkpoint`` restores without
            jaxnet (``ocp.CheckpointManager(directory).restore(step)``,
            ``ocp.StandardCheckpointer().restore(directory / str(step) /
            "state")``); ``"npz"`` writes a state that this process holds
            whole as one ``arrays.npz`` that ``np.load`` reads, with less
            CPU per save. Restoring reads either, whatever this setting.
        read_only: open an existing folder without ever writing or deleting.
        clean_unfinished: ``False`` never deletes unfinished saves (e.g. when
            the caller does not hold the workdir's lock and another process
            may write there without taking it).

    Returns:
        A :class:`~jaxnet.checkpoint.folder.CheckpointFolder`; :func:`close` it when done.

    Raises:
        ConfigError: bad retention settings or array format.
        CheckpointError: the folder is a file, cannot be created, or does not
            exist in ``read_only`` mode.

    Example:
        >>> from jaxnet.checkpoint import latest
        >>> ckpt = create_checkpoint_manager("/tmp/run/checkpoints", best_metric="test_accuracy")
        >>> latest(ckpt) is None
        True
        >>> close(ckpt)
    """
    _check_settings(max_to_keep, keep_best, best_mode, array_format)
    path = pathlib.Path(directory).absolute()
    if read_only and not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"the checkpoint folder {path} is a file, not a folder; move it or choose another --workdir"
        )
    quiet_orbax()
    if not read_only and clean_unfinished and jax.process_index() == 0:
        recovery.remove_unfinished_saves(path)
    pending = PendingSave()
    options = _options(
        path,
        pending,
        max_to_keep=max_to_keep,
        best_metric=best_metric,
        best_mode=best_mode,
        keep_best=keep_best,
        read_only=read_only,
    )
    with orbax_errors(f"opening the checkpoint folder {path}"):
        manager = _open_manager(path, options, _handler_registry(array_format), read_only)
    return CheckpointFolder(manager, path, best_metric, best_mode, async_save, array_format, pending)


def _check_settings(max_to_keep: Any, keep_best: Any, best_mode: Any, array_format: Any) -> None:
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ConfigError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ConfigError(f"keep_best must be an integer >= 0, got {keep_best!r}")
    if best_mode not in ("max", "min"):
        raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if array_format not in ARRAY_FORMATS:
        raise ConfigError(f"array_format must be 'npz' or 'orbax', got {array_format!r}")


def _options(
    path: pathlib.Path,
    pending: PendingSave,
    *,
    max_to_keep: int,
    best_metric: str | None,
    best_mode: str,
    keep_best: int,
    read_only: bool,
) -> ocp.CheckpointManagerOptions:
    """Orbax's options: the newest ``max_to_keep`` plus the ``keep_best`` best, and jaxnet's manifest hook."""
    policies: list[Any] = [ocp_policies.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
        best_fn = metric_fn(best_metric, best_mode)
        policies.append(
            ocp_policies.BestN(
                get_metric_fn=best_fn,
                reverse=best_mode == "min",
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    return ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        # Always Orbax's async checkpointer: its finalization hook writes the
        # manifest; async_save=False simply waits for each save to finish.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=lambda: write_manifest(path, pending),
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


def _open_manager(path: pathlib.Path, options: Any, registry: Any, read_only: bool) -> ocp.CheckpointManager:
    """Orbax's manager of ``path``; steps whose ``_CHECKPOINT_METADATA`` stops Orbax from opening it are moved aside.

    Opened for writing, the damaged steps go to ``corrupt/`` as
    ``restore_latest_good`` would move them; read-only, the error names them.
    """
    try:
        return ocp.CheckpointManager(path, options=options, handler_registry=registry)
    except ValueError:
        damaged = recovery.steps_with_damaged_metadata(path)
        if not damaged:
            raise
        if read_only:
            step, problem = min(damaged.items())
            raise CheckpointError(
                f"checkpoint step {step} is damaged: {problem}, and Orbax cannot open "
                f"{path} with it; move {path / str(step)} aside"
            ) from None
        where = recovery.move_aside(path, sorted(damaged))
        logger.warning(
            "checkpoint step(s) %s are damaged (%s) and were moved to %s",
            ", ".join(map(str, sorted(damaged))),
            "; ".join(damaged.values()),
            where,
        )
    return ocp.CheckpointManager(path, options=options, handler_registry=registry)


def _handler_registry(array_format: str) -> Any:
    """The items of a checkpoint and the handlers that read and write them.

    One handler instance per item: Orbax finalizes an item with the first
    handler registered for it and records a handler's name for it in the
    step's metadata, so each item has exactly one. Steps in the other array
    format still restore: an
    ``arrays.npz`` is read directly (``jaxnet.checkpoint.arrays.read_npz``),
    and ``NpzHandler`` reads Orbax's format too.
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = arrays.NpzHandler() if array_format == "npz" else ocp.StandardCheckpointHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add("state", args, state_handler)
    if array_format == "npz":
        registry.add("state", arrays.NpzSave, state_handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add("meta", ocp.args.JsonSave, json_handler)
    registry.add("meta", ocp.args.JsonRestore, json_handler)
    return registry


def close(ckpt: CheckpointFolder) -> None:
    """Finishes pending saves (``wait``) and releases the manager.

    Raises:
        CheckpointError: as ``wait``; the manager is released anyway.
    """
    try:
        wait(ckpt)
    finally:
        ckpt.worker.shutdown(wait=True)
        with orbax_errors(f"closing the checkpoint folder {ckpt.directory}"):
            call_orbax(ckpt.pending.reported, ckpt.manager.close)
