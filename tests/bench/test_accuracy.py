"""jaxnet.bench.accuracy: time to a test accuracy, in jaxnet and in PyTorch, on MNIST."""

from __future__ import annotations

import dataclasses

import pytest

from jaxnet.bench import report
from jaxnet.data import load_dataset
from tests.helpers import needs_torch


@pytest.mark.parametrize("variant", ["jax-jit", pytest.param("torch-eager", marks=needs_torch)])
def test_time_to_accuracy_reaches_an_easy_target(variant):
    from jaxnet.bench.accuracy import time_to_accuracy

    sample = load_dataset("mnist", download=False)
    small = dataclasses.replace(
        sample, train_images=sample.train_images[:3200], train_labels=sample.train_labels[:3200]
    )
    result = time_to_accuracy("mlp512", small, variant, target=0.85, eval_every=10, max_seconds=120, threads=2)
    assert result["reached"], result["curve"]
    assert result["seconds"] > 0 and result["steps"] % 10 == 0 and result["final_accuracy"] >= 0.85
    assert report.validate(result, report.TTA_SCHEMA) == []


@needs_torch
@pytest.mark.slow
def test_time_to_accuracy_on_real_mnist(shared_data):
    from jaxnet.bench.accuracy import time_to_accuracy

    data = load_dataset("mnist", data_dir=shared_data, download=False)
    for variant in ("jax-jit", "torch-eager-ftz"):
        result = time_to_accuracy("mlp", data, variant, max_seconds=300, threads=2)
        # The tutorial recipe (constant lr 1e-3) ends 5 epochs at 97.7-98.2% depending on the seed,
        # in PyTorch as in jaxnet, so 98% is reported ("reached"), not required; the run must
        # still learn the task and report a well-formed curve.
        assert report.validate(result, report.TTA_SCHEMA) == [], result
        assert result["final_accuracy"] >= 0.97, (variant, result["curve"])
        assert result["curve"][-1][1] > result["curve"][0][1]  # steps grow along the curve
