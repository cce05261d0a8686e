"""The handle of an open checkpoint folder, and what it answers without reading a checkpoint.

:class:`CheckpointFolder` is what :func:`jaxnet.checkpoint.create_checkpoint_manager`
returns and every other function of :mod:`jaxnet.checkpoint` takes: Orbax's
``CheckpointManager`` and the settings it was opened with, which never
change, plus :class:`PendingSave`, the one part that changes with every save.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import numbers
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import orbax.checkpoint as ocp

DEFAULT_BEST_METRIC = "test_accuracy"  # what `jaxnet train` ranks checkpoints by


@dataclasses.dataclass(eq=False)
class PendingSave:
    """The save in progress: what changes with every save, and who changes it.

    Attributes:
        step: the step Orbax is writing in the background, if any (it runs
            one save at a time). Set by the worker when it hands a save
            over; read by the manifest writer (Orbax's finalization hook);
            cleared once the save is committed or has failed.
        handover: the worker thread's job of digesting the next host copy
            and handing it to Orbax, until it has been waited for.
        reported: Orbax's exceptions of failed saves that were raised as a
            CheckpointError already (Orbax raises each once in every thread
            that waits for it; the later ones are ignored).
    """

    step: int | None = None
    handover: concurrent.futures.Future | None = None
    reported: list[BaseException] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class CheckpointFolder:
    """An open folder of checkpoints: Orbax's ``CheckpointManager`` and the facts jaxnet keeps beside it.

    Made by :func:`~jaxnet.checkpoint.create_checkpoint_manager`; pass it to
    :func:`~jaxnet.checkpoint.save`, :func:`~jaxnet.checkpoint.restore`,
    :func:`latest`, :func:`best`, :func:`~jaxnet.checkpoint.wait` and
    :func:`~jaxnet.checkpoint.close`. The first six fields are the settings
    it was opened with and are never reassigned; ``pending`` changes with
    every save.

    Attributes:
        manager: the underlying ``orbax.checkpoint.CheckpointManager``.
        directory: the folder holding one sub-folder per step.
        best_metric: the metric that ranks checkpoints, or ``None``.
        best_mode: ``"max"`` or ``"min"``: which end of ``best_metric`` is best.
        async_save: whether ``save`` returns before the files are written.
        array_format: ``"orbax"`` or ``"npz"``: how a state that this process
            holds whole is written (a state spread over processes always
            goes to Orbax's format).
        pending: the save in progress (:class:`PendingSave`).
        worker: the thread that digests a host copy and hands it to Orbax.
    """

    manager: ocp.CheckpointManager
    directory: pathlib.Path
    best_metric: str | None
    best_mode: str
    async_save: bool
    array_format: str
    pending: PendingSave = dataclasses.field(default_factory=PendingSave)
    worker: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxnet-checkpoint")
    )


Checkpointer = CheckpointFolder  # the name of jaxnet <= 0.1; Orbax has a class of that name too


def metric_fn(name: str, mode: str) -> Callable[[Any], float]:
    """Orbax's ``best_fn``: the value of ``name`` in a checkpoint's metrics; a missing or NaN one ranks last."""
    worst = -math.inf if mode == "max" else math.inf

    def metric(metrics: Any) -> float:
        value = metrics.get(name) if isinstance(metrics, Mapping) else None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            return worst
        return float(value)

    return metric


def step_dir(ckpt: CheckpointFolder, step: int) -> pathlib.Path:
    """The folder of a finished step: ``directory/<step>``."""
    return ckpt.directory / str(step)


def finish_handover(ckpt: CheckpointFolder) -> None:
    """Waits until the worker has handed the pending save to Orbax (not until it is committed).

    Raises:
        CheckpointError: handing it over failed; the save did not happen.
    """
    job, ckpt.pending.handover = ckpt.pending.handover, None
    if job is not None:
        job.result()


def steps(ckpt: CheckpointFolder) -> list[int]:
    """Every finished checkpoint's step, ascending."""
    finish_handover(ckpt)
    return sorted(ckpt.manager.all_steps())


def latest(ckpt: CheckpointFolder) -> int | None:
    """The newest finished checkpoint's step, or ``None``; interrupted saves never count."""
    finish_handover(ckpt)
    return ckpt.manager.latest_step()


def best(ckpt: CheckpointFolder) -> int | None:
    """The step of the best checkpoint by ``best_metric``, or ``None``.

    ``None`` when no metric was chosen or no kept checkpoint was saved with
    it. Orbax ranks only checkpoints saved with metrics, and ``save`` passes
    the metric only when it is a finite number of a finite state.
    """
    if ckpt.best_metric is None:
        return None
    finish_handover(ckpt)
    return ckpt.manager.best_step()
