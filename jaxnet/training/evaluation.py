"""Evaluation of a whole split: ``model.eval()`` + ``torch.no_grad()`` + every metric, compiled once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as jdata
from jaxnet import metrics as jmetrics
from jaxnet.errors import JaxnetError
from jaxnet.state import TrainState


def _padded_batches(images: Any, labels: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape eval batches: the last one is padded and masked (no recompile)."""
    n = len(labels)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, bool)
        if len(idx) < batch_size:
            mask[len(idx) :] = False
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
        metrics["roc_auc"] = float(jmetrics.roc_auc_ovr(probs, true))  # one number: the macro average
    except JaxnetError:  # a class absent from this split: AUC undefined, as in scikit-learn
        pass
    return metrics
