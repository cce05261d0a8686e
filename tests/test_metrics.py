"""jaxnet.metrics against scikit-learn: random inputs (hypothesis) and edge cases."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet import metrics
from jaxnet.errors import ConfigError, JaxnetError

skm = pytest.importorskip("sklearn.metrics")
from sklearn.exceptions import UndefinedMetricWarning  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def predictions(draw, min_classes=1, max_classes=6):
    """(num_classes, labels, preds) with labels/preds in [0, C), any class possibly absent."""
    num_classes = draw(st.integers(min_classes, max_classes))
    n = draw(st.integers(1, 40))
    values = st.integers(0, num_classes - 1)
    labels = np.array(draw(st.lists(values, min_size=n, max_size=n)), np.int32)
    preds = np.array(draw(st.lists(values, min_size=n, max_size=n)), np.int32)
    return num_classes, labels, preds


@st.composite
def scored(draw, min_classes=3, max_classes=6, all_present=False):
    """(labels, scores) with scores from a coarse grid so that ties are common."""
    num_classes = draw(st.integers(min_classes, max_classes))
    n = draw(st.integers(1, 30))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
    if all_present:
        labels = list(range(num_classes)) + labels
    grid = st.integers(0, 4).map(lambda v: v / 4)
    rows = draw(
        st.lists(st.lists(grid, min_size=num_classes, max_size=num_classes), min_size=len(labels), max_size=len(labels))
    )
    return np.array(labels, np.int32), np.array(rows, np.float32)


def _sklearn_prf(labels, preds, num_classes, average, zero_division):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, preds, labels=list(range(num_classes)), average=average, zero_division=zero_division
        )
    return p, r, f


@SETTINGS
@given(case=predictions(), average=st.sampled_from(metrics.AVERAGES), zero_division=st.sampled_from([0.0, 1.0, np.nan]))
def test_precision_recall_f1_matches_sklearn(case, average, zero_division):
    num_classes, labels, preds = case
    confusion = metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about a single label
        expected = skm.confusion_matrix(labels, preds, labels=list(range(num_classes)))
    np.testing.assert_array_equal(confusion, expected)
    ours = metrics.precision_recall_f1(confusion, average, zero_division)
    theirs = _sklearn_prf(labels, preds, num_classes, average, zero_division)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)  # NaNs must match too


@SETTINGS
@given(case=predictions())
def test_streaming_metrics_match_sklearn_over_uneven_padded_batches(case):
    num_classes, labels, preds = case
    logits = jax.nn.one_hot(preds, num_classes) + 0.01 * jnp.arange(num_classes)[::-1]
    per_example_loss = np.linspace(0.0, 2.0, len(labels)).astype(np.float32)
    m = metrics.metrics_init(num_classes, k=2)
    update = jax.jit(metrics.metrics_update)
    batch = 8
    for start in range(0, len(labels), batch):  # last batch padded to 8, like a loader
        sl = slice(start, start + batch)
        pad = batch - len(labels[sl])
        mask = np.r_[np.ones(len(labels[sl]), bool), np.zeros(pad, bool)]
        m = update(
            m,
            jnp.pad(logits[sl], ((0, pad), (0, 0))),
            jnp.pad(labels[sl], (0, pad), constant_values=-1),  # padding label: bad
            loss=jnp.pad(per_example_loss[sl], (0, pad), constant_values=1e6),
            mask=jnp.asarray(mask),
        )
    out = metrics.metrics_compute(m)
    assert int(m.count) == len(labels)
    np.testing.assert_allclose(out["accuracy"], skm.accuracy_score(labels, preds), rtol=1e-12)
    np.testing.assert_allclose(out["loss"], per_example_loss.mean(), rtol=1e-5)
    if num_classes > 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            top2 = skm.top_k_accuracy_score(labels, np.asarray(logits), k=2, labels=list(range(num_classes)))
        np.testing.assert_allclose(out["top2_accuracy"], top2, rtol=1e-12)
    for average in ("macro", "micro", "weighted"):
        p, r, f = _sklearn_prf(labels, preds, num_classes, average, 0.0)
        np.testing.assert_allclose(
            [out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"]],
            [p, r, f],
            rtol=1e-12,
            atol=1e-12,
        )


@SETTINGS
@given(case=scored(), k=st.integers(1, 7))
def test_top_k_accuracy_matches_sklearn_including_ties(case, k):
    labels, scores = case
    num_classes = scores.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k >= C warns in sklearn
        expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=list(range(num_classes)))
    np.testing.assert_allclose(metrics.top_k_accuracy(scores, labels, k), expected, rtol=1e-6)


@SETTINGS
@given(case=scored(min_classes=2, all_present=True), average=st.sampled_from(["macro", "weighted", "micro", None]))
def test_roc_auc_ovr_matches_sklearn_including_ties(case, average):
    labels, scores = case
    probs = np.asarray(jax.nn.softmax(jnp.asarray(scores, jnp.float32) * 3), np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # sklearn checks rows sum to 1
    if scores.shape[1] == 2:  # sklearn's binary form: the positive class's score
        probs = np.stack([1.0 - scores[:, 1], scores[:, 1]], axis=1).astype(np.float64)
        expected = skm.roc_auc_score(labels, probs[:, 1])
        if average == "micro":  # sklearn's definition: pooled one-vs-rest pairs
            one_hot = labels[:, None] == np.arange(2)
            expected = skm.roc_auc_score(one_hot.ravel(), probs.ravel())
        if average is None:
            expected = [expected, expected]
    else:
        expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average=average)
    np.testing.assert_allclose(metrics.roc_auc_ovr(probs, labels, average=average), expected, rtol=1e-9)


def test_roc_auc_ties_count_half():
    # One positive tied with one negative, one positive above both: AUC = (1 + 0.5) / 2.
    auc = metrics.roc_auc_ovr(np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]]), np.array([0, 1, 1]), average=None)
    np.testing.assert_allclose(auc, [0.75, 0.75])


def test_roc_auc_raises_when_a_class_has_no_positives():
    probs = np.full((4, 3), 1 / 3)
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="Number of classes"):  # sklearn raises too
        skm.roc_auc_score(labels, probs, multi_class="ovr")
    with pytest.warns(UndefinedMetricWarning):
        # ...or, given labels=, warns and returns NaN for that class.
        assert np.isnan(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=[0, 1, 2]))
    with pytest.raises(JaxnetError, match="undefined for class 2: it has 0 positive"):
        metrics.roc_auc_ovr(probs, labels)
    with pytest.raises(JaxnetError, match="undefined for class 0"):
        metrics.roc_auc_ovr(probs[:, :2], np.zeros(4, np.int32))  # a single class


def test_score_collector_gathers_batches_and_drops_padding():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = np.r_[np.arange(4), rng.integers(0, 4, size=46)]
    collector = metrics.ScoreCollector()
    for start in range(0, 50, 16):
        chunk = slice(start, start + 16)
        pad = 16 - len(labels[chunk])
        collector.add(
            np.pad(probs[chunk], ((0, pad), (0, 0))),
            np.pad(labels[chunk], (0, pad)),
            mask=np.r_[np.ones(16 - pad, bool), np.zeros(pad, bool)],
        )
    scores, gathered = collector.arrays()
    np.testing.assert_array_equal(gathered, labels)
    np.testing.assert_allclose(collector.roc_auc(), skm.roc_auc_score(labels, probs, multi_class="ovr"), rtol=1e-12)
    with pytest.raises(JaxnetError, match="empty"):
        metrics.ScoreCollector().roc_auc()


def test_absent_class_counts_in_macro_like_sklearn_with_labels():
    # Class 2 never appears in labels or predictions.
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 1, 1, 1])
    confusion = metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), 3)
    p, r, f = metrics.precision_recall_f1(confusion, "macro")
    expected = _sklearn_prf(labels, preds, 3, "macro", 0.0)
    np.testing.assert_allclose([p, r, f], expected, rtol=1e-12)
    # sklearn without labels= would leave the class out (a larger mean): we do not.
    without = skm.precision_recall_fscore_support(labels, preds, average="macro")[:3]
    assert p < without[0] and r < without[1]
    np.testing.assert_allclose(p, (1.0 + 2 / 3 + 0.0) / 3)
    # zero_division=nan drops the undefined class from the average instead.
    p_nan, _, _ = metrics.precision_recall_f1(confusion, "macro", zero_division=np.nan)
    np.testing.assert_allclose(p_nan, without[0])


def test_all_predictions_one_class():
    labels = np.array([0, 1, 2, 2, 1])
    preds = np.zeros(5, np.int32)
    confusion = metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), 3)
    for average in ("macro", "micro", "weighted", None):
        np.testing.assert_allclose(
            metrics.precision_recall_f1(confusion, average), _sklearn_prf(labels, preds, 3, average, 0.0), rtol=1e-12
        )
    p, r, _ = metrics.precision_recall_f1(confusion, None)
    np.testing.assert_allclose(p, [0.2, 0.0, 0.0])
    np.testing.assert_allclose(r, [1.0, 0.0, 0.0])


def test_single_class_and_perfect_predictions():
    m = metrics.metrics_init(1, k=5)
    m = metrics.metrics_update(m, jnp.zeros((3, 1)), jnp.zeros(3, jnp.int32))
    out = metrics.metrics_compute(m)
    assert out["accuracy"] == 1.0 and out["top5_accuracy"] == 1.0
    assert out["f1_macro"] == out["precision_micro"] == 1.0
    assert "loss" not in out  # no loss was given

    labels = jnp.array([0, 1, 2, 3, 2])
    m = metrics.metrics_update(metrics.metrics_init(4, k=1), jax.nn.one_hot(labels, 4), labels)
    out = metrics.metrics_compute(m)
    assert all(v == 1.0 for v in out.values()), out


def test_top_k_with_k_at_least_num_classes_is_one():
    logits = jnp.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = jnp.array([2, 0])
    assert float(metrics.top_k_accuracy(logits, labels, 3)) == 1.0
    assert float(metrics.top_k_accuracy(logits, labels, 10)) == 1.0
    assert float(metrics.top_k_accuracy(logits, labels, 2)) == 0.0


def test_accuracy_takes_logits_or_predictions():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = jnp.array([1, 1, 1])
    assert float(metrics.accuracy(logits, labels)) == pytest.approx(2 / 3)
    assert float(metrics.accuracy(jnp.array([1, 0, 1]), labels)) == pytest.approx(2 / 3)
    assert float(jax.jit(metrics.accuracy)(logits, labels)) == pytest.approx(2 / 3)


def test_metrics_update_is_pure_and_keeps_structure():
    m0 = metrics.metrics_init(3, k=2)
    m1 = jax.jit(metrics.metrics_update)(m0, jnp.eye(3), jnp.arange(3), loss=jnp.float32(0.5))
    assert int(m0.count) == 0 and int(m1.count) == 3
    assert jax.tree.structure(m1) == jax.tree.structure(m0)
    assert jax.tree.map(lambda a: a.dtype, m1) == jax.tree.map(lambda a: a.dtype, m0)
    assert metrics.metrics_compute(m1)["loss"] == pytest.approx(0.5)


def test_errors_name_the_problem():
    m = metrics.metrics_init(3)
    with pytest.raises(JaxnetError, match=r"labels must lie in \[0, 3\)"):
        metrics.metrics_update(m, jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(JaxnetError, match=r"use metrics_init\(4\)"):
        metrics.metrics_update(m, jnp.zeros((2, 4)), jnp.array([0, 1]))
    with pytest.raises(JaxnetError, match="do not match"):
        metrics.metrics_update(m, jnp.zeros((2, 3)), jnp.array([0, 1, 2]))
    with pytest.raises(JaxnetError, match="no examples"):
        metrics.metrics_compute(m)
    with pytest.raises(ConfigError, match="unknown average"):
        metrics.precision_recall_f1(np.eye(2), "samples")
    with pytest.raises(ConfigError, match="zero_division"):
        metrics.precision_recall_f1(np.eye(2), zero_division=0.5)
    with pytest.raises(ConfigError, match="positive int"):
        metrics.metrics_init(0)
