"""The training loop: ``fit``, composed of small pure pieces you can call yourself.

``fit`` is the counterpart of the tutorials' ``for epoch in range(n): for x, y
in loader: ...`` loop plus their evaluation block, and of Keras's ``fit`` for
your own model and data. Its body reads top to bottom on one screen; each
piece is a named function here (the argument checks, the run's files, one
epoch of training, evaluation) or a library function (``create_train_state``,
``make_train_step``, ``iterate_batches``, ``evaluate``).
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
from jaxnet import metrics as jmetrics
from jaxnet.compilation import CompileCounter
from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.inputs import FitData, Split, as_fit_data, batch_arrays
from jaxnet.errors import ConfigError, DataError, Interrupted, JaxnetError, TrainingDiverged
from jaxnet.state import TrainState, copy_state, count_params, create_train_state
from jaxnet.step import (
    CLASSIFIER_KINDS,
    OUTPUT_KINDS,
    LossFn,
    MetricFn,
    Transform,
    accuracy_for_output,
    loss_for_output,
    make_eval_step,
    make_scan_epoch,
    train_step_fn,
)
from jaxnet.tracking import CURVES_FILE, METRICS_FILE, MetricsLogger, plot_curves

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


def make_image_transform(
    mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool = False
) -> Transform:
    """On-device preprocessing: ``ToTensor`` + ``Normalize`` (+ crop/flip when training).

    Args:
        mean, std: per-channel statistics in units of pixel/255.
        augment: apply random crop (padding 4) and horizontal flip to
            training batches, the torchvision CIFAR recipe.

    Returns:
        ``transform(key, images, train) -> float32 images``.
    """

    def transform(key: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        if augment and train:
            images = jdata.augment(key, images)
        return jdata.normalize(images, mean, std)

    return transform


def _model_output_shape(model: nnx.Module, x: Any, what: str) -> tuple[int, ...]:
    """The model's output shape on two examples shaped like ``x``'s, without computing anything."""
    sample = jax.ShapeDtypeStruct((2, *tuple(np.shape(x)[1:])), jnp.float32)
    try:
        model.eval()
        return tuple(jax.eval_shape(lambda m, v: m(v), model, sample).shape)
    except Exception as exc:  # any shape error from inside the model's layers
        raise ConfigError(
            f"the model cannot take {what} inputs of shape {tuple(np.shape(x)[1:])}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Use a model made for this data set "
            "(e.g. --model cifar_cnn for cifar10, --model mlp or convnet for mnist)"
        ) from None


def resolve_output(model: nnx.Module, data: FitData, output: str | None, sample_x: Any) -> str:
    """The output kind, checked against the model and the labels (see :data:`jaxnet.step.OUTPUT_KINDS`).

    ``None`` infers it: a registered tutorial model's own kind; otherwise
    float targets mean ``"regression"`` (MSE), integer labels with a model of
    one output ``"binary"``, and with more outputs ``"logits"``.

    Raises:
        ConfigError: a model/data mismatch (classes, shapes, kinds).
        DataError: labels outside the classes.
    """
    if output is not None and output not in OUTPUT_KINDS:
        raise ConfigError(f"unknown output kind {output!r}; expected one of {', '.join(OUTPUT_KINDS)}")
    out_shape = _model_output_shape(model, sample_x, data.name)
    if output is None:
        spec = spec_of(model)
        if spec is not None:
            output = spec.output
        elif data.num_classes is None:
            output = "regression"
        else:
            output = "binary" if out_shape[-1:] == (1,) or len(out_shape) == 1 else "logits"
    classifier = output in CLASSIFIER_KINDS
    if classifier != (data.num_classes is not None):
        kind = "a classification" if classifier else "a regression"
        task = "regression targets (float labels)" if data.num_classes is None else f"{data.num_classes} classes"
        raise ConfigError(
            f"{kind} model cannot train on {data.name}, which has {task}; use a regression model "
            "(--model linear) with --dataset linear, and a classifier with mnist, cifar10 or tfds:NAME"
            " (in Python: integer labels for classifiers, float targets for regression, or pass output=)"
        )
    if output == "binary":
        if data.num_classes > 2:
            raise ConfigError(f"output='binary' needs 0/1 labels; {data.name} has {data.num_classes} classes")
        if out_shape[-1:] != (1,) and len(out_shape) != 1:
            raise ConfigError(f"output='binary' needs one logit per example; the model outputs {out_shape[1:]}")
    elif classifier and out_shape[-1] != data.num_classes and not (
            data.mean is None and out_shape[-1] > data.num_classes):
        raise ConfigError(f"the model outputs {out_shape[-1]} classes but {data.name} has {data.num_classes}")
    return output


def _check_label_range(data: FitData, output: str, num_classes: int) -> None:
    if output not in CLASSIFIER_KINDS:
        return
    for split, part in data.splits().items():
        lo, hi = int(np.min(part.y)), int(np.max(part.y))
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{data.name}: {split} labels range over [{lo}, {hi}] but the data set has "
                f"{num_classes} classes; labels must be integers in [0, {num_classes - 1}]"
            )


def check_dataset(data: ArrayDataset, model: nnx.Module, *, output: str) -> None:
    """Validates an :class:`ArrayDataset` against a model before anything is compiled.

    Raises:
        DataError: labels outside ``[0, num_classes)``, or empty splits.
        ConfigError: images whose shape the model cannot take.
    """
    fit_data = as_fit_data(data)
    output = resolve_output(model, fit_data, output, fit_data.train.x)
    _check_label_range(fit_data, output, data.num_classes)


def _check_sizes(data: FitData, *, epochs: int, batch_size: int, devices: int | None,
                 grad_accum: int = 1) -> int | None:
    """Epoch and batch arguments against the data; returns the steps per epoch (``None``: streamed)."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    if devices and devices > 1:
        from jaxnet.sharding import check_batch_divisible

        check_batch_divisible(batch_size, devices)
    if data.streamed:
        return None
    n = len(data.train)
    if batch_size > n:
        raise ConfigError(f"batch size {batch_size} is larger than the {n} training examples of "
                          f"{data.name}; use --batch-size {n} or less")
    steps = jdata.num_batches(n, batch_size, drop_last=True) // grad_accum
    if steps == 0:
        raise ConfigError(f"{n} training examples make {n // batch_size} batches of {batch_size}, fewer than "
                          f"the {grad_accum} accumulated per step; use a smaller --grad-accum or --batch-size")
    return steps


