"""MetricsLogger's files: JSON lines and TensorBoard events a reader gets back exactly."""

import json

import numpy as np
import pytest

from jaxnet.tracking import HISTOGRAM_BINS, MetricsLogger


def _accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_histograms_read_back_with_the_arrays_statistics(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((300, 70)).astype(np.float32)
    with_nan = np.array([1.0, np.nan, 3.0, np.inf, -2.0], np.float32)
    with MetricsLogger(tmp_path) as logger:
        logger.histograms(7, {"fc/kernel": weights, "bad": with_nan, "all_nan": np.full(3, np.nan)})
    acc = _accumulator(tmp_path / "tensorboard")
    assert sorted(acc.Tags()["histograms"]) == ["bad", "fc/kernel"]  # no finite value: skipped
    (event,) = acc.Histograms("fc/kernel")
    h = event.histogram_value
    assert event.step == 7
    assert h.num == weights.size and sum(h.bucket) == weights.size and len(h.bucket) == HISTOGRAM_BINS
    assert h.min == pytest.approx(weights.min()) and h.max == pytest.approx(weights.max())
    assert h.bucket_limit[-1] == pytest.approx(weights.max())
    assert h.sum == pytest.approx(float(weights.sum(dtype=np.float64)), rel=1e-6)
    assert h.sum_squares == pytest.approx(float((weights.astype(np.float64) ** 2).sum()), rel=1e-5)
    counts, _ = np.histogram(weights, bins=HISTOGRAM_BINS)
    assert list(h.bucket) == counts.tolist()
    import ml_dtypes

    with MetricsLogger(tmp_path / "more") as logger:
        logger.histograms(1, {"bf16": np.ones(5, ml_dtypes.bfloat16), "int": np.arange(4)})
    more = _accumulator(tmp_path / "more" / "tensorboard")
    assert more.Histograms("bf16")[0].histogram_value.num == 5
    assert more.Histograms("int")[0].histogram_value.max == 3.0
    (bad,) = acc.Histograms("bad")
    assert bad.histogram_value.num == 3 and (bad.histogram_value.min, bad.histogram_value.max) == (-2.0, 3.0)


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, "train", {"loss": 0.5, "note": "text"})
        logger.log(2, "train", {"loss": np.float32(0.25)})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "split": "train", "loss": 0.5, "note": "text"},
        {"step": 2, "split": "train", "loss": 0.25},
    ]
    assert [(e.step, e.value) for e in _accumulator(tmp_path / "tensorboard").Scalars("train/loss")] == [
        (1, 0.5),
        (2, 0.25),
    ]


def test_a_logger_without_workdir_writes_nothing_and_keeps_records(tmp_path):
    logger = MetricsLogger(None)
    logger.log(3, "epoch", {"acc": 1.0})
    logger.histograms(3, {"w": np.ones(4)})
    logger.close()
    assert logger.records == [{"step": 3, "split": "epoch", "acc": 1.0}]


def test_histograms_of_huge_and_non_finite_values_are_silent_and_correct(tmp_path):
    # A diverged run trained on with on_nan="continue": values at the float32 limit, inf and nan.
    import warnings

    one = np.float32(1.0)
    arrays = {
        "huge": np.array([1e38, -1e38, 3e38, -3e38, np.inf, -np.inf, np.nan], np.float32),
        "all_big": np.full(6, 1e38, np.float32),  # constant: numpy's +-0.5 vanishes at 1e38
        "near_constant": np.array([one] * 5 + [np.nextafter(one, np.float32(2))]),  # 1.0 and one step above
        "float64": np.array([1e300, -1e300, 1.0]),  # would overflow a cast to float32
        "all_nan": np.full(3, np.nan, np.float32),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsLogger(tmp_path) as logger:
            skipped = logger.histograms(2, arrays)
    assert [str(w.message) for w in caught] == []
    assert skipped == {"huge": 3, "all_nan": 3}
    acc = _accumulator(tmp_path / "tensorboard")
    assert sorted(acc.Tags()["histograms"]) == ["all_big", "float64", "huge", "near_constant"]
    for name, finite in [("huge", 4), ("all_big", 6), ("near_constant", 6), ("float64", 3)]:
        h = acc.Histograms(name)[0].histogram_value
        assert h.num == finite and sum(h.bucket) == finite, name
        assert all(np.isfinite([h.min, h.max, h.sum])), name
        assert list(h.bucket_limit) == sorted(set(h.bucket_limit)), name  # increasing edges
    assert acc.Histograms("float64")[0].histogram_value.sum_squares == np.inf  # 2e600: beyond float64, truly
    h = acc.Histograms("huge")[0].histogram_value
    assert (h.min, h.max) == (pytest.approx(-3e38), pytest.approx(3e38))
    assert h.sum == pytest.approx(0.0, abs=1e32) and h.sum_squares == pytest.approx(2e76 + 18e76, rel=1e-6)
    assert (h.bucket[0], h.bucket[-1]) == (1, 1)
    big = acc.Histograms("all_big")[0].histogram_value
    assert big.min < 1e38 < big.max and big.sum_squares == pytest.approx(6e76, rel=1e-6)
