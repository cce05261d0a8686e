"""fit's decisions before anything is compiled: the output kind, the checks, the preprocessing.

:func:`plan_fit` is the one place where a run's arguments are checked against
the model and the data; :func:`jaxnet.fit` and ``jaxnet train`` both call it,
so a mistake gets the same one-line error from Python and the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet import callbacks as jcallbacks
from jaxnet import data as jdata
from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.inputs import BatchStream, FitData, as_fit_data, batch_arrays
from jaxnet.data.transforms import make_image_transform
from jaxnet.errors import ConfigError, DataError
from jaxnet.outputs import CLASSIFIER_KINDS, LOSSES, OUTPUT_KINDS
from jaxnet.step import LossFn, MetricFn, Transform


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


def resolve_output(
    model: nnx.Module, data: FitData, output: str | None, sample_x: Any, out_shape: tuple[int, ...] | None = None
) -> str:
    """The output kind, checked against the model and the labels (see :data:`jaxnet.outputs.OUTPUT_KINDS`).

    ``None`` infers it: a registered tutorial model's own kind; otherwise
    float targets mean ``"regression"`` (MSE), integer labels with a model of
    one output ``"binary"``, and with more outputs ``"logits"``.

    Raises:
        ConfigError: a model/data mismatch (classes, shapes, kinds).
        DataError: labels outside the classes.
    """
    if output is not None and output not in OUTPUT_KINDS:
        raise ConfigError(f"unknown output kind {output!r}; expected one of {', '.join(OUTPUT_KINDS)}")
    if out_shape is None:
        out_shape = _model_output_shape(model, sample_x, data.name)
    if output is None:
        spec = spec_of(model)
        if spec is not None:
            output = spec.output
        elif data.num_classes is None:
            output = "regression"
        else:
            output = "binary" if out_shape[-1:] == (1,) or len(out_shape) == 1 else "logits"
    classifier, num_classes = output in CLASSIFIER_KINDS, data.num_classes
    if classifier != (num_classes is not None):
        kind = "a classification" if classifier else "a regression"
        task = "regression targets (float labels)" if num_classes is None else f"{num_classes} classes"
        raise ConfigError(
            f"{kind} model cannot train on {data.name}, which has {task}; use a regression model "
            "(--model linear) with --dataset linear, and a classifier with mnist, cifar10 or tfds:NAME"
            " (in Python: integer labels for classifiers, float targets for regression, or pass output=)"
        )
    if num_classes is None:  # a regression kind: no classes to check the outputs against
        return output
    if output == "binary":
        if num_classes > 2:
            raise ConfigError(f"output='binary' needs 0/1 labels; {data.name} has {num_classes} classes")
        if out_shape[-1:] != (1,) and len(out_shape) != 1:
            raise ConfigError(f"output='binary' needs one logit per example; the model outputs {out_shape[1:]}")
    elif out_shape[-1] != num_classes and not (data.mean is None and out_shape[-1] > num_classes):
        raise ConfigError(f"the model outputs {out_shape[-1]} classes but {data.name} has {num_classes}")
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
    output = resolve_output(model, fit_data, output, fit_data.train_split.x)
    _check_label_range(fit_data, output, data.num_classes)


def _check_sizes(
    data: FitData, *, epochs: int, batch_size: int, devices: int | None, grad_accum: int = 1
) -> int | None:
    """Epoch and batch arguments against the data; returns the steps per epoch (``None``: streamed)."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    if devices and devices > 1:
        from jaxnet.parallel.sharding import check_batch_divisible

        check_batch_divisible(batch_size, devices)
    if isinstance(data.train, BatchStream):
        return None
    n = len(data.train)
    if batch_size > n:
        raise ConfigError(
            f"batch size {batch_size} is larger than the {n} training examples of "
            f"{data.name}; use --batch-size {n} or less"
        )
    steps = jdata.num_batches(n, batch_size, drop_last=True) // grad_accum
    if steps == 0:
        raise ConfigError(
            f"{n} training examples make {n // batch_size} batches of {batch_size}, fewer than "
            f"the {grad_accum} accumulated per step; use a smaller --grad-accum or --batch-size"
        )
    return steps