def _padded_batches(images: Any, labels: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape eval batches: the last one is padded and masked (no recompile)."""
    n = len(labels)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, bool)
        if len(idx) < batch_size:
            mask[len(idx):] = False
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        yield {"image": np.asarray(images[idx]), "label": np.asarray(labels[idx]), "mask": mask}


@jax.jit
def _update_metrics(m: jmetrics.ClassificationMetrics, outputs, labels, loss, mask):
    return jmetrics.metrics_update(m, outputs, labels, loss=loss, mask=mask)


def _binary_scores(outputs: jax.Array) -> jax.Array:
    """One logit ``z`` as two class scores ``(0, z)``: argmax is ``z > 0``, softmax gives sigmoid(z)."""
    z = outputs.reshape(outputs.shape[0], -1)[:, :1]
    return jnp.concatenate([jnp.zeros_like(z), z], axis=1)


def evaluate(
    eval_step: Callable,
    state: TrainState,
    images: Any,
    labels: np.ndarray,
    *,
    batch_size: int = 1000,
    num_classes: int = 10,
    binary: bool = False,
) -> dict[str, float]:
    """Evaluates on a whole split: ``model.eval()`` + ``torch.no_grad()`` + metrics.

    Args:
        eval_step: from :func:`jaxnet.step.make_eval_step`.
        state: the state to evaluate.
        images, labels: the split.
        batch_size: examples per compiled call (the last batch is padded and
            masked, so evaluation compiles once).
        num_classes: classes of the task; 0 for regression (loss only).
        binary: the model outputs one logit per example (``num_classes`` 2).

    Returns:
        ``loss``, the eval step's own ``metrics`` (means over the split) and,
        for classifiers, ``accuracy``, ``top5_accuracy``, precision/recall/F1
        (macro, micro, weighted) and one-vs-rest ``roc_auc`` (omitted when a
        class is missing from ``labels``).
    """
    batch_size = min(batch_size, len(labels))
    m = jmetrics.metrics_init(max(num_classes, 1), k=min(5, max(num_classes, 1)))
    sums: dict[str, jax.Array] = {}
    scores = jmetrics.ScoreCollector()
    for batch in jdata.prefetch_to_device(_padded_batches(images, labels, batch_size)):
        result = eval_step(state, batch)
        per_example = {"loss": result["loss"], **result.get("metrics", {})}
        for name, values in per_example.items():
            total = jnp.sum(jnp.where(batch["mask"], values, 0.0))
            sums[name] = total if name not in sums else sums[name] + total
        if num_classes:
            outputs = _binary_scores(result["outputs"]) if binary else result["outputs"]
            m = _update_metrics(m, outputs, batch["label"], result["loss"], batch["mask"])
            scores.add(outputs, batch["label"], batch["mask"])
    means = {name: float(total) / len(labels) for name, total in sums.items()}
    if not num_classes:
        return means
    metrics = {**jmetrics.metrics_compute(m), **{k: v for k, v in means.items() if k != "loss"}}
    outputs, true = scores.arrays()
    probs = np.exp(outputs - outputs.max(axis=1, keepdims=True))  # softmax; also right for log-probs
    probs /= probs.sum(axis=1, keepdims=True)
    try:
        metrics["roc_auc"] = jmetrics.roc_auc_ovr(probs, true)
    except JaxnetError:  # a class absent from this split: AUC undefined, as in scikit-learn
        pass
    return metrics


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
    from jaxnet import sharding as jsharding

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


def _named_metrics(metrics: Any) -> dict[str, MetricFn]:
    """``metrics=``: a dict ``name -> fn`` or a list of functions (named by ``__name__``)."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        named = dict(metrics)
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        named = {getattr(fn, "__name__", f"metric_{i}"): fn for i, fn in enumerate(metrics)}
    else:
        raise ConfigError(f"metrics must be a dict of name -> fn(outputs, labels) or a list of functions; "
                          f"got a {type(metrics).__name__}")
    for name, fn in named.items():
        if not callable(fn) or not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"metric {name!r} must be a callable with an identifier name; got {fn!r}")
        if name in ("loss", "accuracy"):
            raise ConfigError(f"metric name {name!r} is built in; name yours differently")
    return named


