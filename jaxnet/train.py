"""The training loop: ``fit``, composed of small pure pieces you can call yourself.

``fit`` is the counterpart of the tutorials' ``for epoch in range(n): for x, y
in loader: ...`` loop plus their evaluation block, and of Keras's ``fit`` for
your own model and data. Its body reads top to bottom on one screen; each
piece is a named function of its own module: :mod:`jaxnet.training.plan` (the
argument checks, shared with the CLI), :mod:`jaxnet.training.steps` (the state and
the compiled steps), :mod:`jaxnet.training.run_files` (the workdir's lock, config,
checkpoints and logs), :mod:`jaxnet.training.loop` (one epoch of steps),
:mod:`jaxnet.training.result` (each epoch's record, the summary),
:mod:`jaxnet.training.stops` (signals and divergence) and :mod:`jaxnet.training.evaluation`.
Their public names are importable from here too (``jaxnet.train.FitResult``,
``jaxnet.train.evaluate``, ``jaxnet.train.plan_fit``, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnet import callbacks as jcallbacks
from jaxnet.compilation import CompileCounter
from jaxnet.data.inputs import FitData, Split, as_fit_data
from jaxnet.data.transforms import make_image_transform
from jaxnet.errors import ConfigError
from jaxnet.step import LossFn, MetricFn
from jaxnet.training.evaluation import evaluate
from jaxnet.training.loop import FitLoop, train_epoch
from jaxnet.training.plan import (
    _describe_fn,
    _named_metrics,
    _Plan,
    _user_loss,
    check_dataset,
    default_config,
    model_name,
    plan_fit,
    resolve_output,
    spec_of,
)
from jaxnet.training.result import FitResult, end_epoch, epoch_record, finish
from jaxnet.training.run_files import RunFiles
from jaxnet.training.steps import FitSteps, build_steps, default_train_metrics
from jaxnet.training.stops import NO_STEP, StopSignals

__all__ = [  # jaxnet.train's public names, wherever they are defined
    "FitResult",
    "FitSteps",
    "build_steps",
    "check_dataset",
    "default_config",
    "evaluate",
    "fit",
    "make_image_transform",
    "model_name",
    "plan_fit",
    "resolve_output",
    "spec_of",
]


def fit(
    model: nnx.Module,
    data: Any,
    tx: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    validation_split: float | None = None,
    validation_data: Any = None,
    loss_fn: LossFn | str | None = None,
    metrics: Mapping[str, MetricFn] | Sequence[MetricFn] | None = None,
    callbacks: Sequence[jcallbacks.Callback] = (),
    output: str | None = None,
    seed: int = 0,
    augment: bool = False,
    scan: bool = False,
    eval_batch_size: int = 1000,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = False,
    keep_checkpoints: int = 3,
    config: dict[str, Any] | None = None,
    devices: int | None = None,
    fsdp: bool = False,
    precision: str = "fp32",
    progress: bool = True,
    log_every: int = 50,
    on_nan: str = "stop",
    handle_signals: bool = True,
) -> FitResult:
    """Trains ``model`` on ``data`` with ``tx``, evaluating after every epoch.

    Args:
        model: any Flax NNX module (``__call__(self, x)``, Dropout with its own
            ``nnx.Rngs``, BatchNorm, ...), or a jaxnet model. After ``fit`` it
            holds the trained weights, as a PyTorch module does.
        data: an ``ArrayDataset``, an ``(x, y)`` tuple, a dict of arrays or of
            splits, a tfds/grain random-access source, or an iterable of
            batches (see :mod:`jaxnet.data.inputs`).
        tx: the optimizer (``jaxnet.optim.create_optimizer("adam", 1e-3)`` or any optax one).
        epochs: passes over the training split.
        batch_size: examples per step (the global batch over all devices);
            the last partial batch of an epoch is dropped (each epoch's
            shuffle drops different examples).
        validation_split: hold out this fraction of the training split
            (seeded) for validation: epochs then report ``val_*``, the best
            checkpoint is chosen by ``val_accuracy`` (``val_loss`` for
            regression) and the test split is evaluated once, at the end.
        validation_data: a validation split given apart (``(x, y)`` or a dict).
        loss_fn: ``fn(outputs, labels) -> scalar`` or ``fn(outputs, labels,
            batch)``, or a loss name (``"cross_entropy"``, ``"nll"``,
            ``"binary"``, ``"mse"``, ``"l1"``, ``"huber"``); default: the
            output kind's.
        metrics: extra metrics, ``{name: fn(outputs, labels[, batch])}`` or a
            list of functions: computed inside the compiled step (``train_<name>``)
            and per example at evaluation (``val_<name>``/``test_<name>``).
        callbacks: :class:`jaxnet.callbacks.Callback` objects, e.g.
            ``EarlyStopping``, ``BestCheckpoints``, ``LearningRateLogger``.
        output: the model's output kind (:data:`jaxnet.outputs.OUTPUT_KINDS`);
            ``None`` infers it (see :func:`resolve_output`).
        seed: seeds shuffling, dropout, augmentation and the validation holdout.
        augment: random crop + flip on training batches (on device; images only).
        scan: run each epoch as one compiled ``lax.scan`` over device-resident data.
        eval_batch_size: examples per evaluation call.
        workdir: where ``config.json``, ``metrics.jsonl``, TensorBoard files,
            ``curves.png`` and checkpoints (one at every epoch end) go;
            ``None`` writes nothing.
        checkpoint_every: also checkpoint every this many steps (mid-epoch).
        resume: ``True``: continue the run in ``workdir`` from its latest
            sound checkpoint, exactly as if it had never stopped (an error when
            there is none); ``"auto"``: continue if there is a checkpoint, else
            start (a script that can simply be rerun after a preemption).
        keep_checkpoints: newest checkpoints kept (plus the best, see ``validation_split``).
        config: JSON description of the run recorded in the workdir; a
            resumed run must match it (default: :func:`default_config`).
        devices: split each batch over this many local devices (data
            parallel); ``None`` uses one, or all of them in a multi-process run.
        fsdp: shard parameters and optimizer state over the devices too.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` compute (:data:`jaxnet.precision.PRECISIONS`;
            float32 parameters, and ``fp16`` adds dynamic loss scaling).
        progress: show a progress bar on stderr (epoch summaries are printed
            to stderr either way).
        log_every: steps between training-loss log records (and ``on_train_batch_end``).
        on_nan: ``"stop"`` (default): a non-finite loss or state ends the run
            with :class:`~jaxnet.errors.TrainingDiverged`, naming the first bad
            step and the last (finite) checkpoint; ``"continue"`` trains on.
            Either way, no checkpoint is ever written from a non-finite state.
        handle_signals: on SIGTERM (what schedulers send before killing a job)
            and the first SIGINT (Ctrl-C), finish the current step, write a
            checkpoint (with a ``workdir``), wait until it is durable and raise
            :class:`~jaxnet.errors.Interrupted`; ``resume=True`` continues
            exactly. ``False`` leaves the process's signal handlers alone (for
            applications that embed ``fit`` and handle signals themselves).

    Returns:
        A :class:`FitResult`; ``jaxnet.predict(result, x)`` predicts with it.

    Raises:
        ConfigError: bad sizes, a model that does not fit the data, a workdir
            that holds another run.
        DataError: labels out of range, empty or mismatched splits.
        TrainingDiverged: the loss or the state became non-finite (``on_nan="stop"``).
        Interrupted: SIGTERM or SIGINT stopped the run (``handle_signals=True``).
    """
    fit_data = as_fit_data(data, validation_split=validation_split, validation_data=validation_data, seed=seed)
    user_loss, loss_kind = _user_loss(loss_fn)
    user_metrics, callbacks = _named_metrics(metrics), list(callbacks)
    plan = plan_fit(
        model,
        fit_data,
        epochs=epochs,
        batch_size=batch_size,
        output=output or loss_kind,
        callbacks=callbacks,
        augment=augment,
        scan=scan,
        devices=devices,
    )
    _check_run_args(workdir, resume, fsdp, on_nan)
    config = _run_config(
        config,
        model,
        fit_data,
        plan,
        tx,
        batch_size=batch_size,
        seed=seed,
        epochs=epochs,
        validation_split=validation_split,
        loss_fn=loss_fn,
        metrics=user_metrics,
        precision=precision,
        devices=devices,
        fsdp=fsdp,
        augment=augment,
    )
    with (
        RunFiles(workdir, config, plan, resume=resume, keep_checkpoints=keep_checkpoints) as files,
        CompileCounter() as counter,
        StopSignals(handle_signals) as signals,
    ):
        steps = _build_fit_steps(model, tx, plan, user_loss, user_metrics, seed, devices, fsdp, precision, scan)
        _add_learning_rate_logging(callbacks, tx)
        # Run.workdir is annotated str; fit hands callbacks the workdir as the caller gave it, as it always has.
        run = jcallbacks.Run(steps.graphdef, steps.state, epochs, workdir=cast("str | None", files.workdir))
        loop = FitLoop(
            run,
            steps,
            files,
            callbacks,
            batch_size,
            seed,
            log_every,
            checkpoint_every,
            plan.steps_per_epoch,
            progress,
            signals,
            on_nan,
            bad=jnp.asarray(NO_STEP, jnp.int32),
        )
        first_epoch = loop.restore(files.restore(run.state))
        files.write_model(steps.graphdef, run.state, plan)
        _train_epochs(loop, plan, callbacks, counter, signals, range(first_epoch, epochs), eval_batch_size, scan)
        trained = run.state
        jcallbacks.call(callbacks, "on_fit_end", run, run.history[-1] if run.history else {})
    return finish(
        model,
        loop,
        plan,
        counter,
        replaced=run.state is not trained,
        precision=precision,
        eval_batch_size=eval_batch_size,
    )


def _build_fit_steps(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    plan: _Plan,
    user_loss: Any,
    user_metrics: Mapping[str, MetricFn],
    seed: int,
    devices: int | None,
    fsdp: bool,
    precision: str,
    scan: bool,
) -> FitSteps:
    """The state and the compiled train and eval steps, with the output kind's metrics and the user's."""
    return build_steps(
        model,
        tx,
        output=plan.output,
        transform=plan.transform,
        seed=seed,
        devices=devices,
        fsdp=fsdp,
        precision=precision,
        scan=scan,
        loss_fn=user_loss,
        train_metrics={**default_train_metrics(plan.output), **user_metrics},
        eval_metrics=user_metrics,
    )


def _train_epochs(
    loop: FitLoop,
    plan: _Plan,
    callbacks: Sequence[jcallbacks.Callback],
    counter: CompileCounter,
    signals: StopSignals,
    epochs: range,
    eval_batch_size: int,
    scan: bool,
) -> None:
    """The epochs of the run: train, evaluate, record, checkpoint; until the last, a signal or a callback's stop."""
    run, train_split = loop.run, plan.data.train
    scan_data = jax.device_put((train_split.x, train_split.y)) if scan and isinstance(train_split, Split) else None
    jcallbacks.call(callbacks, "on_fit_start", run)
    for epoch in epochs:
        run.epoch, t0 = epoch, time.perf_counter()
        jcallbacks.call(callbacks, "on_epoch_start", run, epoch)
        train = train_epoch(loop, plan, epoch, scan_data)
        if loop.stopped_mid_epoch is not None:  # SIGTERM/SIGINT: save where we are, then stop
            loop.save(epoch, loop.stopped_mid_epoch)
            loop.stop_for_signal()
        record = epoch_record(loop, plan, epoch, train, t0, eval_batch_size)
        jcallbacks.call(callbacks, "on_epoch_end", run, epoch, record)
        end_epoch(loop, epoch, record)
        loop.compiles_after_first_epoch = loop.compiles_after_first_epoch or counter.snapshot()[1]
        if signals.requested(run.step, every_step=True):
            loop.stop_for_signal()
        if run.stop_training:
            break


def _run_config(
    config: dict[str, Any] | None,
    model: nnx.Module,
    data: FitData,
    plan: _Plan,
    tx: optax.GradientTransformation,
    *,
    loss_fn: Any,
    metrics: Mapping[str, Any],
    **settings: Any,
) -> dict[str, Any]:
    """The config recorded in the workdir: the caller's, or the run's own; plus how to pick the best."""
    if config is None:
        config = default_config(
            model,
            data,
            output=plan.output,
            loss_fn=_describe_fn(loss_fn),
            input_shape=list(np.shape(plan.sample_x)[1:]),
            input_dtype=str(np.asarray(plan.sample_x).dtype),
            metrics=sorted(metrics),
            optimizer=_optimizer_config(tx),
            **settings,
        )
    if plan.best_metric is not None:
        config = {**config, "best_metric": plan.best_metric, "best_mode": plan.best_mode}
    return config


def _check_run_args(workdir: Any, resume: bool | str, fsdp: bool, on_nan: str) -> None:
    if on_nan not in ("stop", "continue"):
        raise ConfigError(f"on_nan must be 'stop' or 'continue'; got {on_nan!r}")
    if fsdp and workdir is not None and jax.process_count() > 1:
        raise ConfigError(
            "checkpoints of an FSDP-sharded state spread over several processes are not supported; "
            "drop --fsdp (data parallel) or --workdir for a multi-process run"
        )
    if resume and workdir is None:
        raise ConfigError("resume needs the workdir of the run to continue (--workdir W --resume)")


def _optimizer_config(tx: optax.GradientTransformation) -> Any:
    from jaxnet import optim

    described = optim.describe(tx)
    return described if described is not None else "an optax transformation (its settings are not recorded)"


def _add_learning_rate_logging(callbacks: list[jcallbacks.Callback], tx: optax.GradientTransformation) -> None:
    """Gives a ``LearningRateLogger`` without a schedule the one ``create_optimizer`` built ``tx`` with."""
    from jaxnet import optim

    for callback in callbacks:
        if isinstance(callback, jcallbacks.LearningRateLogger) and callback.schedule is None:
            callback.schedule = optim.learning_rate_of(tx)
