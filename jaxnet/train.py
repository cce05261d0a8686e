"""The training loop: a short ``fit`` composed of the pure pieces.

``fit`` is the counterpart of the tutorials' ``for epoch in range(n): for
x, y in loader: ...`` loop plus their evaluation block. It stays readable on
one screen; everything it does is a library function you can call yourself
(``create_train_state``, ``make_train_step``, ``iterate_batches``,
``evaluate``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxnet import data as jdata
from jaxnet import metrics as jmetrics
from jaxnet.compilation import CompileCounter
from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError, DataError, JaxnetError
from jaxnet.state import TrainState, count_params, create_train_state
from jaxnet.step import (
    Transform,
    loss_for_output,
    make_eval_step,
    make_scan_epoch,
    train_step_fn,
)
from jaxnet.tracking import CURVES_FILE, METRICS_FILE, MetricsLogger, plot_curves


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        graphdef: the model's static graph definition.
        state: the final :class:`~jaxnet.state.TrainState`.
        history: one dict per epoch (train and test metrics, seconds).
        summary: the run's final numbers (test accuracy, steps, seconds, ...).
    """

    graphdef: nnx.GraphDef
    state: TrainState
    history: list[dict[str, Any]]
    summary: dict[str, Any]


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


def check_dataset(data: ArrayDataset, model: nnx.Module, *, output: str) -> None:
    """Validates a data set against a model before anything is compiled.

    Raises:
        DataError: labels outside ``[0, num_classes)``, or empty splits.
        ConfigError: images whose shape the model cannot take.
    """
    if (output == "regression") != (data.num_classes == 0):
        kind = "a regression" if output == "regression" else "a classification"
        task = "regression targets" if data.num_classes == 0 else f"{data.num_classes} classes"
        raise ConfigError(
            f"{kind} model cannot train on {data.name}, which has {task}; use a regression model "
            "(--model linear) with --dataset linear, and a classifier with mnist, cifar10 or tfds:NAME"
        )
    for split, labels in (("train", data.train_labels), ("test", data.test_labels)):
        if len(labels) == 0:
            raise DataError(f"{data.name}: the {split} split is empty ({data.source})")
        if output != "regression":
            lo, hi = int(np.min(labels)), int(np.max(labels))
            if lo < 0 or hi >= data.num_classes:
                raise DataError(
                    f"{data.name}: {split} labels range over [{lo}, {hi}] but the data set has "
                    f"{data.num_classes} classes; labels must be integers in [0, {data.num_classes - 1}]"
                )
    sample = jax.ShapeDtypeStruct((2, *data.image_shape), jnp.float32)
    try:
        model.eval()
        out = jax.eval_shape(lambda m, x: m(x), model, sample)
    except Exception as exc:  # any shape error from inside the model's layers
        raise ConfigError(
            f"the model cannot take {data.name} inputs of shape {data.image_shape}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Use a model made for this data set "
            "(e.g. --model cifar_cnn for cifar10, --model mlp or convnet for mnist)"
        ) from None
    if output != "regression" and out.shape[-1] != data.num_classes:
        raise ConfigError(
            f"the model outputs {out.shape[-1]} classes but {data.name} has {data.num_classes}"
        )


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


