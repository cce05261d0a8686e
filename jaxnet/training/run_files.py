"""A run's workdir as one context-managed object: lock, config, write probe, checkpoints, logs.

:func:`jaxnet.fit` opens it before anything is compiled. In order: one writer
per workdir (:class:`jaxnet.checkpoint.lock.WorkdirLock`), the recorded config checked
(:func:`jaxnet.checkpoint.workdir.check_workdir`), a probe that the checkpoint folder can
be written, then the checkpoint manager and the metrics logger.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from jaxnet.state import TrainState
from jaxnet.tracking import METRICS_FILE, MetricsLogger
from jaxnet.training.plan import _Plan

if TYPE_CHECKING:  # imported when a workdir is opened, not with the module
    from jaxnet.checkpoint.folder import CheckpointFolder
    from jaxnet.checkpoint.lock import WorkdirLock


class RunFiles:
    """A run's workdir as one object: config check, checkpoints, logs, the curves plot.

    Used as a context manager by :func:`fit`; with ``workdir=None`` every
    method does nothing (and ``restore`` returns ``None``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None,
        config: dict[str, Any],
        plan: _Plan,
        *,
        resume: bool | str,
        keep_checkpoints: int,
    ):
        self.workdir, self.resume, self.blocked = workdir, resume, 0.0
        self._config, self._plan, self._keep = config, plan, keep_checkpoints
        self.last_saved: int | None = None  # the newest checkpoint step of this run (restored or written)
        self.resumed_from: int | None = None
        self.main = jax.process_index() == 0
        self.ckpt: CheckpointFolder | None = None
        self.lock: WorkdirLock | None = None
        self._logger: MetricsLogger | None = None

    @property
    def logger(self) -> MetricsLogger:
        """The run's metrics logger; :meth:`restore` opens it, once the first step to log is known."""
        if self._logger is None:
            raise RuntimeError("RunFiles.restore opens the metrics logger; call it first")
        return self._logger

    def _open(self) -> None:
        """One writer per workdir (the lock first), then the config check, a write probe, the checkpoints."""
        from jaxnet import checkpoint as ckpt_lib
        from jaxnet.checkpoint import workdir as workdir_lib
        from jaxnet.checkpoint.lock import WorkdirLock

        if self.workdir is None:
            return
        if self.main:  # config.json, the lock and the probe are process 0's
            if self.resume is True and not os.path.isdir(self.workdir):
                workdir_lib.check_workdir(self.workdir, self._config, resume=True)  # "does not exist"
            self.lock = WorkdirLock(self.workdir).acquire()
            workdir_lib.check_workdir(
                self.workdir, self._config, resume=self.resume, mutable_keys=workdir_lib.RESUMABLE_KEYS
            )
            ckpt_lib.probe_writable(workdir_lib.checkpoint_directory(self.workdir))
        plan = self._plan
        self.ckpt = ckpt_lib.create_checkpoint_manager(
            workdir_lib.checkpoint_directory(self.workdir),
            max_to_keep=self._keep,
            best_metric=plan.best_metric,
            best_mode=plan.best_mode,
            keep_best=plan.keep_best,
        )

    def restore(self, state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The checkpoint to resume from (``None``: start afresh), then the metrics logger opened after it."""
        restored = self._latest_good(state)
        step = int(restored[0].step) if restored is not None else None
        self.last_saved = self.resumed_from = step
        if step is not None:
            self._rewind_logs(step)
        self._logger = MetricsLogger(
            self.workdir if self.main else None, purge_step=step + 1 if step is not None else None
        )
        return restored

    def _latest_good(self, state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest sound checkpoint when resuming; ``None`` otherwise (no workdir: fit refuses to resume)."""
        if not self.resume or self.ckpt is None:
            return None
        from jaxnet import checkpoint as ckpt_lib

        return ckpt_lib.restore_latest_good(self.ckpt, state)

    def _rewind_logs(self, step: int) -> None:
        """Drops the metrics logged after the restored step: the resumed run logs them again."""
        if self.main and self.workdir is not None:
            from jaxnet.checkpoint import workdir as workdir_lib

            workdir_lib.rewind_jsonl(os.path.join(self.workdir, METRICS_FILE), step)

    def write_model(self, graphdef: nnx.GraphDef, state: TrainState, plan: _Plan) -> None:
        """Records how to rebuild the model's forward pass, so that ``jaxnet export`` works for any model."""
        from jaxnet import export as export_lib

        write = getattr(export_lib, "write_workdir_model", None)
        if self.workdir is None or not self.main or write is None:
            return
        write(
            self.workdir,
            graphdef,
            state.params,
            state.model_state,
            input_shape=tuple(np.shape(plan.sample_x)[1:]),
            input_dtype=np.asarray(plan.sample_x).dtype,
            transform=plan.transform,
            output=plan.output,
        )

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
        if self.ckpt is None:
            return
        from jaxnet import checkpoint as ckpt_lib

        t = time.perf_counter()
        self.logger.flush()  # the logs up to this step are on disk before the checkpoint is
        ckpt_lib.save(self.ckpt, step, state, meta=meta, metrics=metrics)
        self.blocked += time.perf_counter() - t
        self.last_saved = step

    def wait(self) -> None:
        """Blocks until every checkpoint handed over is on disk (durable)."""
        if self.ckpt is not None:
            from jaxnet import checkpoint as ckpt_lib

            ckpt_lib.wait(self.ckpt)

    def check_saves(self) -> None:
        """Raises a failed background save now (disk full, read-only), not at the next save."""
        if self.ckpt is not None:
            from jaxnet import checkpoint as ckpt_lib

            ckpt_lib.check_saves(self.ckpt)

    def __enter__(self) -> RunFiles:
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._logger is not None:
                self._logger.close()
            if self.ckpt is not None:
                from jaxnet import checkpoint as ckpt_lib

                t = time.perf_counter()
                ckpt_lib.close(self.ckpt)  # waits for the last asynchronous save
                self.blocked += time.perf_counter() - t
        finally:
            if self.lock is not None:
                self.lock.release()
