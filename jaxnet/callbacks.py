"""Callbacks: your code between compiled steps, as Keras and Lightning callbacks are.

:func:`jaxnet.fit` calls every callback's hooks on the host, between compiled
steps, at these points::

    on_fit_start(run)
    for each epoch:
        on_epoch_start(run, epoch)
        on_train_batch_end(run, step, logs)   # every log_every steps (the loop's only host syncs)
        on_epoch_end(run, epoch, logs)        # logs: the epoch's record (train_*, val_* or test_*)
    on_fit_end(run, logs)                     # logs: the run's summary

A hook may add numbers to ``logs``: they are logged with the built-in ones
(``metrics.jsonl``, TensorBoard, ``FitResult.history``). Setting
``run.stop_training = True`` ends the run cleanly after the current epoch,
with nothing recompiled. ``run.state`` is the current
:class:`~jaxnet.state.TrainState`; a callback may replace it (as
``EarlyStopping(restore_best=True)`` does at the end) but must not keep it
without :func:`~jaxnet.state.copy_state`: the next step donates it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.state import TrainState, copy_state, merge_model

_MAX_HINTS = ("acc", "auc", "f1", "precision", "recall")


@dataclasses.dataclass
class Run:
    """What a callback sees of a running :func:`jaxnet.fit`.

    Attributes:
        graphdef: the model's graph definition.
        state: the current training state (replace it to change the run's result).
        epoch: the epoch in progress (0-based), or the last one after the run.
        step: optimizer steps taken so far.
        epochs: the epochs the run was asked for.
        history: the records of the finished epochs.
        workdir: the run's workdir, or ``None``.
        stop_training: set to True to end the run after this epoch.
    """

    graphdef: nnx.GraphDef
    state: TrainState
    epochs: int
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    workdir: str | None = None
    stop_training: bool = False

    def model(self) -> nnx.Module:
        """The model at the current state, in evaluation mode (a new object, not the user's)."""
        return merge_model(self.graphdef, copy_state(self.state))


class Callback:
    """Base class: override the hooks you need; each does nothing by default."""

    def on_fit_start(self, run: Run) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        """Before an epoch's first step."""

    def on_train_batch_end(self, run: Run, step: int, logs: dict[str, float]) -> None:
        """Every ``log_every`` steps, with the step's ``loss`` (add keys to log them)."""

    def on_epoch_end(self, run: Run, epoch: int, logs: dict[str, Any]) -> None:
        """After an epoch's evaluation, with its record (add keys to log them)."""

    def on_fit_end(self, run: Run, logs: dict[str, Any]) -> None:
        """After the last epoch, before the final test evaluation and the summary."""


def resolve_mode(monitor: str, mode: str) -> str:
    """``"min"`` or ``"max"``; ``"auto"`` is ``"max"`` for accuracy-like names, else ``"min"``."""
    if mode == "auto":
        return "max" if any(h in monitor for h in _MAX_HINTS) else "min"
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min', 'max' or 'auto'; got {mode!r}")
    return mode


def monitored(logs: dict[str, Any], monitor: str, who: str) -> float:
    """The value of ``monitor`` in an epoch's logs, or an error listing what there is."""
    if monitor not in logs:
        numeric = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) and k not in ("epoch", "step"))
        raise ConfigError(
            f"{who} monitors {monitor!r}, which the epoch records do not have; choose one of {', '.join(numeric)}"
        )
    return float(logs[monitor])


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stops training when a monitored metric has stopped improving.

    Counterpart of Keras's ``EarlyStopping`` and Lightning's. The run ends
    cleanly after the epoch that exhausts ``patience`` (its checkpoint is
    written as usual); nothing is recompiled.

    Args:
        monitor: an epoch record key, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (``max`` for accuracy-like names).
        patience: epochs without improvement before stopping.
        restore_best: at the end, replace the run's final state by the best
            epoch's (a device copy is kept, so memory for one more state). In
            a resumed run, the best of the epochs before the interruption
            counts for patience but only states from the resumed epoch on
            can be restored.
        min_delta: smallest change that counts as an improvement.

    Attributes:
        best: the best value seen; ``best_epoch``: its epoch (1-based);
        stopped_epoch: the epoch (1-based) the run stopped after, or ``None``.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        patience: int = 3,
        restore_best: bool = False,
        *,
        min_delta: float = 0.0,
    ):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"EarlyStopping patience must be an integer >= 0; got {patience!r}")
        if not min_delta >= 0:
            raise ConfigError(f"EarlyStopping min_delta must be >= 0; got {min_delta!r}")
        self.monitor, self.mode = monitor, resolve_mode(monitor, mode)
        self.patience, self.min_delta, self.restore_best = patience, float(min_delta), restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._best_state: TrainState | None = None

    def on_fit_start(self, run: Run) -> None:
        # A resumed run replays the history it restored, so patience counts across the interruption.
        self.best, self.best_epoch, self.stopped_epoch, self._wait = None, None, None, 0
        for record in run.history:
            self._update(record, None)

    def _update(self, logs: dict[str, Any], run: Run | None) -> None:
        value = monitored(logs, self.monitor, "EarlyStopping")
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self._wait = value, int(logs["epoch"]), 0
            if run is not None and self.restore_best:
                self._best_state = copy_state(run.state)
        else:
            self._wait += 1

    def on_epoch_end(self, run: Run, epoch: int, logs: dict[str, Any]) -> None:
        self._update(logs, run)
        if self._wait >= max(self.patience, 1) and epoch + 1 < run.epochs:
            run.stop_training = True
            self.stopped_epoch = epoch + 1

    def on_fit_end(self, run: Run, logs: dict[str, Any]) -> None:
        if self.restore_best and self._best_state is not None:
            run.state = self._best_state
            self._best_state = None


