"""benchmarks/mnist_short_schedules.py: a fractional-epoch run ends after the right number of steps."""

import os
import re
import subprocess
import sys

from tests.helpers import BENCHMARKS, REPO


def _run(tmp_path, *args):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # offline: the embedded 6000-image sample
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "mnist_short_schedules.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_fractional_epochs_with_both_decays(tmp_path):
    for decay, optimizer in (("linear", "adam"), ("cosine", "nesterov")):
        done = _run(
            tmp_path,
            "--epochs",
            "1.5",
            "--warmup",
            "0.1",
            "--batch-size",
            "100",
            "--decay",
            decay,
            "--optimizer",
            optimizer,
            "--lr",
            "1e-3" if optimizer == "adam" else "0.05",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        line = done.stdout.strip().splitlines()[-1]
        # 6000 sample images / batch 100 = 60 steps per epoch; 1.5 epochs = 90 steps
        assert "(90 steps)" in line and f"then {decay} to 0" in line, line
        accuracy = float(re.search(r"test accuracy (\d\.\d+)", line).group(1))
        assert 0.5 < accuracy <= 1.0, line  # it learned something in 90 steps


def test_bad_arguments_are_usage_errors(tmp_path):
    done = _run(tmp_path, "--epochs", "0.1", "--warmup", "0.2")
    assert done.returncode == 2 and "--warmup < --epochs" in done.stderr


def test_weight_average_is_evaluated_beside_the_last_weights(tmp_path):
    done = _run(tmp_path, "--epochs", "1.5", "--batch-size", "100", "--lr", "1e-3", "--ema", "0.95")
    assert done.returncode == 0, done.stderr[-2000:]
    last, line = done.stdout.strip().splitlines()[-2:]
    assert "weight average with decay 0.95" in line and "(90 steps)" in line, line
    averaged = float(re.search(r"test accuracy (\d\.\d+)", line).group(1))
    final = float(re.search(r"last weights, not the average: test accuracy (\d\.\d+)", last).group(1))
    assert 0.5 < averaged <= 1.0 and 0.5 < final <= 1.0, (last, line)
    assert _run(tmp_path, "--ema", "1").returncode == 2