def _named_metrics(metrics: Any) -> dict[str, MetricFn]:
    """``metrics=``: a dict ``name -> fn`` or a list of functions (named by ``__name__``)."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        named = dict(metrics)
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        named = {getattr(fn, "__name__", f"metric_{i}"): fn for i, fn in enumerate(metrics)}
    else:
        raise ConfigError(
            f"metrics must be a dict of name -> fn(outputs, labels) or a list of functions; "
            f"got a {type(metrics).__name__}"
        )
    for name, fn in named.items():
        if not callable(fn) or not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"metric {name!r} must be a callable with an identifier name; got {fn!r}")
        if name in ("loss", "accuracy"):
            raise ConfigError(f"metric name {name!r} is built in; name yours differently")
    return named


def _user_loss(loss_fn: Any) -> tuple[LossFn | None, str | None]:
    """``loss_fn=``: a callable, or a loss's name (:data:`jaxnet.outputs.LOSSES`, ``"huber"``); returns (loss, kind).

    An output kind's own name (``"logits"``) and torch's ``"bce"`` name the same losses.
    """
    if loss_fn is None:
        return None, None
    if isinstance(loss_fn, str):
        names = {**{kind: kind for kind in OUTPUT_KINDS}, **LOSSES, "bce": "binary"}
        if loss_fn not in names:
            raise ConfigError(f"unknown loss {loss_fn!r}; choose one of {', '.join(sorted(names))} or pass a function")
        return None, names[loss_fn]
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
    if data.mean is not None and data.std is not None:  # FitData holds both or neither
        return make_image_transform(data.mean, data.std, augment=augment)
    if np.asarray(sample_x).dtype == np.uint8:
        channels = np.shape(sample_x)[-1]
        return make_image_transform((0.0,) * channels, (1.0,) * channels, augment=augment)
    if augment:
        raise ConfigError(
            f"augment=True (random crop and flip) needs uint8 images; the inputs are {np.asarray(sample_x).dtype}"
        )
    return None


def _first_batch(stream: BatchStream) -> dict[str, Any]:
    try:
        return batch_arrays(next(iter(stream.make_iterator())))
    except StopIteration:
        raise DataError("the training data yields no batches") from None


def plan_fit(
    model: nnx.Module,
    data: FitData,
    *,
    epochs: int,
    batch_size: int,
    output: str | None,
    callbacks: Sequence[jcallbacks.Callback],
    augment: bool = False,
    scan: bool = False,
    devices: int | None = None,
    grad_accum: int = 1,
) -> _Plan:
    """fit's argument checks in one place (the CLI calls it too), before anything is compiled."""
    steps_per_epoch = _check_sizes(data, epochs=epochs, batch_size=batch_size, devices=devices, grad_accum=grad_accum)
    train = data.train
    if isinstance(train, BatchStream):
        if scan or jax.process_count() > 1:
            raise ConfigError(
                "training from an iterable of batches runs step by step in one process; "
                "pass arrays for scan=True or a multi-process run"
            )
        first = _first_batch(train)
        sample_x = np.asarray(first["image"][:2])
    else:
        sample_x = np.asarray(train.x[np.arange(min(2, len(train)))])
        if scan and not isinstance(train.x, np.ndarray):
            raise ConfigError("scan=True keeps the training split on the device; it needs in-memory arrays")
    out_shape = _model_output_shape(model, sample_x, data.name)  # traced once, shapes only
    if data.streamed and data.num_classes is None and np.issubdtype(np.asarray(first["label"]).dtype, np.integer):
        width = out_shape[-1]  # classes of streamed integer labels: the model's outputs
        data = dataclasses.replace(data, num_classes=2 if width == 1 else width)
    output = resolve_output(model, data, output, sample_x, out_shape)
    num_classes = 2 if output == "binary" else (data.num_classes or 0)
    if output in CLASSIFIER_KINDS and output != "binary":
        num_classes = max(num_classes, out_shape[-1])
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
    return _Plan(
        data,
        output,
        num_classes,
        _input_transform(data, sample_x, augment),
        steps_per_epoch,
        eval_split,
        best_metric,
        best_mode,
        keep_best,
        sample_x,
    )


def spec_of(model: nnx.Module) -> Any:
    """The registry entry (``jaxnet.models.MODELS``) of a tutorial model's class, or ``None``."""
    from jaxnet.models import MODELS

    return next((spec for spec in MODELS.values() if type(model) is spec.cls), None)


def model_name(model: nnx.Module) -> str:
    """A tutorial model's registry name (``"mlp"``), else ``"module:QualifiedClassName"``."""
    spec = spec_of(model)
    return spec.name if spec is not None else f"{type(model).__module__}:{type(model).__qualname__}"


def default_config(
    model: nnx.Module, data: Any, *, batch_size: int, seed: int, epochs: int, **settings: Any
) -> dict[str, Any]:
    """What identifies a run in its workdir when the caller gives no ``config``.

    ``settings`` adds the run's other choices (optimizer, precision, ...); a
    resumed run must match every key but the resumable ones.
    """
    data = data if isinstance(data, FitData) else as_fit_data(data)
    config = {
        "model": model_name(model),
        "dataset": data.name,
        "batch_size": batch_size,
        "seed": seed,
        "epochs": epochs,
    }
    if data.mean is not None:
        config.update(mean=list(data.mean), std=list(data.std))
    config.update(settings)
    return config


def _describe_fn(fn: Any) -> str | None:
    if fn is None or isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
