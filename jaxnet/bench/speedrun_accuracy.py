"""Time to 94% on CIFAR-10 for the speedrun (``jaxnet bench --model cifar_speed --tta``): jaxnet vs its PyTorch twin.

The speedrun's schedule is fixed by its length (warm-up and decay over all
of the recipe's steps), so it is not stopped early at the target: each side
runs the whole recipe from the same initial weights and is timed as airbench
times itself, the model build and whitening init, compilation, every step
and the final TTA evaluation on the clock, the optional per-epoch test
evaluations (the curve) off it. The result has the keys of
:func:`jaxnet.bench.accuracy.time_to_accuracy`: ``seconds`` is the whole
run's when its TTA accuracy reaches the target, else ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError
from jaxnet.speedrun import SpeedrunRecipe, train_speedrun

__all__ = ["SPEEDRUN_TARGET", "SPEEDRUN_VARIANTS", "speedrun_time_to_accuracy"]

SPEEDRUN_TARGET = 0.94  # airbench94's: mean test accuracy with TTA
# variant: (framework, precision, torch.compile mode)
SPEEDRUN_VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "jax-jit": ("jax", "fp32", None),
    "jax-jit-bf16": ("jax", "bf16", None),
    "torch-eager": ("torch", "fp32", None),
    "torch-bf16": ("torch", "bf16", None),
    "torch-compile": ("torch", "fp32", "default"),
    "torch-compile-max": ("torch", "fp32", "max-autotune"),
}


def speedrun_time_to_accuracy(
    data: ArrayDataset,
    variant: str,
    *,
    recipe: SpeedrunRecipe | None = None,
    target: float = SPEEDRUN_TARGET,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    curve: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the whole speedrun once with ``variant`` and says whether, and when, it reached ``target``.

    Args:
        data: CIFAR-10, uint8 NHWC (``jaxnet.data.load_dataset("cifar10")``).
        variant: a key of :data:`SPEEDRUN_VARIANTS`.
        recipe: the hyper-parameters (default airbench94's); the variant sets its precision.
        target: TTA test accuracy to reach.
        seed: the initial weights (the same on both sides) and the augmentations.
        device: ``"cpu"`` or ``"cuda"``; the JAX side runs on the default device
            (the caller's ``jax.default_device``), the PyTorch side on this one.
        threads: ``torch.set_num_threads`` on the CPU.
        curve: also test after each epoch (no TTA, clock stopped).
        progress: a tqdm bar over the steps.

    Returns:
        ``{"model": "cifar_speed", "variant", "target", "reached", "seconds",
        "steps", "final_accuracy", "accuracy_no_tta", "curve", "stopped",
        "epochs", "batch_size", "recipe", "train_seconds", "tta_seconds"}``;
        ``curve`` holds ``[seconds, step, accuracy]`` rows, the last one the
        final TTA accuracy at the whole run's seconds.

    Raises:
        ConfigError: an unknown variant or a target outside (0, 1].
    """
    if variant not in SPEEDRUN_VARIANTS:
        raise ConfigError(f"the speedrun's time to accuracy runs {', '.join(SPEEDRUN_VARIANTS)}; not {variant!r}")
    if not 0 < target <= 1:
        raise ConfigError(f"target must be in (0, 1], got {target}")
    framework, precision, compile_mode = SPEEDRUN_VARIANTS[variant]
    recipe = dataclasses.replace(recipe or SpeedrunRecipe(), precision=precision)
    if framework == "jax":
        result = train_speedrun(data, recipe=recipe, seed=seed, progress=progress, curve=curve)
        out = {k: getattr(result, k) for k in ("accuracy", "tta_accuracy", "train_seconds", "tta_seconds", "steps")}
        points = result.curve
    else:
        from jaxnet.bench.speed_torch import train_torch_speedrun

        out = train_torch_speedrun(
            data,
            recipe=recipe,
            seed=seed,
            device=device,
            compile_mode=compile_mode,
            threads=threads,
            curve=curve,
            progress=progress,
        )
        points = out["curve"]
    total = out["train_seconds"] + out["tta_seconds"]
    reached = out["tta_accuracy"] >= target
    return {
        "model": "cifar_speed",
        "variant": variant,
        "target": target,
        "reached": reached,
        "seconds": round(total, 3) if reached else None,
        "steps": out["steps"] if reached else None,
        "final_accuracy": out["tta_accuracy"],
        "accuracy_no_tta": out["accuracy"],
        "curve": [[round(s, 3), n, a] for s, n, a in points] + [[round(total, 3), out["steps"], out["tta_accuracy"]]],
        "stopped": f"recipe done ({recipe.epochs:g} epochs)",
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "recipe": f"airbench94 (jaxnet.speedrun.SpeedrunRecipe), TTA level {recipe.tta_level}",
        "train_seconds": round(out["train_seconds"], 3),
        "tta_seconds": round(out["tta_seconds"], 3),
        "dataset_source": data.source,
    }
