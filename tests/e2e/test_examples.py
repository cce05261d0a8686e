"""The "your model, your data" examples run end to end (small data; the full runs are in their docstrings)."""

from __future__ import annotations

import numpy as np
import pytest

import jaxnet
from tests.helpers import EXAMPLES


@pytest.fixture()
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_your_model_trains_a_plain_flax_resnet(examples_path, tmp_path):
    import your_model

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 320).astype(np.int32)
    images = (rng.integers(0, 60, (320, 32, 32, 3)) + 18 * labels[:, None, None, None]).astype(np.uint8)
    data = jaxnet.ArrayDataset(
        "cifar10-like", images[:256], labels[:256], images[256:], labels[256:], 10, (0.5,) * 3, (0.25,) * 3, "generated"
    )
    summary = your_model.main(
        ["--epochs", "2", "--batch-size", "32", "--width", "4", "--workdir", str(tmp_path / "w")], data=data
    )
    assert summary["precision"] == "bf16" and summary["epochs_run"] >= 1
    assert 0 <= summary["val_accuracy"] <= 1 and 0 <= summary["test_accuracy"] <= 1
    assert (tmp_path / "w" / "model" / "forward.exported").is_file()  # exportable without its code


def test_tabular_example(examples_path, capsys):
    pytest.importorskip("sklearn")
    import tabular

    summary = tabular.main(["--epochs", "60"])
    assert summary["output"] == "binary" and summary["test_accuracy"] > 0.9
    assert "test accuracy:" in capsys.readouterr().out
