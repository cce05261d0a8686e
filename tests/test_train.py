"""The fit loop: results, logs, compile accounting and input validation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxnet import create_model, create_optimizer, fit
from jaxnet.data import load_dataset
from jaxnet.data.synthetic import make_linear_regression
from jaxnet.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sample():
    """The embedded MNIST sample (6000 / 1000 real images), cut down for speed."""
    data = load_dataset("mnist", download=False)
    return dataclasses.replace(
        data,
        train_images=data.train_images[:2048],
        train_labels=data.train_labels[:2048],
        test_images=data.test_images[:500],
        test_labels=data.test_labels[:500],
    )


def test_fit_learns_and_reports(sample, tmp_path):
    result = fit(
        create_model("mlp128", seed=0),
        sample,
        create_optimizer("adam", 1e-3),
        epochs=2,
        batch_size=64,
        workdir=tmp_path,
        progress=False,
        log_every=8,
    )
    s = result.summary
    assert s["steps"] == 2 * (2048 // 64) == int(result.state.step)
    assert s["test_accuracy"] > 0.8  # 2048 real MNIST images, 2 epochs
    assert s["steady_state_compilations"] == 0  # epoch 2 reuses every executable
    assert 0 < s["checkpoint_seconds"] < s["train_seconds"]  # two epoch-end saves were waited for
    assert s["compilations"] > 0
    for key in ("test_loss", "test_f1_macro", "test_precision_macro", "test_roc_auc", "test_top5_accuracy"):
        assert key in s
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "epoch"] == [1, 2]
    assert sum(r["split"] == "train" for r in records) == 2 * (32 // 8)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_hold_the_logged_scalars(sample, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(
        create_model("mlp128"),
        sample,
        create_optimizer("sgd", 0.05),
        epochs=1,
        batch_size=128,
        workdir=tmp_path,
        progress=False,
    )
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("epoch/test_accuracy")
    assert [e.step for e in events] == [16]
    assert events[0].value == pytest.approx(result.summary["test_accuracy"], rel=1e-6)
    assert any(tag.startswith("fc") or "kernel" in tag for tag in acc.Tags()["histograms"])


def test_fit_is_reproducible_for_a_seed(sample):
    runs = [
        fit(
            create_model("mlp", seed=1),
            sample,
            create_optimizer("adam", 1e-3),
            epochs=1,
            batch_size=256,
            seed=5,
            progress=False,
        )
        for _ in range(2)
    ]
    assert runs[0].summary["test_loss"] == runs[1].summary["test_loss"]


def test_scan_mode_equals_step_mode(sample):
    kwargs = dict(epochs=2, batch_size=128, seed=3, progress=False)
    step = fit(create_model("mlp512", seed=0), sample, create_optimizer("sgd", 0.05, momentum=0.9), **kwargs)
    scan = fit(create_model("mlp512", seed=0), sample, create_optimizer("sgd", 0.05, momentum=0.9), scan=True, **kwargs)
    assert scan.summary["mode"] == "scan"
    assert scan.summary["steps"] == step.summary["steps"]
    assert scan.summary["test_accuracy"] == pytest.approx(step.summary["test_accuracy"], abs=2e-3)
    assert scan.history[-1]["train_loss"] == pytest.approx(step.history[-1]["train_loss"], rel=1e-4)


def test_linear_regression_recovers_the_line():
    data = make_linear_regression()
    model = create_model("linear", seed=0)
    result = fit(
        model, data, create_optimizer("sgd", 0.01), epochs=1000, batch_size=4, output="regression", progress=False
    )
    assert result.summary["test_accuracy"] is None
    assert result.summary["test_loss"] < 1e-3  # extrapolates to x = 5, 6
    kernel = np.asarray(result.state.params["linear"]["kernel"][...]).ravel()[0]
    assert kernel == pytest.approx(2.0, abs=0.02)


def test_wrong_image_shape_is_a_clear_error(sample):
    with pytest.raises(ConfigError, match=r"cannot take mnist inputs of shape \(28, 28, 1\)"):
        fit(create_model("cifar_cnn"), sample, create_optimizer("sgd", 0.1), epochs=1, batch_size=32, progress=False)


def test_labels_out_of_range_are_a_clear_error(sample):
    bad = dataclasses.replace(sample, train_labels=sample.train_labels.copy())
    bad.train_labels[7] = 10
    with pytest.raises(DataError, match=r"labels range over \[0, 10\].*\[0, 9\]"):
        fit(create_model("mlp"), bad, create_optimizer("sgd", 0.1), epochs=1, batch_size=32, progress=False)


def test_batch_larger_than_data_is_a_clear_error(sample):
    with pytest.raises(ConfigError, match="batch size 4096 is larger than the 2048"):
        fit(create_model("mlp"), sample, create_optimizer("sgd", 0.1), epochs=1, batch_size=4096, progress=False)


def test_no_workdir_means_no_checkpoint_time(sample):
    result = fit(
        create_model("mlp128"), sample, create_optimizer("sgd", 0.05), epochs=1, batch_size=256, progress=False
    )
    assert result.summary["checkpoint_seconds"] == 0.0
