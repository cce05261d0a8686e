"""benchmarks/checkpoint_overhead.py: the with/without-workdir timing runs and reports."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_quick_run_reports_both_kinds_and_the_overhead(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # embedded sample, offline
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/checkpoint_overhead.py",
            "--no-download",
            "--model",
            "mlp128",
            "--epochs",
            "1",
            "--pairs",
            "1",
            "--in-process",
            "--saves",
            "4",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "overhead (median of per-pair ratios)" in done.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "in-process" and result["pairs"] == 1
    without, with_ = result["runs"]["without"][0], result["runs"]["with"][0]
    assert without["checkpoint_seconds"] == 0.0 and with_["checkpoint_seconds"] > 0
    assert without["test_accuracy"] == with_["test_accuracy"]  # same run, only the workdir differs
    ratio = with_["train_seconds"] / without["train_seconds"]
    assert result["pair_ratios"] == [round(ratio, 4)]
    assert result["overhead_percent"] == round(100 * (ratio - 1), 2)
    costs = result["save_costs"]
    assert set(costs) == {"npz", "orbax"} and all(0 < c["cpu_ms"] < 5000 for c in costs.values())
    assert all(0 < c["blocked_ms"] <= c["write_ms"] for c in costs.values())
    # mlp128: the step, 4 parameters, Adam's count and 8 moments, the RNG key
    assert result["state"]["arrays"] == 15 and result["state"]["mb"] > 0
    assert "mlp128 (15 arrays" in done.stdout and "orbax: blocked in save" in done.stdout


def test_save_costs_only_measures_a_model_of_your_own(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/checkpoint_overhead.py",
            "--save-costs-only",
            "--saves",
            "3",
            "--model",
            "examples.your_model:ResNet",
            "--model-kwargs",
            '{"width": 4}',
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "runs" not in result and set(result["save_costs"]) == {"npz", "orbax"}
    assert result["model_kwargs"] == {"width": 4} and result["state"]["arrays"] > 50


def test_bad_pairs_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "benchmarks/checkpoint_overhead.py", "--pairs", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "--pairs must be >= 1" in done.stderr
    done = subprocess.run(
        [sys.executable, "benchmarks/checkpoint_overhead.py", "--saves", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "--saves must be >= 3" in done.stderr


def test_a_failing_training_run_is_reported_in_one_line():
    done = subprocess.run(
        [sys.executable, "benchmarks/checkpoint_overhead.py", "--model", "nosuch", "--pairs", "1", "--no-download"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "invalid choice: 'nosuch'" in done.stderr