class BestCheckpoints(Callback):
    """Which checkpoints to keep besides the newest: the best ``keep`` by a monitored metric.

    Counterpart of Lightning's ``ModelCheckpoint(monitor, mode, save_top_k)``;
    implemented with Orbax's ``best_fn`` retention in the run's checkpoint
    manager. Without it, :func:`jaxnet.fit` keeps the best by ``val_accuracy``
    (``val_loss`` for regression) when there is a validation split, and only
    the newest checkpoints otherwise (it never selects by the test split).
    ``jaxnet export --step best`` exports the best.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", keep: int = 1):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"BestCheckpoints keep must be an integer >= 1; got {keep!r}")
        self.monitor, self.mode, self.keep = monitor, resolve_mode(monitor, mode), keep

    def on_epoch_end(self, run: Run, epoch: int, logs: dict[str, Any]) -> None:
        monitored(logs, self.monitor, "BestCheckpoints")  # a typo fails at the first epoch, clearly


def _schedule_count(opt_state: Any) -> jax.Array | None:
    is_state = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
    return found[0].count if found else None


def _injected_lr(opt_state: Any) -> jax.Array | None:
    # optax.inject_hyperparams states (InjectHyperparamsState, InjectStatefulHyperparamsState)
    is_state = lambda x: isinstance(getattr(x, "hyperparams", None), dict)  # noqa: E731
    for x in jax.tree.leaves(opt_state, is_leaf=is_state):
        if is_state(x) and "learning_rate" in x.hyperparams:
            return x.hyperparams["learning_rate"]
    return None


def current_learning_rate(opt_state: Any, schedule: Any = None) -> float | None:
    """The learning rate the optimizer applies next, read from its state.

    Works for ``optax.inject_hyperparams`` optimizers (their
    ``learning_rate``), and for any optimizer scaled by a schedule
    (``jaxnet.optim.create_optimizer`` with a schedule, ``optax.adam(schedule)``)
    when ``schedule`` is given: it is evaluated at the schedule's own count.
    A constant ``schedule`` (a float) is returned as is.
    """
    injected = _injected_lr(opt_state)
    if injected is not None:
        return float(injected)
    if schedule is None:
        return None
    if not callable(schedule):
        return float(schedule)
    count = _schedule_count(opt_state)
    return None if count is None else float(schedule(count))


class LearningRateLogger(Callback):
    """Logs the current learning rate as ``lr`` (epoch records, ``metrics.jsonl``, TensorBoard).

    Counterpart of Lightning's ``LearningRateMonitor``.

    Args:
        schedule: the optimizer's learning rate (a float or an optax schedule).
            Not needed for ``jaxnet.optim.create_optimizer`` optimizers (fit
            knows their schedule) or ``optax.inject_hyperparams`` ones.
    """

    def __init__(self, schedule: Any = None):
        self.schedule = schedule

    def _lr(self, run: Run) -> float | None:
        return current_learning_rate(run.state.opt_state, self.schedule)

    def on_train_batch_end(self, run: Run, step: int, logs: dict[str, float]) -> None:
        lr = self._lr(run)
        if lr is not None:
            logs["lr"] = lr

    def on_epoch_end(self, run: Run, epoch: int, logs: dict[str, Any]) -> None:
        lr = self._lr(run)
        if lr is None:
            raise ConfigError(
                "LearningRateLogger cannot read the learning rate from this optimizer's "
                "state; pass LearningRateLogger(schedule=...) with its learning rate or schedule"
            )
        logs["lr"] = lr


def call(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    """Calls ``hook`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(*args)
