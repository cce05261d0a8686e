"""Real-data runs with the CLI, as a user would start them: the issue's accuracy bars.

These are the slow tests (marked ``slow``); CI runs them. Each starts
``python -m jaxnet train`` in a fresh process on the real MNIST / CIFAR-10
files beside the repository.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import run_jaxnet


def train(*args: str, timeout: int = 1800, env: dict | None = None) -> tuple[dict, list[dict], float]:
    """Runs ``jaxnet train ... --json``; returns (summary, per-epoch records, wall seconds)."""
    start = time.perf_counter()
    proc = run_jaxnet("train", "--json", "--no-progress", *args, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    return summary, epochs, wall


def test_readme_main_job_offline_on_embedded_sample(tmp_path):
    """The README's first command: default model, no network, nothing cached."""
    summary, _, wall = train("--no-download", env={"XDG_CACHE_HOME": str(tmp_path), "JAXNET_DATA_DIR": ""})
    assert "embedded MNIST sample" in summary["dataset_source"]
    assert summary["test_accuracy"] >= 0.90
    assert wall < 120


@pytest.mark.slow
def test_mlp_reaches_98_percent_in_5_epochs(shared_data, tmp_path):
    summary, _, _ = train("--model", "mlp", "--data-dir", str(shared_data), "--workdir", str(tmp_path))
    assert summary["epochs"] == 5 and summary["steps"] == 5 * (60000 // 64)
    assert summary["test_accuracy"] >= 0.980, summary
    assert summary["steady_state_compilations"] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "epoch"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_convnet_reaches_99_percent_in_5_epochs(shared_data):
    summary, _, _ = train("--model", "convnet", "--data-dir", str(shared_data))
    assert summary["epochs"] == 5
    assert summary["test_accuracy"] >= 0.990, summary


@pytest.mark.slow
def test_cifar_cnn_reaches_55_percent_in_10_epochs(shared_data):
    summary, _, _ = train("--model", "cifar_cnn", "--data-dir", str(shared_data))
    assert summary["epochs"] == 10 and summary["steps"] == 10 * (50000 // 100)
    assert summary["test_accuracy"] >= 0.55, summary
    assert "cifar-10" in summary["dataset_source"].lower()


@pytest.mark.slow
def test_memory_stays_flat_over_20_epochs(shared_data, tmp_path):
    """Peak RSS after epoch 20 is within 5% of the peak after epoch 2 (no growth)."""
    train(
        "--model",
        "mlp",
        "--data-dir",
        str(shared_data),
        "--epochs",
        "20",
        "--batch-size",
        "256",
        "--workdir",
        str(tmp_path),
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rss = {r["epoch"]: r["peak_rss_mb"] for r in records if r["split"] == "epoch"}
    assert len(rss) == 20
    assert rss[20] <= 1.05 * rss[2], rss