def _user_loss(loss_fn: Any) -> tuple[LossFn | None, str | None]:
    """``loss_fn=``: a callable, or an output kind's name (``"huber"``); returns (loss, kind)."""
    if loss_fn is None:
        return None, None
    if isinstance(loss_fn, str):
        aliases = {"cross_entropy": "logits", "nll": "log_probs", "bce": "binary", "mse": "regression"}
        kind = aliases.get(loss_fn, loss_fn)
        if kind not in OUTPUT_KINDS:
            raise ConfigError(f"unknown loss {loss_fn!r}; choose one of "
                              f"{', '.join(sorted(set(aliases) | set(OUTPUT_KINDS)))} or pass a function")
        return None, kind
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function (outputs, labels[, batch]) -> scalar; got {loss_fn!r}")
    return loss_fn, None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything fit decided before compiling: checked once, used by the loop."""

    data: FitData
    output: str
    num_classes: int  # 0 for regression kinds; 2 for binary
    transform: Transform | None
    steps_per_epoch: int | None  # None: streamed batches (known after the first epoch)
    eval_split: str | None  # "val", "test" or None: what each epoch evaluates
    best_metric: str | None
    best_mode: str
    keep_best: int
    sample_x: Any


def _input_transform(data: FitData, sample_x: Any, augment: bool) -> Transform | None:
    """``ToTensor`` (+ ``Normalize``) for pixels; other inputs are used as they are."""
    if data.mean is not None:
        return make_image_transform(data.mean, data.std, augment=augment)
    if np.asarray(sample_x).dtype == np.uint8:
        channels = np.shape(sample_x)[-1]
        return make_image_transform((0.0,) * channels, (1.0,) * channels, augment=augment)
    if augment:
        raise ConfigError("augment=True (random crop and flip) needs uint8 images; the inputs are "
                          f"{np.asarray(sample_x).dtype}")
    return None


def _first_batch(data: FitData) -> dict[str, Any]:
    try:
        return batch_arrays(next(iter(data.train.make_iterator())))
    except StopIteration:
        raise DataError("the training data yields no batches") from None


def plan_fit(model: nnx.Module, data: FitData, *, epochs: int, batch_size: int, output: str | None,
             callbacks: Sequence[jcallbacks.Callback], augment: bool = False, scan: bool = False,
             devices: int | None = None, grad_accum: int = 1) -> _Plan:
    """fit's argument checks in one place (the CLI calls it too), before anything is compiled."""
    steps_per_epoch = _check_sizes(data, epochs=epochs, batch_size=batch_size, devices=devices,
                                   grad_accum=grad_accum)
    if data.streamed:
        if scan or jax.process_count() > 1:
            raise ConfigError("training from an iterable of batches runs step by step in one process; "
                              "pass arrays for scan=True or a multi-process run")
        first = _first_batch(data)
        sample_x = np.asarray(first["image"][:2])
        if data.num_classes is None and np.issubdtype(np.asarray(first["label"]).dtype, np.integer):
            width = _model_output_shape(model, sample_x, data.name)[-1]  # classes: the model's outputs
            data = dataclasses.replace(data, num_classes=2 if width == 1 else width)
    else:
        sample_x = np.asarray(data.train.x[np.arange(min(2, len(data.train)))])
        if scan and not isinstance(data.train.x, np.ndarray):
            raise ConfigError("scan=True keeps the training split on the device; it needs in-memory arrays")
    output = resolve_output(model, data, output, sample_x)
    num_classes = 2 if output == "binary" else (data.num_classes or 0)
    if output in CLASSIFIER_KINDS and output != "binary":
        num_classes = max(num_classes, _model_output_shape(model, sample_x, data.name)[-1])
    _check_label_range(data, output, num_classes)
    eval_split = "val" if data.validation is not None else ("test" if data.test is not None else None)
    best = next((c for c in callbacks if isinstance(c, jcallbacks.BestCheckpoints)), None)
    if best is not None:
        best_metric, best_mode, keep_best = best.monitor, best.mode, best.keep
    elif eval_split == "val":  # never select by the test split
        best_metric = "val_accuracy" if output in CLASSIFIER_KINDS else "val_loss"
        best_mode, keep_best = ("max" if output in CLASSIFIER_KINDS else "min"), 1
    else:
        best_metric, best_mode, keep_best = None, "max", 1
    return _Plan(data, output, num_classes, _input_transform(data, sample_x, augment), steps_per_epoch,
                 eval_split, best_metric, best_mode, keep_best, sample_x)


