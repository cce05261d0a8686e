"""benchmarks/mnist_short_schedules.py: a fractional-epoch run ends after the right number of steps."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _run(tmp_path, *args):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # offline: the embedded 6000-image sample
    return subprocess.run([sys.executable, "benchmarks/mnist_short_schedules.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_fractional_epochs_with_both_decays(tmp_path):
    for decay, optimizer in (("linear", "adam"), ("cosine", "nesterov")):
        done = _run(tmp_path, "--epochs", "1.5", "--warmup", "0.1", "--batch-size", "100", "--decay", decay,
                    "--optimizer", optimizer, "--lr", "1e-3" if optimizer == "adam" else "0.05")
        assert done.returncode == 0, done.stderr[-2000:]
        line = done.stdout.strip().splitlines()[-1]
        # 6000 sample images / batch 100 = 60 steps per epoch; 1.5 epochs = 90 steps
        assert "(90 steps)" in line and f"then {decay} to 0" in line, line
        accuracy = float(re.search(r"test accuracy (\d\.\d+)", line).group(1))
        assert 0.5 < accuracy <= 1.0, line  # it learned something in 90 steps


def test_bad_arguments_are_usage_errors(tmp_path):
    done = _run(tmp_path, "--epochs", "0.1", "--warmup", "0.2")
    assert done.returncode == 2 and "--warmup < --epochs" in done.stderr
