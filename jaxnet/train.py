"""The training loop: ``fit``, composed of small pure pieces you can call yourself.

``fit`` is the counterpart of the tutorials' ``for epoch in range(n): for x, y
in loader: ...`` loop plus their evaluation block, and of Keras's ``fit`` for
your own model and data. Its body reads top to bottom on one screen; each
piece is a named function: here (one epoch of training, an epoch's record,
the summary), in :mod:`jaxnet.fit_plan` (the argument checks, shared with the
CLI), :mod:`jaxnet.run_files` (the workdir's lock, config, checkpoints and
logs), :mod:`jaxnet.stops` (signals and divergence), :mod:`jaxnet.evaluation`,
or the library (``create_train_state``, ``make_train_step``, ``iterate_batches``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxnet import callbacks as jcallbacks
from jaxnet import data as jdata
from jaxnet.compilation import CompileCounter
from jaxnet.data.inputs import FitData, Split, as_fit_data, batch_arrays
from jaxnet.errors import ConfigError, DataError, Interrupted, TrainingDiverged
from jaxnet.evaluation import evaluate
from jaxnet.fit_plan import (  # noqa: F401 -- public here too: jaxnet.train.check_dataset, ...
    _describe_fn,
    _named_metrics,
    _Plan,
    _user_loss,
    check_dataset,
    default_config,
    make_image_transform,
    model_name,
    plan_fit,
    resolve_output,
    spec_of,
)
from jaxnet.run_files import RunFiles
from jaxnet.state import TrainState, copy_state, count_params, create_train_state
from jaxnet.step import (
    LossFn,
    MetricFn,
    Transform,
    accuracy_for_output,
    loss_for_output,
    make_eval_step,
    make_scan_epoch,
    train_step_fn,
)
from jaxnet.stops import NO_STEP, StopSignals, accumulate, all_finite
from jaxnet.tracking import CURVES_FILE, plot_curves

# The preprocessing each model object was trained with, for jaxnet.predict(model, x).
_PREPROCESSING: weakref.WeakKeyDictionary[nnx.Module, Transform | None] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        graphdef: the model's static graph definition.
        state: the final :class:`~jaxnet.state.TrainState` (the best one with
            ``EarlyStopping(restore_best=True)``).
        history: one dict per epoch: ``train_*``, then ``val_*`` when there is
            a validation split, else ``test_*`` (the tutorials' per-epoch test
            evaluation), plus what callbacks logged.
        summary: the run's final numbers (test metrics, steps, seconds, ...).
        model: the model object passed to ``fit``, now holding ``state``'s weights.
        transform: the on-device preprocessing the run used (``None``: none).
        output: the output kind (``"logits"``, ``"binary"``, ``"regression"``, ...).
    """

    graphdef: nnx.GraphDef
    state: TrainState
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nnx.Module | None = None
    transform: Transform | None = None
    output: str = "logits"

    def predict(self, x: Any, *, batch_size: int = 256) -> np.ndarray:
        """The model's outputs on ``x``, with the run's preprocessing (see :func:`jaxnet.predict`)."""
        from jaxnet.inference import predict

        return predict(self, x, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The compiled functions of a run and where batches go."""

    graphdef: nnx.GraphDef
    state: TrainState
    train: Callable  # train_step(state, batch) -> (state, metrics)
    eval: Callable  # eval_step(state, batch) -> {"outputs", "loss", "metrics"}
    scan: Callable | None  # train_epoch(state, images, labels, idx) -> (state, metrics)
    batch_sharding: Any  # where training batches are placed (None: default device)
    mesh: Any  # the device mesh, or None on one device


def build_steps(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    output: str,
    transform: Transform | None,
    seed: int = 0,
    devices: int | None = None,
    fsdp: bool = False,
    precision: str = "fp32",
    scan: bool = False,
    loss_fn: LossFn | None = None,
    train_metrics: Mapping[str, MetricFn] | None = None,
    eval_metrics: Mapping[str, MetricFn] | None = None,
) -> _Steps:
    """Builds the state and the compiled steps for one device or a data-parallel mesh.

    ``devices`` > 1 (or a multi-process run) splits every batch over a
    ``data`` mesh axis with the state replicated, or sharded with ``fsdp``;
    ``precision`` ``bf16``/``fp16`` computes in that dtype with float32
    parameters, and ``fp16`` adds dynamic loss scaling (``GradScaler``).
    ``loss_fn`` replaces the output kind's loss; ``train_metrics`` are
    computed in the train step (default: accuracy for classifiers),
    ``eval_metrics`` per example at evaluation.
    """
    from jaxnet import precision as jprecision
    from jaxnet.parallel import sharding as jsharding

    policy = jprecision.get_policy(precision)
    loss = loss_fn if loss_fn is not None else loss_for_output(output)
    if precision != "fp32":
        model = jprecision.apply_to_model(model, policy)  # Flax layers compute in the policy's dtype
        transform, _ = jprecision.apply_policy(policy, transform, loss)
        loss = _cast_outputs(loss, policy.output_dtype)
    if policy.needs_loss_scaling:
        tx = jprecision.dynamic_loss_scaling(tx)
    graphdef, state = create_train_state(model, tx, seed=seed)
    if train_metrics is None:
        accuracy = accuracy_for_output(output)
        train_metrics = {"accuracy": accuracy} if accuracy is not None else {}
    kw = dict(transform=transform, metrics=train_metrics)
    step_fn = (jprecision.loss_scaled_train_step_fn if policy.needs_loss_scaling else train_step_fn)(
        graphdef, tx, loss, **kw)
    multi = (devices or 1) > 1 or jax.process_count() > 1
    if not multi:
        return _Steps(graphdef, state, jax.jit(step_fn, donate_argnums=0),
                      make_eval_step(graphdef, loss, transform=transform, metrics=eval_metrics),
                      make_scan_epoch(graphdef, tx, loss, **kw) if scan else None, None, None)
    if scan:
        raise ConfigError("--scan runs on one device; drop --scan or --devices")
    mesh = jsharding.make_mesh(devices if jax.process_count() == 1 else None)
    shardings = jsharding.state_shardings(state, mesh, fsdp=fsdp)
    state = jsharding.shard_state(state, shardings)
    train = jsharding.make_sharded_train_step(graphdef, tx, loss, mesh, shardings, step_fn=step_fn)
    evaluate_step = jsharding.make_sharded_eval_step(graphdef, loss, mesh, shardings, transform=transform,
                                                     metrics=eval_metrics)
    return _Steps(graphdef, state, train, evaluate_step, None, jsharding.batch_sharding(mesh), mesh)


def _cast_outputs(loss: LossFn, dtype: Any) -> LossFn:
    """The loss on outputs cast to ``dtype`` (float32 under mixed precision), batch-taking or not."""
    from jaxnet.step import apply_loss

    def cast(outputs: jax.Array, labels: jax.Array, batch: Any) -> jax.Array:
        return jnp.asarray(apply_loss(loss, outputs.astype(dtype), labels, batch), dtype)

    return cast


@dataclasses.dataclass
class _Loop:
    """The mutable bookkeeping of a running fit (host side)."""

    run: jcallbacks.Run
    steps: _Steps
    files: RunFiles
    callbacks: Sequence[jcallbacks.Callback]
    batch_size: int
    seed: int
    log_every: int
    checkpoint_every: int | None
    steps_per_epoch: int | None
    progress: bool
    signals: StopSignals
    on_nan: str = "stop"
    sums: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_batch: int = 0
    warned_nonfinite: bool = False
    bad: Any = None  # device scalar: the first step with a non-finite loss, or NO_STEP
    stopped_mid_epoch: int | None = None  # batches done when a signal stopped the epoch
    compiles_after_first_epoch: int | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def check_finite(self) -> None:
        """Raises :class:`TrainingDiverged` (``on_nan="stop"``) once a loss was not finite."""
        step = int(self.bad)
        if step == NO_STEP or self.on_nan == "continue":
            if step != NO_STEP and not self.warned_nonfinite:
                self.warned_nonfinite = True
                import logging

                logging.getLogger("jaxnet").warning(
                    "the loss is not finite from step %d on; training goes on (on_nan='continue'), and "
                    "checkpoints of non-finite states are not written", step)
            return
        loss = float(self.sums.get("loss", float("nan")))
        raise TrainingDiverged(step, loss if not np.isfinite(loss) else None, self.files.last_saved)

    def meta(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": self.seed,
                "history": self.run.history, "sums": {k: float(v) for k, v in self.sums.items()},
                "steps_per_epoch": self.steps_per_epoch}

    def after_step(self, metrics: dict[str, Any], i: int, epoch: int, bar: Any, last: bool) -> None:
        """Bookkeeping after one compiled step: sums, logs and callbacks, mid-epoch checkpoints."""
        self.run.step += 1
        if not self.sums:
            self.sums = jax.tree.map(jnp.zeros_like, metrics)
        self.sums, self.bad = accumulate(self.sums, metrics, self.bad, np.int32(self.run.step))
        if (i + 1) % self.log_every == 0:  # the only host syncs inside an epoch
            self.check_finite()
            logs = {"loss": float(metrics["loss"])}
            jcallbacks.call(self.callbacks, "on_train_batch_end", self.run, self.run.step, logs)
            self.files.logger.log(self.run.step, "train", logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if self.checkpoint_every and self.run.step % self.checkpoint_every == 0 and not last:
            self.save(epoch, i + 1)
        self.files.check_saves()
        bar.update(1)

    def save(self, epoch: int, batch_in_epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """A checkpoint of the current state, only ever of a finite one."""
        if self.files.ckpt is None:
            return
        self.check_finite()
        if not bool(all_finite(self.run.state)):
            if self.on_nan == "continue":
                return
            raise TrainingDiverged(self.run.step, None, self.files.last_saved)
        self.files.save(self.run.step, self.run.state, self.meta(epoch, batch_in_epoch), metrics)


def _train_batches(split: Split, batch_size: int, steps: _Steps, *, seed: int, epoch: int,
                   start_batch: int) -> Iterator[Any]:
    """One epoch of training batches from arrays, placed where the step wants them."""
    if jax.process_count() > 1:  # each process reads only its rows of every global batch
        from jaxnet.parallel import multiprocess as distributed

        local = distributed.iterate_process_batches(
            split.x, split.y, batch_size, seed=seed, epoch=epoch, start_batch=start_batch)
        return distributed.global_batches(local, steps.mesh)
    batches = jdata.iterate_batches(split.x, split.y, batch_size, shuffle=True,
                                    seed=seed, epoch=epoch, drop_last=True, start_batch=start_batch)
    return jdata.prefetch_to_device(batches, sharding=steps.batch_sharding)


def _streamed_batches(data: FitData, batch_size: int, steps: _Steps, start_batch: int) -> Iterator[Any]:
    """One epoch of a user's iterable of batches; batches of another size are skipped, and said so."""
    import itertools
    import logging

    skipped = 0

    def fixed() -> Iterator[dict[str, Any]]:
        nonlocal skipped
        for batch in itertools.islice(data.train.make_iterator(), start_batch, None):
            batch = batch_arrays(batch)
            if len(batch["label"]) != batch_size:
                skipped += 1  # another shape would compile the step anew
                continue
            yield batch
        if skipped:
            logging.getLogger("jaxnet").warning(
                "skipped %d training batch(es) whose size is not batch_size=%d (each other size would "
                "recompile the step); make the loader drop its last batch (drop_last=True)", skipped, batch_size)

    return jdata.prefetch_to_device(fixed(), sharding=steps.batch_sharding)


def _dispatch_limiter(steps: _Steps) -> Callable[[Any], None]:
    """Multi-device steps on XLA:CPU deadlock when too many are queued: bound them."""
    if steps.mesh is None:
        return lambda outputs: None
    from jaxnet.parallel.sharding import make_dispatch_limiter

    return make_dispatch_limiter()


def _train_epoch(loop: _Loop, plan: _Plan, epoch: int, scan_data: Any) -> dict[str, float]:
    """One epoch of training, step by step, streamed, or as one ``lax.scan``; returns train_* means."""
    skip = loop.first_batch
    loop.first_batch = 0
    if not skip:
        loop.sums = {}
    bar = tqdm(total=loop.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{loop.run.epochs}",
               disable=None if loop.progress and loop.files.main else True, leave=False)
    steps, run = loop.steps, loop.run
    if scan_data is not None:
        perm = jdata.epoch_permutation(len(plan.data.train), seed=loop.seed, epoch=epoch, shuffle=True)
        idx = perm[: loop.steps_per_epoch * loop.batch_size].reshape(loop.steps_per_epoch, loop.batch_size)
        run.state, per_step = steps.scan(run.state, *scan_data, idx.astype(np.int32))
        run.step += loop.steps_per_epoch
        bar.update(loop.steps_per_epoch)
        loop.sums = {k: jnp.sum(v) for k, v in per_step.items()}
        finite = jnp.isfinite(per_step["loss"])
        first = jnp.argmin(finite) + run.step - loop.steps_per_epoch + 1
        loop.bad = jnp.where((loop.bad == NO_STEP) & ~jnp.all(finite), first, loop.bad)
        count = loop.steps_per_epoch
    else:
        throttle = _dispatch_limiter(steps)
        if plan.data.streamed:
            batches = _streamed_batches(plan.data, loop.batch_size, steps, skip)
        else:
            batches = _train_batches(plan.data.train, loop.batch_size, steps, seed=loop.seed, epoch=epoch,
                                     start_batch=skip)
        count = skip
        for i, batch in enumerate(batches, start=skip):
            run.state, m = steps.train(run.state, batch)
            throttle(m)
            count = i + 1
            last = loop.steps_per_epoch is not None and count >= loop.steps_per_epoch
            loop.after_step(m, i, epoch, bar, last=last)
            if not last and loop.signals.requested(run.step):
                loop.stopped_mid_epoch = count
                break
    bar.close()
    if loop.stopped_mid_epoch is not None:
        return {}
    loop.check_finite()
    if loop.steps_per_epoch is None:  # streamed: an epoch is whatever the iterable yielded
        loop.steps_per_epoch = count
    if count == 0:
        raise DataError("the training data yielded no batch of batch_size examples in this epoch")
    return {k: float(v) / count for k, v in loop.sums.items()}


def _evaluate_split(steps: _Steps, state: TrainState, split: Split, plan: _Plan, batch_size: int) -> dict[str, float]:
    return evaluate(steps.eval, state, split.x, split.y, batch_size=batch_size,
                    num_classes=plan.num_classes, binary=plan.output == "binary")


def _epoch_record(loop: _Loop, plan: _Plan, epoch: int, train: dict[str, float], t0: float,
                  eval_batch_size: int) -> dict[str, Any]:
    """The epoch's record: train_* means, then val_* (or the tutorials' per-epoch test_*)."""
    record: dict[str, Any] = {"epoch": epoch + 1, "step": loop.run.step}
    record.update({f"train_{k}": v for k, v in train.items()})
    if plan.eval_split is not None:
        split = plan.data.validation if plan.eval_split == "val" else plan.data.test
        scores = _evaluate_split(loop.steps, loop.run.state, split, plan, eval_batch_size)
        record.update({f"{plan.eval_split}_{k}": v for k, v in scores.items()})
    record.update(epoch_seconds=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb())
    return record


def _restore_into(loop: _Loop, restored: tuple[TrainState, dict[str, Any]] | None) -> int:
    """Continues exactly where a checkpoint was taken; returns the first epoch to run."""
    if restored is None:
        return 0
    loop.run.state, meta = restored
    loop.run.step = int(loop.run.state.step)
    loop.first_batch = meta["batch_in_epoch"]
    loop.sums = {k: jnp.asarray(v, jnp.float32) for k, v in meta["sums"].items()}
    loop.run.history = list(meta["history"])
    loop.steps_per_epoch = loop.steps_per_epoch or meta.get("steps_per_epoch")
    return meta["epoch"]


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
        output: the model's output kind (:data:`jaxnet.step.OUTPUT_KINDS`);
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
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` compute (float32 parameters).
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
    plan = plan_fit(model, fit_data, epochs=epochs, batch_size=batch_size, output=output or loss_kind,
                    callbacks=callbacks, augment=augment, scan=scan, devices=devices)
    _check_run_args(workdir, resume, fsdp, on_nan)
    config = _run_config(config, model, fit_data, plan, tx, batch_size=batch_size, seed=seed, epochs=epochs,
                         validation_split=validation_split, loss_fn=loss_fn, metrics=user_metrics,
                         precision=precision, devices=devices, fsdp=fsdp, augment=augment)
    with (RunFiles(workdir, config, plan, resume=resume, keep_checkpoints=keep_checkpoints) as files,
          CompileCounter() as counter, StopSignals(handle_signals) as signals):
        steps = build_steps(model, tx, output=plan.output, transform=plan.transform, seed=seed, devices=devices,
                            fsdp=fsdp, precision=precision, scan=scan, loss_fn=user_loss,
                            train_metrics=_train_metrics(plan, user_metrics), eval_metrics=user_metrics)
        _add_learning_rate_logging(callbacks, tx)
        run = jcallbacks.Run(steps.graphdef, steps.state, epochs, workdir=files.workdir)
        loop = _Loop(run, steps, files, callbacks, batch_size, seed, log_every, checkpoint_every,
                     plan.steps_per_epoch, progress, signals, on_nan, bad=jnp.asarray(NO_STEP, jnp.int32))
        first_epoch = _restore_into(loop, files.restore(run.state))
        files.write_model(steps.graphdef, run.state, plan)
        scan_data = jax.device_put((plan.data.train.x, plan.data.train.y)) if scan else None
        jcallbacks.call(callbacks, "on_fit_start", run)
        for epoch in range(first_epoch, epochs):
            run.epoch, t0 = epoch, time.perf_counter()
            jcallbacks.call(callbacks, "on_epoch_start", run, epoch)
            train = _train_epoch(loop, plan, epoch, scan_data)
            if loop.stopped_mid_epoch is not None:  # SIGTERM/SIGINT: save where we are, then stop
                loop.save(epoch, loop.stopped_mid_epoch)
                _stop_for_signal(loop)
            record = _epoch_record(loop, plan, epoch, train, t0, eval_batch_size)
            jcallbacks.call(callbacks, "on_epoch_end", run, epoch, record)
            _end_epoch(loop, epoch, record)
            loop.compiles_after_first_epoch = loop.compiles_after_first_epoch or counter.snapshot()[1]
            if signals.requested(run.step, every_step=True):
                _stop_for_signal(loop)
            if run.stop_training:
                break
        trained = run.state
        jcallbacks.call(callbacks, "on_fit_end", run, run.history[-1] if run.history else {})
    return _finish(model, loop, plan, counter, replaced=run.state is not trained, precision=precision,
                   eval_batch_size=eval_batch_size)


def _run_config(config: dict[str, Any] | None, model: nnx.Module, data: FitData, plan: _Plan,
                tx: optax.GradientTransformation, *, loss_fn: Any, metrics: Mapping[str, Any],
                **settings: Any) -> dict[str, Any]:
    """The config recorded in the workdir: the caller's, or the run's own; plus how to pick the best."""
    if config is None:
        config = default_config(model, data, output=plan.output, loss_fn=_describe_fn(loss_fn),
                                input_shape=list(np.shape(plan.sample_x)[1:]),
                                input_dtype=str(np.asarray(plan.sample_x).dtype),
                                metrics=sorted(metrics), optimizer=_optimizer_config(tx), **settings)
    if plan.best_metric is not None:
        config = {**config, "best_metric": plan.best_metric, "best_mode": plan.best_mode}
    return config


def _train_metrics(plan: _Plan, user_metrics: Mapping[str, MetricFn]) -> dict[str, MetricFn]:
    accuracy = accuracy_for_output(plan.output)
    return {**({"accuracy": accuracy} if accuracy is not None else {}), **user_metrics}


def _end_epoch(loop: _Loop, epoch: int, record: dict[str, Any]) -> None:
    """An epoch's record into the history and the logs, its checkpoint, and its line on stderr."""
    run, files = loop.run, loop.files
    run.history.append(record)
    files.logger.log(run.step, "epoch", record)
    files.logger.histograms(run.step, _param_arrays(_on_host(run.state.params)))
    loop.sums = {}
    loop.save(epoch + 1, 0, _checkpoint_metrics(record))
    if files.main:
        (tqdm.write if loop.progress else print)(_epoch_line(record), file=sys.stderr)


def _finish(model: nnx.Module, loop: _Loop, plan: _Plan, counter: CompileCounter, *, replaced: bool,
            precision: str, eval_batch_size: int) -> FitResult:
    """After the loop: the curves plot, the final scores, the user's model updated, the summary."""
    run, files, steps = loop.run, loop.files, loop.steps
    seconds = time.perf_counter() - loop.started  # saves included: the last one was waited for
    if files.workdir is not None and files.main:
        plot_curves(run.history, os.path.join(files.workdir, CURVES_FILE))
    val, test = _final_scores(loop, plan, eval_batch_size, replaced=replaced)
    _give_back(model, run.state, plan.transform)
    first = loop.compiles_after_first_epoch
    summary = {
        "model": model_name(model), "dataset": plan.data.name, "dataset_source": plan.data.source,
        "epochs": run.epochs, "epochs_run": len(run.history), "steps": run.step, "batch_size": loop.batch_size,
        "output": plan.output, "params": count_params(run.state.params),
        "params_sha256": _params_sha256(_on_host(run.state.params)),
        "train_seconds": round(seconds, 3), "checkpoint_seconds": round(files.blocked, 3),
        "num_devices": 1 if steps.mesh is None else int(steps.mesh.size), "num_processes": jax.process_count(),
        "precision": precision, "mode": "scan" if steps.scan is not None else "step",
        "resumed_from_step": files.resumed_from, "stopped_early": bool(run.stop_training),
        "compilations": counter.compiles,
        "steady_state_compilations": counter.compiles - (first if first is not None else counter.compiles),
        **{f"val_{k}": v for k, v in val.items()},
        "test_accuracy": None, **{f"test_{k}": v for k, v in test.items()},
    }
    return FitResult(graphdef=steps.graphdef, state=run.state, history=run.history, summary=summary,
                     model=model, transform=plan.transform, output=plan.output)


def _stop_for_signal(loop: _Loop) -> None:
    """After the stopping signal's checkpoint: wait until it is durable, then raise Interrupted."""
    loop.files.wait()
    raise Interrupted(loop.signals.name, loop.signals.signum, loop.run.step, loop.files.last_saved)


def _check_run_args(workdir: Any, resume: bool, fsdp: bool, on_nan: str) -> None:
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


def _checkpoint_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    skip = ("epoch", "step", "epoch_seconds", "peak_rss_mb")
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))}


def _last_with_prefix(history: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    if not history:
        return {}
    return {k[len(prefix):]: v for k, v in history[-1].items() if k.startswith(prefix)}


def _final_scores(loop: _Loop, plan: _Plan, eval_batch_size: int, *,
                  replaced: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary's validation and test metrics, of the final state.

    The last epoch's record when it evaluated the final state; evaluated
    anew when a callback replaced the state (``restore_best``). The test
    split is evaluated once, here, when epochs evaluated validation.
    """
    val = {} if replaced else _last_with_prefix(loop.run.history, "val_")
    if replaced and plan.data.validation is not None:
        val = _evaluate_split(loop.steps, loop.run.state, plan.data.validation, plan, eval_batch_size)
    if plan.data.test is None:
        return val, {}
    if plan.eval_split == "test" and not replaced and loop.run.history:
        return val, _last_with_prefix(loop.run.history, "test_")
    return val, _evaluate_split(loop.steps, loop.run.state, plan.data.test, plan, eval_batch_size)


def _give_back(model: nnx.Module, state: TrainState, transform: Transform | None) -> None:
    """The user's model object gets the trained weights (buffers of its own: later donation spares it)."""
    nnx.update(model, copy_state(state.params), copy_state(state.model_state))
    model.eval()
    _PREPROCESSING[model] = transform


def _params_sha256(params: Any) -> str:
    from jaxnet.checkpoint import integrity

    return integrity.params_sha256(params)


def _on_host(tree: Any) -> Any:
    """The whole of ``tree`` readable in this process; a collective when several processes run."""
    if jax.process_count() == 1:
        return tree
    from jaxnet.parallel.multiprocess import gather_to_host

    return gather_to_host(tree)


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _param_arrays(params: nnx.State) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(params)
    return {"/".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in flat}


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return "  ".join(parts)