def evaluate(
    eval_step: Callable,
    state: TrainState,
    images: Any,
    labels: np.ndarray,
    *,
    batch_size: int = 1000,
    num_classes: int = 10,
) -> dict[str, float]:
    """Evaluates on a whole split: ``model.eval()`` + ``torch.no_grad()`` + metrics.

    Args:
        eval_step: from :func:`jaxnet.step.make_eval_step`.
        state: the state to evaluate.
        images, labels: the split.
        batch_size: examples per compiled call (the last batch is padded and
            masked, so evaluation compiles once).
        num_classes: classes of the task; 0 for regression (loss only).

    Returns:
        ``loss`` and, for classifiers, ``accuracy``, ``top5_accuracy``,
        precision/recall/F1 (macro, micro, weighted) and one-vs-rest
        ``roc_auc`` (omitted when a class is missing from ``labels``).
    """
    batch_size = min(batch_size, len(labels))
    m = jmetrics.metrics_init(max(num_classes, 1), k=min(5, max(num_classes, 1)))
    loss_sum, scores = jnp.zeros((), jnp.float32), jmetrics.ScoreCollector()
    for batch in jdata.prefetch_to_device(_padded_batches(images, labels, batch_size)):
        result = eval_step(state, batch)
        if num_classes:
            m = _update_metrics(m, result["outputs"], batch["label"], result["loss"], batch["mask"])
            scores.add(result["outputs"], batch["label"], batch["mask"])
        else:
            loss_sum = loss_sum + jnp.sum(jnp.where(batch["mask"], result["loss"], 0.0))
    if not num_classes:
        return {"loss": float(loss_sum) / len(labels)}
    metrics = jmetrics.metrics_compute(m)
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
    eval: Callable  # eval_step(state, batch) -> {"outputs", "loss"}
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
) -> _Steps:
    """Builds the state and the compiled steps for one device or a data-parallel mesh.

    ``devices`` > 1 (or a multi-process run) splits every batch over a
    ``data`` mesh axis with the state replicated, or sharded with ``fsdp``;
    ``precision`` ``bf16``/``fp16`` computes in that dtype with float32
    parameters, and ``fp16`` adds dynamic loss scaling (``GradScaler``).
    """
    from jaxnet import precision as jprecision
    from jaxnet import sharding as jsharding

    policy = jprecision.get_policy(precision)
    loss_fn = loss_for_output(output)
    if precision != "fp32":
        transform, loss_fn = jprecision.apply_policy(policy, transform, loss_fn)
    if policy.needs_loss_scaling:
        tx = jprecision.dynamic_loss_scaling(tx)
    graphdef, state = create_train_state(model, tx, seed=seed)
    kw = dict(transform=transform, classification=output != "regression")
    step_fn = (jprecision.loss_scaled_train_step_fn if policy.needs_loss_scaling else train_step_fn)(
        graphdef, tx, loss_fn, **kw)
    multi = (devices or 1) > 1 or jax.process_count() > 1
    if not multi:
        return _Steps(graphdef, state, jax.jit(step_fn, donate_argnums=0),
                      make_eval_step(graphdef, loss_fn, transform=transform),
                      make_scan_epoch(graphdef, tx, loss_fn, **kw) if scan else None, None, None)
    if scan:
        raise ConfigError("--scan runs on one device; drop --scan or --devices")
    mesh = jsharding.make_mesh(devices if jax.process_count() == 1 else None)
    shardings = jsharding.state_shardings(state, mesh, fsdp=fsdp)
    state = jsharding.shard_state(state, shardings)
    train = jsharding.make_sharded_train_step(graphdef, tx, loss_fn, mesh, shardings, step_fn=step_fn)
    evaluate_step = jsharding.make_sharded_eval_step(graphdef, loss_fn, mesh, shardings, transform=transform)
    return _Steps(graphdef, state, train, evaluate_step, None, jsharding.batch_sharding(mesh), mesh)


def _train_batches(data: ArrayDataset, batch_size: int, steps: _Steps, *, seed: int, epoch: int,
                   start_batch: int) -> Iterator[Any]:
    """One epoch of training batches, placed where the step wants them."""
    if jax.process_count() > 1:  # each process reads only its rows of every global batch
        from jaxnet import distributed

        local = distributed.iterate_process_batches(
            data.train_images, data.train_labels, batch_size, seed=seed, epoch=epoch, start_batch=start_batch)
        return distributed.global_batches(local, steps.mesh)
    batches = jdata.iterate_batches(data.train_images, data.train_labels, batch_size, shuffle=True,
                                    seed=seed, epoch=epoch, drop_last=True, start_batch=start_batch)
    return jdata.prefetch_to_device(batches, sharding=steps.batch_sharding)


def _dispatch_limiter(steps: _Steps) -> Callable[[Any], None]:
    """Multi-device steps on XLA:CPU deadlock when too many are queued: bound them."""
    if steps.mesh is None:
        return lambda outputs: None
    from jaxnet.sharding import make_dispatch_limiter

    return make_dispatch_limiter()


def default_config(model: nnx.Module, data: ArrayDataset, *, batch_size: int, seed: int,
                   epochs: int) -> dict[str, Any]:
    """What identifies a run in its workdir when the caller gives no ``config``."""
    return {"model": type(model).__name__, "dataset": data.name, "batch_size": batch_size,
            "seed": seed, "epochs": epochs, "mean": list(data.mean), "std": list(data.std)}


