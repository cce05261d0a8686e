"""benchmarks/cifar_speed_steps.py: one tiny run per framework reports a step rate."""

import json
import subprocess
import sys

import pytest

from tests.helpers import HAVE_TORCH, REPO


@pytest.mark.parametrize("framework, precision", [("jax", "fp32"), ("torch", "bf16")])
def test_tiny_run_reports_steps_per_second(framework, precision):
    if framework == "torch" and not HAVE_TORCH:
        pytest.skip("torch is not installed")
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/cifar_speed_steps.py",
            "--framework",
            framework,
            "--precision",
            precision,
            "--widths",
            "4,8,8",
            "--batch-size",
            "8",
            "--steps",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["framework"] == framework and result["precision"] == precision and result["batch_size"] == 8
    assert result["step_s"] > 0 and result["steps_per_s"] == pytest.approx(1 / result["step_s"], rel=1e-2)
    assert result["images_per_s"] == pytest.approx(8 / result["step_s"], rel=1e-2)