def spec_of(model: nnx.Module) -> Any:
    """The registry entry (``jaxnet.models.MODELS``) of a tutorial model's class, or ``None``."""
    from jaxnet.models import MODELS

    return next((spec for spec in MODELS.values() if type(model) is spec.cls), None)


def model_name(model: nnx.Module) -> str:
    """A tutorial model's registry name (``"mlp"``), else ``"module:QualifiedClassName"``."""
    spec = spec_of(model)
    return spec.name if spec is not None else f"{type(model).__module__}:{type(model).__qualname__}"


def default_config(model: nnx.Module, data: Any, *, batch_size: int, seed: int, epochs: int,
                   **settings: Any) -> dict[str, Any]:
    """What identifies a run in its workdir when the caller gives no ``config``.

    ``settings`` adds the run's other choices (optimizer, precision, ...); a
    resumed run must match every key but the resumable ones.
    """
    data = data if isinstance(data, FitData) else as_fit_data(data)
    config = {"model": model_name(model), "dataset": data.name, "batch_size": batch_size, "seed": seed,
              "epochs": epochs}
    if data.mean is not None:
        config.update(mean=list(data.mean), std=list(data.std))
    config.update(settings)
    return config


def _describe_fn(fn: Any) -> str | None:
    if fn is None or isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


