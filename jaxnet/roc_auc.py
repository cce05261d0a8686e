"""ROC AUC of multiclass scores, scikit-learn's numbers, from scores gathered on the host.

ROC AUC needs every example's scores, not a confusion matrix, so it is not
one of :mod:`jaxnet.metrics`' running sums: :class:`ScoreCollector` copies
each evaluation batch's scores and labels to the host, and
:func:`roc_auc_ovr` ranks them in numpy (the Mann-Whitney U statistic,
which is scikit-learn's trapezoidal area under ``roc_curve``). Both are
importable from :mod:`jaxnet.metrics` too.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxnet.errors import ConfigError, JaxnetError

__all__ = ["ScoreCollector", "roc_auc_ovr"]


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, ties counting 1/2.

    Equal to scikit-learn's trapezoidal area under ``roc_curve``.
    """
    n_pos = positive.sum()
    n_neg = len(positive) - n_pos
    rank_sum = _midranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(
    scores: np.ndarray | jax.Array, labels: np.ndarray | jax.Array, *, average: str | None = "macro"
) -> float | np.ndarray:
    """One-vs-rest ROC AUC of multiclass scores; numpy, on the host.

    Counterpart of ``sklearn.metrics.roc_auc_score(labels, scores,
    multi_class="ovr")``. Each class's AUC is rank-based (ties count 1/2,
    the trapezoid rule of scikit-learn's ROC curve). scikit-learn requires
    rows of probabilities; pass ``jax.nn.softmax(logits)`` to get its number
    (raw logits rank examples differently per class).

    Args:
        scores: ``(N, C)`` per-class scores, ``C >= 2``.
        labels: ``(N,)`` integer classes in ``[0, C)``.
        average: ``"macro"``, ``"weighted"`` (by class prevalence),
            ``"micro"`` (all one-vs-rest pairs pooled) or ``None`` (per class).

    Returns:
        A float, or a ``(C,)`` array for ``average=None``.

    Raises:
        JaxnetError: a class has no positive (or no negative) example, so its
            AUC is undefined (scikit-learn raises too; given ``labels=``, it
            warns and returns NaN instead); bad shapes, labels or NaNs.
        ConfigError: unknown ``average``.
    """
    if average not in ("macro", "weighted", "micro", None):
        raise ConfigError(f"unknown average {average!r}; use 'macro', 'weighted', 'micro' or None")
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] < 2 or labels.shape != scores.shape[:1]:
        raise JaxnetError(f"expected scores (N, C) with C >= 2 and labels (N,); got {scores.shape} and {labels.shape}")
    if np.isnan(scores).any():
        raise JaxnetError("scores contain NaN; ROC AUC needs finite scores")
    num_classes = scores.shape[1]
    if not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() >= num_classes)
    ):
        raise JaxnetError(f"labels must be integers in [0, {num_classes})")
    one_hot = labels[:, None] == np.arange(num_classes)  # (N, C)
    support = one_hot.sum(axis=0)
    bad = np.flatnonzero((support == 0) | (support == len(labels)))
    if bad.size:
        raise JaxnetError(
            f"ROC AUC is undefined for class {int(bad[0])}: it has {int(support[bad[0]])} "
            f"positive examples out of {len(labels)} (one-vs-rest needs both positives and "
            "negatives; scikit-learn raises too). Evaluate on more data."
        )
    if average == "micro":
        return _binary_auc(scores.ravel(), one_hot.ravel())
    per_class = np.array([_binary_auc(scores[:, c], one_hot[:, c]) for c in range(num_classes)])
    if average is None:
        return per_class
    return float(np.average(per_class, weights=support if average == "weighted" else None))


class ScoreCollector:
    """Gathers scores and labels across evaluation batches, on the host, for ROC AUC.

    The counterpart of appending ``outputs``/``labels`` to Python lists in a
    PyTorch eval loop before calling scikit-learn.

    >>> collector = ScoreCollector()
    >>> collector.add(jnp.array([[0.9, 0.1], [0.2, 0.8]]), jnp.array([0, 1]))
    >>> collector.roc_auc()
    1.0
    """

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> None:
        """Copies one batch to the host, dropping examples where ``mask`` is False.

        Args:
            scores: ``(B, C)`` scores (probabilities for scikit-learn's numbers).
            labels: ``(B,)`` integer classes.
            mask: optional ``(B,)`` bool; False marks padding.
        """
        host_scores, host_labels = np.asarray(scores), np.asarray(labels)
        if mask is not None:
            keep = np.asarray(mask).astype(bool)
            host_scores, host_labels = host_scores[keep], host_labels[keep]
        self._scores.append(host_scores)
        self._labels.append(host_labels)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All gathered ``(N, C)`` scores and ``(N,)`` labels."""
        if not self._scores:
            raise JaxnetError("ScoreCollector is empty; call add() with each batch first")
        return np.concatenate(self._scores), np.concatenate(self._labels)

    def roc_auc(self, average: str | None = "macro") -> float | np.ndarray:
        """:func:`roc_auc_ovr` of everything gathered so far."""
        return roc_auc_ovr(*self.arrays(), average=average)