def fit(
    model: nnx.Module,
    data: ArrayDataset,
    tx: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    output: str = "logits",
    seed: int = 0,
    augment: bool = False,
    scan: bool = False,
    eval_batch_size: int = 1000,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    keep_checkpoints: int = 3,
    config: dict[str, Any] | None = None,
    devices: int | None = None,
    fsdp: bool = False,
    precision: str = "fp32",
    progress: bool = True,
    log_every: int = 50,
) -> FitResult:
    """Trains ``model`` on ``data`` with ``tx`` and evaluates after every epoch.

    Args:
        model: an NNX model (e.g. ``jaxnet.models.create_model("mlp")``).
        data: the data set (``jaxnet.data.load_dataset("mnist")``).
        tx: the optimizer (``jaxnet.optim.create_optimizer("adam", 1e-3)``).
        epochs: passes over the training split.
        batch_size: examples per step (the global batch over all devices);
            the last partial batch of an epoch is dropped (each epoch's
            shuffle drops different examples).
        output: the model's output kind, which picks the loss (see
            :func:`jaxnet.step.loss_for_output`).
        seed: seeds shuffling, dropout and augmentation.
        augment: random crop + flip on training batches (on device).
        scan: run each epoch as one compiled ``lax.scan`` over device-resident
            data instead of one call per step.
        eval_batch_size: examples per evaluation call.
        workdir: where ``metrics.jsonl``, TensorBoard files, ``curves.png``,
            ``config.json`` and checkpoints (one at every epoch end) go;
            ``None`` writes nothing.
        checkpoint_every: also checkpoint every this many steps (mid-epoch).
        resume: continue the run in ``workdir`` from its latest sound
            checkpoint, exactly as if it had never stopped.
        keep_checkpoints: newest checkpoints kept (plus the best by test
            accuracy).
        config: JSON description of the run recorded in the workdir; a
            resumed run must match it (default: :func:`default_config`).
        devices: split each batch over this many local devices (data
            parallel); ``None`` uses one, or all of them in a multi-process run.
        fsdp: shard parameters and optimizer state over the devices too.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` compute (float32 parameters).
        progress: show a progress bar on stderr (epoch summaries are printed
            to stderr either way).
        log_every: steps between training-loss log records.

    Returns:
        A :class:`FitResult`.

    Raises:
        ConfigError: bad sizes, a model that does not fit the data, a workdir
            that holds another run.
        DataError: labels out of range or empty splits.
    """
    from jaxnet import checkpoint as ckpt_lib
    from jaxnet import integrity
    from jaxnet import workdir as workdir_lib

    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs ({epochs}) and batch size ({batch_size}) must be at least 1")
    check_dataset(data, model, output=output)
    if batch_size > data.num_train:
        raise ConfigError(
            f"batch size {batch_size} is larger than the {data.num_train} training examples of "
            f"{data.name}; use --batch-size {data.num_train} or less"
        )
    if devices and devices > 1:
        from jaxnet.sharding import check_batch_divisible

        check_batch_divisible(batch_size, devices)
    if fsdp and workdir is not None and jax.process_count() > 1:
        raise ConfigError(
            "checkpoints of an FSDP-sharded state spread over several processes are not supported; "
            "drop --fsdp (data parallel) or --workdir for a multi-process run"
        )
    if resume and workdir is None:
        raise ConfigError("resume needs the workdir of the run to continue (--workdir W --resume)")
    main_process = jax.process_index() == 0
    config = config or default_config(model, data, batch_size=batch_size, seed=seed, epochs=epochs)
    ckpt = None
    if workdir is not None:
        if main_process:  # config.json is written once, by process 0
            workdir_lib.check_workdir(workdir, config, resume=resume, mutable_keys=("epochs",))
        ckpt = ckpt_lib.create_checkpoint_manager(
            workdir_lib.checkpoint_directory(workdir), max_to_keep=keep_checkpoints,
            best_metric=ckpt_lib.DEFAULT_BEST_METRIC)
    regression = output == "regression"
    transform = None if regression else make_image_transform(data.mean, data.std, augment=augment)
    steps = build_steps(model, tx, output=output, transform=transform, seed=seed, devices=devices,
                        fsdp=fsdp, precision=precision, scan=scan)
    state = steps.state
    steps_per_epoch = jdata.num_batches(data.num_train, batch_size, drop_last=True)
    first_epoch, first_batch, sums, history = 0, 0, {}, []
    restored = ckpt_lib.restore_latest_good(ckpt, state) if resume else None
    if restored is not None:  # continue exactly where the checkpoint was taken
        state, meta = restored
        first_epoch, first_batch = meta["epoch"], meta["batch_in_epoch"]
        sums = {k: jnp.asarray(v, jnp.float32) for k, v in meta["sums"].items()}
        history = meta["history"]
    host_step = int(state.step)
    resumed_step = host_step if restored is not None else None
    if workdir is not None and main_process and restored is not None:
        workdir_lib.rewind_jsonl(os.path.join(workdir, METRICS_FILE), host_step)
    logger = MetricsLogger(workdir if main_process else None,
                           purge_step=host_step + 1 if restored is not None else None)
    if scan:  # uint8 images stay on the device for the whole run
        train_images, train_labels = jax.device_put((data.train_images, data.train_labels))

    blocked = {"checkpoint": 0.0}  # seconds the training loop waited for saves

    def save(epoch: int, batch_in_epoch: int, metrics: dict[str, float] | None = None) -> None:
        if ckpt is None:
            return
        meta = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": seed, "history": history,
                "sums": {k: float(v) for k, v in sums.items()}}
        t = time.perf_counter()
        logger.flush()  # the logs up to this step are on disk before the checkpoint is
        ckpt_lib.save(ckpt, host_step, state, meta=meta, metrics=metrics)
        blocked["checkpoint"] += time.perf_counter() - t

    throttle = _dispatch_limiter(steps)
    counter = CompileCounter().__enter__()
    compiles_after_first_epoch = None
    start = time.perf_counter()
    try:
        for epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            skip = first_batch if epoch == first_epoch else 0
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=None if progress and main_process else True, leave=False)
            if scan:
                perm = jdata.epoch_permutation(data.num_train, seed=seed, epoch=epoch, shuffle=True)
                idx = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
                state, per_step = steps.scan(state, train_images, train_labels, idx.astype(np.int32))
                host_step += steps_per_epoch
                bar.update(steps_per_epoch)
                sums = {k: jnp.sum(v) for k, v in per_step.items()}
            else:
                if epoch != first_epoch or not first_batch:
                    sums = {}
                for i, batch in enumerate(_train_batches(data, batch_size, steps, seed=seed, epoch=epoch,
                                                         start_batch=skip), start=skip):
                    state, m = steps.train(state, batch)
                    throttle(m)
                    host_step += 1
                    sums = m if not sums else jax.tree.map(jnp.add, sums, m)
                    if (i + 1) % log_every == 0:  # the only host syncs inside an epoch
                        loss = float(m["loss"])
                        logger.log(host_step, "train", {"loss": loss})
                        bar.set_postfix(loss=f"{loss:.4f}")
                    if checkpoint_every and host_step % checkpoint_every == 0 and i + 1 < steps_per_epoch:
                        save(epoch, i + 1)
                    bar.update(1)
            bar.close()
            train = {k: float(v) / steps_per_epoch for k, v in sums.items()}
            test = evaluate(steps.eval, state, data.test_images, data.test_labels,
                            batch_size=eval_batch_size, num_classes=data.num_classes)
            record = {"epoch": epoch + 1, "step": host_step,
                      "epoch_seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
            record.update({f"train_{k}": v for k, v in train.items()})
            record.update({f"test_{k}": v for k, v in test.items()})
            history.append(record)
            logger.log(host_step, "epoch", record)
            logger.histograms(host_step, _param_arrays(_on_host(state.params)))
            sums = {}
            save(epoch + 1, 0, {k: v for k, v in record.items() if k.startswith("test_")})
            if main_process:
                (tqdm.write if progress else print)(_epoch_line(record), file=sys.stderr)
            if compiles_after_first_epoch is None:
                compiles_after_first_epoch = counter.snapshot()[1]
    finally:
        counter.__exit__(None, None, None)
        logger.close()
        if ckpt is not None:
            t = time.perf_counter()
            ckpt_lib.close(ckpt)  # waits for the last asynchronous save
            blocked["checkpoint"] += time.perf_counter() - t
    total_seconds = time.perf_counter() - start
    if workdir is not None and main_process:
        plot_curves(history, os.path.join(workdir, CURVES_FILE))
    summary = {
        "model": type(model).__name__,
        "dataset": data.name,
        "dataset_source": data.source,
        "epochs": epochs,
        "steps": host_step,
        "batch_size": batch_size,
        "params": count_params(state.params),
        "params_sha256": integrity.params_sha256(_on_host(state.params)),
        "train_seconds": round(total_seconds, 3),
        "checkpoint_seconds": round(blocked["checkpoint"], 3),
        "num_devices": 1 if steps.mesh is None else int(steps.mesh.size),
        "num_processes": jax.process_count(),
        "precision": precision,
        "mode": "scan" if scan else "step",
        "resumed_from_step": resumed_step,
        "compilations": counter.compiles,
        "steady_state_compilations": counter.compiles - (compiles_after_first_epoch or counter.compiles),
        **{k: v for k, v in history[-1].items() if k.startswith("test_")},
    }
    if regression:
        summary["test_accuracy"] = None
    return FitResult(graphdef=steps.graphdef, state=state, history=history, summary=summary)


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
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return "  ".join(parts)