class _RunFiles:
    """A run's workdir as one object: config check, checkpoints, logs, the curves plot.

    Used as a context manager by :func:`fit`; with ``workdir=None`` every
    method does nothing (and ``restore`` returns ``None``).
    """

    def __init__(self, workdir: str | os.PathLike | None, config: dict[str, Any], plan: _Plan, *,
                 resume: bool | str, keep_checkpoints: int):
        self.workdir, self.resume, self.blocked = workdir, resume, 0.0
        self._config, self._plan, self._keep = config, plan, keep_checkpoints
        self.last_saved: int | None = None  # the newest checkpoint step of this run (restored or written)
        self.resumed_from: int | None = None
        self.main = jax.process_index() == 0
        self.ckpt, self.logger, self.lock = None, None, None

    def _open(self) -> None:
        """One writer per workdir (the lock first), then the config check, a write probe, the checkpoints."""
        from jaxnet import checkpoint as ckpt_lib
        from jaxnet import workdir as workdir_lib
        from jaxnet.lock import WorkdirLock

        if self.workdir is None:
            return
        if self.main:  # config.json, the lock and the probe are process 0's
            if self.resume is True and not os.path.isdir(self.workdir):
                workdir_lib.check_workdir(self.workdir, self._config, resume=True)  # "does not exist"
            self.lock = WorkdirLock(self.workdir).acquire()
            workdir_lib.check_workdir(self.workdir, self._config, resume=self.resume,
                                      mutable_keys=workdir_lib.RESUMABLE_KEYS)
            ckpt_lib.probe_writable(workdir_lib.checkpoint_directory(self.workdir))
        plan = self._plan
        self.ckpt = ckpt_lib.create_checkpoint_manager(
            workdir_lib.checkpoint_directory(self.workdir), max_to_keep=self._keep,
            best_metric=plan.best_metric, best_mode=plan.best_mode, keep_best=plan.keep_best)

    def restore(self, state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        from jaxnet import checkpoint as ckpt_lib
        from jaxnet import workdir as workdir_lib

        restored = ckpt_lib.restore_latest_good(self.ckpt, state) if self.resume else None
        step = int(restored[0].step) if restored is not None else None
        self.last_saved = self.resumed_from = step
        if restored is not None and self.main:
            workdir_lib.rewind_jsonl(os.path.join(self.workdir, METRICS_FILE), step)
        self.logger = MetricsLogger(self.workdir if self.main else None,
                                    purge_step=step + 1 if step is not None else None)
        return restored

    def write_model(self, graphdef: nnx.GraphDef, state: TrainState, plan: _Plan) -> None:
        """Records how to rebuild the model's forward pass, so that ``jaxnet export`` works for any model."""
        from jaxnet import export as export_lib

        write = getattr(export_lib, "write_workdir_model", None)
        if self.workdir is None or not self.main or write is None:
            return
        write(self.workdir, graphdef, state.params, state.model_state,
              input_shape=tuple(np.shape(plan.sample_x)[1:]), input_dtype=np.asarray(plan.sample_x).dtype,
              transform=plan.transform, output=plan.output)

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

    def __enter__(self) -> _RunFiles:
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.logger is not None:
                self.logger.close()
            if self.ckpt is not None:
                from jaxnet import checkpoint as ckpt_lib

                t = time.perf_counter()
                ckpt_lib.close(self.ckpt)  # waits for the last asynchronous save
                self.blocked += time.perf_counter() - t
        finally:
            if self.lock is not None:
                self.lock.release()


NO_STEP = np.iinfo(np.int32).max  # "no non-finite step yet"


@jax.jit
def _accumulate(sums: dict[str, jax.Array], metrics: dict[str, jax.Array], bad: jax.Array,
                step: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """Running sums of the step's metrics, and the first step whose loss was not finite (one dispatch)."""
    sums = jax.tree.map(jnp.add, sums, metrics)
    bad = jnp.where((bad == NO_STEP) & ~jnp.isfinite(metrics["loss"]), step, bad)
    return sums, bad


def _floats(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]


@jax.jit
def _all_finite(state: TrainState) -> jax.Array:
    """Whether a state may be checkpointed: finite weights, no NaN in the optimizer state.

    An optimizer state may hold inf on purpose (``optax.contrib.reduce_on_plateau``'s
    best loss, a line search's initial value), so only NaN counts there.
    """
    ok = [jnp.all(jnp.isfinite(x)) for x in _floats((state.params, state.model_state))]
    ok += [~jnp.any(jnp.isnan(x)) for x in _floats(state.opt_state)]
    return jnp.all(jnp.asarray(ok or [True]))


class _StopSignals:
    """SIGTERM and the first SIGINT ask the loop to stop after the current step (a context manager).

    Schedulers (SLURM, Kubernetes, cloud preemption) send SIGTERM and wait a
    grace period: the loop finishes its step, saves a checkpoint and waits
    for it to be durable, then :func:`fit` raises :class:`~jaxnet.errors.Interrupted`.
    Further signals while that happens are noted, not obeyed. Handlers are
    installed only from the main thread, and the previous ones put back.
    """

    def __init__(self, enabled: bool):
        self.enabled, self.signum, self._previous = enabled, None, {}

    def _handler(self, signum: int, frame: Any) -> None:
        import signal

        if self.signum is None:
            self.signum = signum
            return
        print(f"jaxnet: {signal.Signals(signum).name} again: already stopping after the current step and "
              "its checkpoint; send SIGKILL to abandon them", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopSignals:
        import signal
        import threading

        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int, *, every_step: bool = False) -> bool:
        """Whether to stop now; processes of a multi-process run agree (every 10 steps, or now)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if step % 10 and not every_step:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self.signum or 0], np.int32))
        if self.signum is None and np.any(flags):
            self.signum = int(np.max(flags))
        return bool(np.any(flags))

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name


@dataclasses.dataclass
class _Loop:
    """The mutable bookkeeping of a running fit (host side)."""

    run: jcallbacks.Run
    steps: _Steps
    files: _RunFiles
    callbacks: Sequence[jcallbacks.Callback]
    batch_size: int
    seed: int
    log_every: int
    checkpoint_every: int | None
    steps_per_epoch: int | None
    progress: bool
    signals: _StopSignals
    on_nan: str = "stop"
    sums: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_batch: int = 0
    bad: Any = None  # device scalar: the first step with a non-finite loss, or NO_STEP
    stopped_mid_epoch: int | None = None  # batches done when a signal stopped the epoch
    compiles_after_first_epoch: int | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def check_finite(self) -> None:
        """Raises :class:`TrainingDiverged` (``on_nan="stop"``) once a loss was not finite."""
        step = int(self.bad)
        if step == NO_STEP or self.on_nan == "continue":
            if step != NO_STEP and not getattr(self, "_warned", False):
                self._warned = True
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
        self.sums, self.bad = _accumulate(self.sums, metrics, self.bad, np.int32(self.run.step))
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
        if not bool(_all_finite(self.run.state)):
            if self.on_nan == "continue":
                return
            raise TrainingDiverged(self.run.step, None, self.files.last_saved)
        self.files.save(self.run.step, self.run.state, self.meta(epoch, batch_in_epoch), metrics)


def _train_batches(split: Split, batch_size: int, steps: _Steps, *, seed: int, epoch: int,
                   start_batch: int) -> Iterator[Any]:
    """One epoch of training batches from arrays, placed where the step wants them."""
    if jax.process_count() > 1:  # each process reads only its rows of every global batch
        from jaxnet import distributed

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
    from jaxnet.sharding import make_dispatch_limiter

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
    with (_RunFiles(workdir, config, plan, resume=resume, keep_checkpoints=keep_checkpoints) as files,
          CompileCounter() as counter, _StopSignals(handle_signals) as signals):
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
    from jaxnet import integrity

    return integrity.params_sha256(params)


def _on_host(tree: Any) -> Any:
    """The whole of ``tree`` readable in this process; a collective when several processes run."""
    if jax.process_count() == 1:
        return tree
    from jaxnet.distributed import gather_to_host

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
