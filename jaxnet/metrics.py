"""Classification metrics with scikit-learn's numbers, streamed over batches.

The tutorials evaluate with ``torch.max(outputs, 1)`` and a running correct
count, then call scikit-learn for precision, recall, F1 and AUC. Here the
per-batch part is a pure, jit-able update of a small pytree (optax's shape:
``metrics_init`` / ``metrics_update``), and the final numbers come from
``metrics_compute`` on the host:

    m = metrics_init(10)
    for batch in test_batches:
        m = eval_update(m, ...)            # jax.jit(metrics_update) inside
    print(metrics_compute(m))              # accuracy, top5, loss, P/R/F1

Conventions follow scikit-learn with ``labels=range(num_classes)``: a class
absent from both labels and predictions still counts in macro averages (its
precision, recall and F1 are ``zero_division``), exactly what
``sklearn.metrics.precision_recall_fscore_support(..., labels=range(C))``
returns. Without ``labels=``, scikit-learn would leave such a class out.

ROC AUC needs every example's scores, not a confusion matrix, so it is
computed in numpy from scores gathered by :class:`ScoreCollector`; both
live in :mod:`jaxnet.roc_auc` and are importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.roc_auc import ScoreCollector, roc_auc_ovr

__all__ = [
    "AVERAGES",
    "ClassificationMetrics",
    "ScoreCollector",
    "accuracy",
    "confusion_matrix",
    "metrics_compute",
    "metrics_init",
    "metrics_update",
    "precision_recall_f1",
    "roc_auc_ovr",
    "top_k_accuracy",
]

AVERAGES = ("macro", "micro", "weighted", None)


@flax.struct.dataclass
class ClassificationMetrics:
    """Running sums for classification metrics; a pytree, safe to carry through jit.

    Attributes:
        confusion: ``(C, C)`` int32 counts, rows = true class, columns =
            predicted class (scikit-learn's ``confusion_matrix`` layout).
        loss_sum: ``()`` float32 sum of per-example losses.
        loss_count: ``()`` int32 examples whose loss was added.
        count: ``()`` int32 examples seen (padding excluded).
        topk_correct: ``()`` int32 examples whose label is in the top ``k`` scores.
        k: the ``k`` of ``topk_correct`` (static, not a pytree leaf).
    """

    confusion: jax.Array
    loss_sum: jax.Array
    loss_count: jax.Array
    count: jax.Array
    topk_correct: jax.Array
    k: int = flax.struct.field(pytree_node=False, default=5)

    if TYPE_CHECKING:  # flax.struct.dataclass adds replace at runtime; type checkers do not see it

        def replace(self, **updates: Any) -> ClassificationMetrics:
            """A copy with ``updates`` applied (``dataclasses.replace``)."""
            ...


def metrics_init(num_classes: int, *, k: int = 5) -> ClassificationMetrics:
    """Empty running metrics for ``num_classes`` classes and top-``k`` accuracy.

    Args:
        num_classes: number of classes ``C``.
        k: the ``k`` of top-k accuracy (``k >= C`` gives 1.0, as scikit-learn).

    Returns:
        A :class:`ClassificationMetrics` of zeros.

    Raises:
        ConfigError: ``num_classes`` or ``k`` is not a positive int.

    >>> metrics_init(10).confusion.shape
    (10, 10)
    """
    for name, value in (("num_classes", num_classes), ("k", k)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name} must be a positive int; got {value!r}")
    return ClassificationMetrics(
        confusion=jnp.zeros((num_classes, num_classes), jnp.int32),
        loss_sum=jnp.zeros([], jnp.float32),
        loss_count=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        topk_correct=jnp.zeros([], jnp.int32),
        k=k,
    )


def _check_range(values: jax.Array, num_classes: int, mask: jax.Array | None, name: str) -> None:
    """Outside jit, checks integer ``values`` (unmasked ones) lie in ``[0, num_classes)``."""
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class indices; got dtype {values.dtype}")
    if mask is not None and jnp.shape(mask) != values.shape:
        raise JaxnetError(f"mask shape {jnp.shape(mask)} must equal {name} shape {values.shape}")
    if isinstance(values, jax.core.Tracer) or not values.size:
        return  # under jit, out-of-range values are left out instead (see _valid)
    host = np.asarray(values)
    if mask is not None and not isinstance(mask, jax.core.Tracer):
        host = host[np.asarray(mask).astype(bool)]
    if host.size and (host.min() < 0 or host.max() >= num_classes):
        raise JaxnetError(
            f"{name} must lie in [0, {num_classes}); found {host.min()} to {host.max()}. Mask out padding with mask=."
        )


def _check_scores_labels(scores: jax.Array, labels: jax.Array, mask: jax.Array | None) -> None:
    """Shape and (outside jit) range checks of ``(..., C)`` scores and ``(...)`` labels."""
    if scores.ndim < 1 or labels.shape != scores.shape[:-1]:
        raise JaxnetError(
            f"scores/logits shape {scores.shape} and labels shape {labels.shape} do not "
            "match; expected logits (..., C) and labels (...), e.g. (B, C) and (B,)"
        )
    _check_range(labels, scores.shape[-1], mask, "labels")


def _valid(labels: jax.Array, num_classes: int, mask: jax.Array | None) -> jax.Array:
    """Examples that count: unmasked, with a label in range (drops bad labels under jit)."""
    valid = (labels >= 0) & (labels < num_classes)
    return valid if mask is None else valid & jnp.asarray(mask).astype(bool)


def _topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Whether each label ranks in the top ``k``, ties broken like scikit-learn.

    scikit-learn sorts scores descending with ties in *descending* class
    index, so the label's rank is the number of classes scoring higher plus
    the tied classes with a larger index. ``(B, C)`` work, no sort.
    """
    num_classes = scores.shape[-1]
    safe = jnp.clip(labels, 0, num_classes - 1)
    own = jnp.take_along_axis(scores, safe[..., None], axis=-1)  # (..., 1)
    classes = jnp.arange(num_classes)
    ahead = (scores > own) | ((scores == own) & (classes > safe[..., None]))
    return jnp.sum(ahead, axis=-1) < k


def confusion_matrix(
    preds: jax.Array, labels: jax.Array, num_classes: int, *, mask: jax.Array | None = None
) -> jax.Array:
    """Counts of (true, predicted) class pairs; jit-able with static ``num_classes``.

    Counterpart of ``sklearn.metrics.confusion_matrix(labels, preds,
    labels=range(num_classes))``: rows are true classes, columns predicted.

    Args:
        preds: ``(...)`` integer predicted classes.
        labels: ``(...)`` integer true classes, the same shape.
        num_classes: ``C``.
        mask: optional ``(...)`` bool, False for padding examples to skip.

    Returns:
        ``(C, C)`` int32 counts. Under jit, out-of-range labels or predictions
        are not counted; outside jit they raise.

    Raises:
        JaxnetError: mismatched shapes or (outside jit) out-of-range values.

    >>> confusion_matrix(jnp.array([0, 1, 1]), jnp.array([0, 0, 1]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    preds, labels = jnp.asarray(preds), jnp.asarray(labels)
    if preds.shape != labels.shape:
        raise JaxnetError(f"preds shape {preds.shape} differs from labels shape {labels.shape}")
    _check_range(labels, num_classes, mask, "labels")
    _check_range(preds, num_classes, mask, "preds")
    valid = _valid(labels, num_classes, mask) & (preds >= 0) & (preds < num_classes)
    flat = jnp.where(valid, labels * num_classes + preds, 0).reshape(-1)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(valid.reshape(-1).astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def metrics_update(
    m: ClassificationMetrics,
    logits: jax.Array,
    labels: jax.Array,
    *,
    loss: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> ClassificationMetrics:
    """Adds one batch to the running metrics; pure and jit-able.

    Counterpart of the tutorials' ``_, predicted = torch.max(outputs, 1);
    correct += (predicted == labels).sum()`` loop, for every metric at once.

    Args:
        m: the running metrics.
        logits: ``(B, C)`` (or ``(..., C)``) scores; the prediction is their
            argmax. A row holding NaN counts as wrong (top-k included).
        labels: ``(B,)`` integer classes.
        loss: optional per-example losses ``(B,)``, or a scalar taken as the
            mean over the batch's unmasked examples.
        mask: optional ``(B,)`` bool, False for padding in a final partial batch.

    Returns:
        The updated :class:`ClassificationMetrics`.

    Raises:
        JaxnetError: shapes disagree with each other or with ``m``, or
            (outside jit) labels are out of range.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_scores_labels(logits, labels, mask)
    num_classes = m.confusion.shape[0]
    if logits.shape[-1] != num_classes:
        raise JaxnetError(
            f"logits have {logits.shape[-1]} classes but the metrics were "
            f"initialized for {num_classes}; use metrics_init({logits.shape[-1]})"
        )
    valid = _valid(labels, num_classes, mask)
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    # A row of scores holding NaN (a diverged model) is a wrong prediction for every metric: NaN
    # compares false, which would otherwise rank the label first. It is booked as the next class.
    nan_row = jnp.any(jnp.isnan(logits), axis=-1)
    preds = jnp.where(nan_row, (labels + 1) % num_classes, jnp.argmax(logits, axis=-1))
    hits = _topk_hits(logits, labels, m.k) & valid & ~nan_row
    loss_sum, loss_count = m.loss_sum, m.loss_count
    if loss is not None:
        loss = jnp.asarray(loss, jnp.float32)
        if loss.ndim == 0:
            loss_sum = loss_sum + loss * n_valid.astype(jnp.float32)
        elif loss.shape == labels.shape:
            loss_sum = loss_sum + jnp.sum(jnp.where(valid, loss, 0.0))
        else:
            raise JaxnetError(f"loss must be a scalar or per-example {labels.shape}; got shape {loss.shape}")
        loss_count = loss_count + n_valid
    return m.replace(
        confusion=m.confusion + confusion_matrix(preds, labels, num_classes, mask=valid),
        loss_sum=loss_sum,
        loss_count=loss_count,
        count=m.count + n_valid,
        topk_correct=m.topk_correct + jnp.sum(hits, dtype=jnp.int32),
    )


def metrics_compute(m: ClassificationMetrics) -> dict[str, float]:
    """Final numbers from the running metrics; host-side (not jit-able).

    Args:
        m: the running metrics.

    Returns:
        ``accuracy``, ``top{k}_accuracy``, ``loss`` (only if losses were added),
        and ``precision``/``recall``/``f1`` with suffixes ``_macro``,
        ``_micro`` and ``_weighted``, as scikit-learn with
        ``labels=range(C)`` and ``zero_division=0``.

    Raises:
        JaxnetError: no example was added.
    """
    count = int(m.count)
    if count == 0:
        raise JaxnetError("no examples in the metrics; call metrics_update before computing")
    confusion = np.asarray(m.confusion)
    out = {"accuracy": float(np.trace(confusion) / count), f"top{m.k}_accuracy": float(int(m.topk_correct) / count)}
    if int(m.loss_count):
        out["loss"] = float(m.loss_sum) / int(m.loss_count)
    for average in ("macro", "micro", "weighted"):
        p, r, f1 = precision_recall_f1(confusion, average=average)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f1})
    return out


