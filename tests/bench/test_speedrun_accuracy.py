"""Time to 94% for the speedrun: the verdict from a whole run, both frameworks, the curve's last point."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from jaxnet.bench import speedrun_accuracy
from jaxnet.bench.speedrun_accuracy import SPEEDRUN_VARIANTS, speedrun_time_to_accuracy
from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError
from jaxnet.speedrun import SpeedrunRecipe

TINY = SpeedrunRecipe(widths=(8, 16, 12), batch_size=32, epochs=1.0, whiten_images=128, eval_batch_size=64)


def tiny_data(n: int = 128, m: int = 64) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(
        name="cifar10",
        train_images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 10, n).astype(np.int32),
        test_images=rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 10, m).astype(np.int32),
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        source="synthetic",
    )


def fake_run(tta_accuracy: float):
    def run(data, *, recipe, seed, progress, curve):
        assert recipe.precision in ("fp32", "bf16")
        return types.SimpleNamespace(
            accuracy=0.9, tta_accuracy=tta_accuracy, train_seconds=10.0, tta_seconds=2.0, steps=7, curve=[(4.0, 3, 0.5)]
        )

    return run


@pytest.mark.parametrize(("accuracy", "reached"), [(0.9412, True), (0.9399, False)])
def test_the_verdict_is_the_whole_runs_tta_accuracy_against_the_target(monkeypatch, accuracy, reached):
    monkeypatch.setattr(speedrun_accuracy, "train_speedrun", fake_run(accuracy))
    out = speedrun_time_to_accuracy(tiny_data(), "jax-jit", recipe=TINY)
    assert out["reached"] is reached and out["final_accuracy"] == accuracy and out["accuracy_no_tta"] == 0.9
    assert out["seconds"] == (12.0 if reached else None) and out["steps"] == (7 if reached else None)
    assert out["curve"] == [[4.0, 3, 0.5], [12.0, 7, accuracy]]  # the epochs' points, then the final one
    assert out["model"] == "cifar_speed" and out["target"] == 0.94 and out["stopped"] == "recipe done (1 epochs)"


def test_bf16_variants_set_the_recipes_precision(monkeypatch):
    seen = []

    def run(data, *, recipe, seed, progress, curve):
        seen.append(recipe.precision)
        return fake_run(0.5)(data, recipe=recipe, seed=seed, progress=progress, curve=curve)

    monkeypatch.setattr(speedrun_accuracy, "train_speedrun", run)
    speedrun_time_to_accuracy(tiny_data(), "jax-jit-bf16", recipe=TINY)
    speedrun_time_to_accuracy(tiny_data(), "jax-jit", recipe=dataclasses.replace(TINY, precision="bf16"))
    assert seen == ["bf16", "fp32"]


def test_bad_variant_and_target_are_refused():
    with pytest.raises(ConfigError, match="jax-jit, jax-jit-bf16"):
        speedrun_time_to_accuracy(tiny_data(), "jax-scan")
    with pytest.raises(ConfigError, match="target"):
        speedrun_time_to_accuracy(tiny_data(), "jax-jit", target=94)


@pytest.mark.parametrize("variant", ["jax-jit", "torch-eager"])
def test_a_real_tiny_run_on_each_framework(variant):
    if SPEEDRUN_VARIANTS[variant][0] == "torch":
        pytest.importorskip("torch")
    out = speedrun_time_to_accuracy(tiny_data(), variant, recipe=TINY, target=0.01, progress=False)
    assert out["reached"] and out["steps"] == 4 and 0 < out["seconds"]
    assert out["curve"][0][1] == 4 and out["curve"][-1] == [out["seconds"], 4, out["final_accuracy"]]
    assert out["seconds"] == pytest.approx(out["train_seconds"] + out["tta_seconds"], abs=2e-3)


def test_a_bad_recipe_is_refused_before_training_with_what_to_change():
    from jaxnet.speedrun import train_speedrun

    for bad, match in (
        ({"lookahead_examples": 0}, "lookahead_examples must be >= 1"),
        ({"epochs": 0.0}, "epochs must be > 0"),
        ({"batch_size": 129}, r"batch_size 129 must be in 1\.\.128"),
    ):
        with pytest.raises(ConfigError, match=match):
            train_speedrun(tiny_data(), recipe=dataclasses.replace(TINY, **bad), progress=False)