def accuracy(logits_or_preds: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of correct predictions; jit-able.

    Counterpart of ``(torch.max(outputs, 1)[1] == labels).float().mean()``
    and ``sklearn.metrics.accuracy_score``.

    Args:
        logits_or_preds: ``(B, C)`` scores (argmax taken) or ``(B,)`` predicted classes.
        labels: ``(B,)`` integer classes.

    Returns:
        A float32 scalar.

    Raises:
        JaxnetError: shapes do not fit either form.

    >>> float(accuracy(jnp.array([[0.1, 0.9], [0.8, 0.2]]), jnp.array([1, 1])))
    0.5
    """
    x, labels = jnp.asarray(logits_or_preds), jnp.asarray(labels)
    if x.ndim == labels.ndim + 1:
        x = jnp.argmax(x, axis=-1)
    if x.shape != labels.shape:
        raise JaxnetError(
            f"got {logits_or_preds.shape} and labels {labels.shape}; pass logits "
            "(B, C) or predictions (B,) with labels (B,)"
        )
    return jnp.mean((x == labels).astype(jnp.float32))


def top_k_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Fraction of examples whose label is among the ``k`` highest scores; jit-able.

    Counterpart of ``sklearn.metrics.top_k_accuracy_score`` (same tie rule:
    among equal scores the larger class index ranks first); ``k >= C`` gives 1.

    Args:
        logits: ``(B, C)`` scores.
        labels: ``(B,)`` integer classes.
        k: how many top classes count as a hit.

    Returns:
        A float32 scalar.

    Raises:
        ConfigError: ``k`` is not a positive int.
        JaxnetError: shapes disagree, or (outside jit) labels are out of range.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ConfigError(f"k must be a positive int; got {k!r}")
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_scores_labels(logits, labels, None)
    return jnp.mean(_topk_hits(logits, labels, k).astype(jnp.float32))


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """``num / den``, with ``zero_division`` where ``den == 0`` (scikit-learn's rule)."""
    out = num / np.where(den == 0, 1, den)
    return np.where(den == 0, zero_division, out)


def _average(values: np.ndarray, weights: np.ndarray | None) -> float:
    """scikit-learn's ``_nanaverage``: NaNs skipped; all-zero weights -> plain mean."""
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    if weights is None or weights[keep].sum() == 0:
        return float(values[keep].mean())
    return float(np.average(values[keep], weights=weights[keep]))


@overload
def precision_recall_f1(
    confusion: np.ndarray | jax.Array, average: str = ..., zero_division: float = ...
) -> tuple[float, float, float]: ...


@overload
def precision_recall_f1(
    confusion: np.ndarray | jax.Array, average: None, zero_division: float = ...
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def precision_recall_f1(
    confusion: np.ndarray | jax.Array,
    average: str | None = "macro",
    zero_division: float = 0.0,
) -> tuple[float, float, float] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from a confusion matrix, scikit-learn's conventions.

    Counterpart of ``sklearn.metrics.precision_recall_fscore_support(y_true,
    y_pred, labels=range(C), average=..., zero_division=...)``. Every class
    of the matrix counts, including one absent from both labels and
    predictions (its scores are ``zero_division``); F1 is
    ``2 tp / (2 tp + fp + fn)``, ``zero_division`` only when that
    denominator is 0. ``zero_division=nan`` leaves undefined classes out of
    the averages, as scikit-learn does.

    Args:
        confusion: ``(C, C)`` counts, rows true, columns predicted.
        average: ``"macro"`` (unweighted class mean), ``"micro"`` (global
            counts), ``"weighted"`` (mean weighted by true-class support) or
            ``None`` (per-class arrays).
        zero_division: value for an undefined ratio: 0.0, 1.0 or ``nan``.

    Returns:
        ``(precision, recall, f1)``: floats, or ``(C,)`` float64 arrays for ``None``.

    Raises:
        ConfigError: unknown ``average`` or ``zero_division``.
        JaxnetError: ``confusion`` is not square.

    >>> precision_recall_f1(np.array([[2, 0], [1, 1]]), average="micro")
    (0.75, 0.75, 0.75)
    """
    if average not in AVERAGES:
        raise ConfigError(f"unknown average {average!r}; use one of {AVERAGES}")
    if not (isinstance(zero_division, (int, float)) and (np.isnan(zero_division) or zero_division in (0.0, 1.0))):
        raise ConfigError(f"zero_division must be 0.0, 1.0 or nan; got {zero_division!r}")
    confusion = np.asarray(confusion, np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise JaxnetError(f"confusion must be a square (C, C) matrix; got {confusion.shape}")
    tp = np.diag(confusion)
    pred_sum, true_sum = confusion.sum(axis=0), confusion.sum(axis=1)
    if average == "micro":
        tp, pred_sum, true_sum = tp.sum(keepdims=True), pred_sum.sum(keepdims=True), true_sum.sum(keepdims=True)
    precision = _divide(tp, pred_sum, zero_division)
    recall = _divide(tp, true_sum, zero_division)
    f1 = _divide(2 * tp, true_sum + pred_sum, zero_division)
    if average is None:
        return precision, recall, f1
    weights = true_sum if average == "weighted" else None
    return _average(precision, weights), _average(recall, weights), _average(f1, weights)
