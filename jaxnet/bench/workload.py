"""What one benchmark row trains: a model, a batch size, an optimizer, and the batches.

Every variant (PyTorch eager, ``torch.compile``, jaxnet jit, jaxnet scan, and
their bf16 forms) of a :class:`Workload` starts from the same weights and sees
the same batches in the same order: a pool of ``pool_size`` synthetic batches,
generated here from a numpy seed (so a subprocess regenerates exactly the same
numbers without receiving them), cycled through. Synthetic data keeps the
measurement about compute; real-data training is :mod:`jaxnet.bench.accuracy`'s job.

Which variants a workload runs depends on the device (:func:`default_variants`,
:func:`check_variants`): flushing denormals is a CPU setting, and the
``cifar_speed`` net (airbench94's, trained by its own recipe step) has no
whole-epoch ``lax.scan`` form. This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxnet.errors import ConfigError

__all__ = [
    "BF16_VARIANTS",
    "CPU_ONLY_VARIANTS",
    "CPU_VARIANTS",
    "CUDA_VARIANTS",
    "DEFAULT_PLAN",
    "DEVICES",
    "FULL_PLAN",
    "JAX_VARIANTS",
    "QUICK_PLAN",
    "SPEED_MODEL",
    "SPEED_WIDTHS",
    "TORCH_VARIANTS",
    "STEPS",
    "VARIANTS",
    "Workload",
    "check_variants",
    "default_steps",
    "default_variants",
    "make_batch_pool",
    "make_workload",
    "model_info",
]

VARIANTS = (
    "torch-eager",
    "torch-eager-ftz",
    "torch-compile",
    "torch-compile-max",
    "torch-bf16",
    "jax-jit",
    "jax-scan",
    "jax-jit-bf16",
)
TORCH_VARIANTS = ("torch-eager", "torch-eager-ftz", "torch-compile", "torch-compile-max", "torch-bf16")
JAX_VARIANTS = ("jax-jit", "jax-scan", "jax-jit-bf16")
BF16_VARIANTS = ("torch-bf16", "jax-jit-bf16")  # bfloat16 compute, float32 parameters
CPU_ONLY_VARIANTS = ("torch-eager-ftz",)  # torch.set_flush_denormal is a CPU setting

DEVICES = ("cpu", "cuda")  # where both frameworks run (jaxnet.bench.machine.select_device)
# The default variants per device. On the CPU the new ones (max-autotune, bf16) are opt-in with
# --variants, so that the default run takes no longer than it did before they existed.
CPU_VARIANTS = ("torch-eager", "torch-eager-ftz", "torch-compile", "jax-jit", "jax-scan")
CUDA_VARIANTS = ("torch-eager", "torch-compile", "torch-compile-max", "torch-bf16", "jax-jit", "jax-jit-bf16")

SPEED_MODEL = "cifar_speed"  # trained with jaxnet.speedrun's step and its PyTorch twin, not a tutorial loop
SPEED_WIDTHS = (64, 256, 256)  # the published net's (jaxnet.models.cifar_speed.WIDTHS, without importing jax)

# Facts about the registered models that the PyTorch side needs too
# (jaxnet.models.MODELS holds the same input shapes and outputs).
_MODEL_INFO: dict[str, tuple[tuple[int, ...], str, int]] = {
    # name: (input shape of one example, output kind, training examples of its data set)
    "mlp": ((28, 28, 1), "logits", 60000),
    "mlp512": ((28, 28, 1), "logits", 60000),
    "mlp128": ((28, 28, 1), "logits", 60000),
    "convnet": ((28, 28, 1), "log_probs", 60000),
    "cifar_cnn": ((32, 32, 3), "logits", 50000),
    "cifar_speed": ((32, 32, 3), "logits", 50000),
    "linear": ((1,), "regression", 4),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One row group of the benchmark: the same training run for every variant."""

    model: str  # jaxnet model name (jaxnet.models.MODELS)
    batch_size: int  # examples per step
    steps: int  # steps per timed repeat; also the length of the jax-scan epoch
    optimizer: str  # jaxnet.optim / torch.optim name
    lr: float  # learning rate (constant)
    momentum: float = 0.0  # SGD / RMSprop momentum
    pool_size: int = 8  # distinct batches, cycled
    seed: int = 0  # seed of the weights and of the batches
    widths: tuple[int, int, int] = SPEED_WIDTHS  # cifar_speed's conv groups only (smaller in tests)

    def __post_init__(self):
        # to_dict's JSON turns the tuple into a list; a Workload rebuilt from it must equal the original
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, NHWC for images."""
        return model_info(self.model)[0]

    @property
    def output(self) -> str:
        """``logits``, ``log_probs`` or ``regression`` (picks the loss)."""
        return model_info(self.model)[1]

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one epoch of the model's real data set at this batch size."""
        return max(1, model_info(self.model)[2] // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (subprocesses are given workloads this way)."""
        return dataclasses.asdict(self)


def model_info(name: str) -> tuple[tuple[int, ...], str, int]:
    """``(input_shape, output, train_examples)`` of a registered model, without importing jax.

    Raises:
        ConfigError: for an unknown model name.
    """
    if name not in _MODEL_INFO:
        raise ConfigError(f"unknown model {name!r} for the benchmark; valid names: {', '.join(_MODEL_INFO)}")
    return _MODEL_INFO[name]


def make_workload(
    model: str, batch_size: int, steps: int, *, seed: int = 0, widths: tuple[int, int, int] = SPEED_WIDTHS
) -> Workload:
    """A workload with the model's tutorial optimizer (``jaxnet.recipes``) at a constant rate.

    ``cifar_speed`` records its ``jaxnet.recipes`` summary (SGD, the default
    group's rate) but trains with the whole speedrun recipe
    (:class:`jaxnet.speedrun.SpeedrunRecipe`: grouped Nesterov SGD, the
    triangle schedule), with conv groups of ``widths`` channels.

    Raises:
        ConfigError: unknown model, or sizes below 1.
    """
    from jaxnet.recipes import RECIPES

    model_info(model)
    if batch_size < 1 or steps < 1:
        raise ConfigError(f"batch size ({batch_size}) and steps ({steps}) must be at least 1")
    if len(widths) != 3 or min(widths) < 1:
        raise ConfigError(f"widths must be three positive channel counts, got {widths}")
    recipe = RECIPES[model]
    return Workload(model, batch_size, steps, recipe.optimizer, recipe.lr, recipe.momentum, seed=seed, widths=widths)


def default_variants(model: str, device: str) -> tuple[str, ...]:
    """The variants a workload runs when ``--variants`` is not given.

    >>> default_variants("cifar_speed", "cpu")
    ('torch-eager', 'torch-eager-ftz', 'torch-compile', 'jax-jit')
    """
    variants = CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS
    return tuple(v for v in variants if not (model == SPEED_MODEL and v == "jax-scan"))


def check_variants(variants: Sequence[str], model: str, device: str) -> None:
    """Refuses variants that do not exist, or that the model or the device cannot run.

    Raises:
        ConfigError: an unknown name, an empty list, ``torch-eager-ftz`` on
            cuda, or ``jax-scan`` for ``cifar_speed``.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    cpu_only = [v for v in variants if v in CPU_ONLY_VARIANTS]
    if device != "cpu" and cpu_only:
        raise ConfigError(
            f"{', '.join(cpu_only)} runs on the CPU only: flushing denormals (torch.set_flush_denormal) is a "
            f"CPU setting; drop it from --variants or pass --device cpu"
        )
    if model == SPEED_MODEL and "jax-scan" in variants:
        raise ConfigError(
            "jax-scan is not offered for cifar_speed: its recipe step (jaxnet.speedrun.make_speedrun_step) "
            "runs one call per step; use jax-jit (or jax-jit-bf16)"
        )


def make_batch_pool(workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """The workload's synthetic batches, identical in every process.

    Images are standard-normal float32 (already "normalized"), labels uniform
    class ids; for regression, ``x ~ U(0, 4)`` and ``y = 2x`` as in the
    autograd tutorial. ``cifar_speed`` gets uint8 pixels, as its recipe step
    normalizes on the device (its PyTorch side normalizes the same pixels on
    the host).

    Returns:
        ``(images, labels)``: ``(pool_size, B, *input_shape)`` float32 NHWC
        (uint8 for ``cifar_speed``) and ``(pool_size, B)`` int32 class ids
        (float32 targets for regression).
    """
    rng = np.random.default_rng([workload.seed, workload.batch_size])
    k, b = workload.pool_size, workload.batch_size
    if workload.output == "regression":
        x = rng.uniform(0.0, 4.0, size=(k, b, *workload.input_shape)).astype(np.float32)
        return x, (2.0 * x[..., 0]).astype(np.float32)
    images: np.ndarray
    if workload.model == SPEED_MODEL:
        images = rng.integers(0, 256, size=(k, b, *workload.input_shape), dtype=np.uint8)
    else:
        images = rng.standard_normal((k, b, *workload.input_shape), dtype=np.float32)
    labels = rng.integers(0, 10, size=(k, b), dtype=np.int32)
    return images, labels


# Steps per timed repeat (also the jax-scan length), sized so that the slowest
# variant's repeat takes about 0.3-3 s on the 2-core development CPU.
STEPS: dict[tuple[str, int], int] = {
    ("linear", 4): 1000,
    ("mlp", 64): 100,
    ("mlp", 512): 16,
    ("mlp512", 64): 100,
    ("mlp128", 32): 20,
    ("mlp128", 64): 100,
    ("convnet", 64): 2,
    ("cifar_cnn", 100): 8,
    ("cifar_speed", 512): 2,
}
# (model, batch size) pairs of each run mode; cifar_speed is in none (seconds per step on a CPU).
QUICK_PLAN: tuple[tuple[str, int], ...] = (("mlp128", 32),)
DEFAULT_PLAN: tuple[tuple[str, int], ...] = (
    ("linear", 4),
    ("mlp", 64),
    ("mlp512", 64),
    ("convnet", 64),
    ("cifar_cnn", 100),
)
FULL_PLAN: tuple[tuple[str, int], ...] = (
    ("linear", 4),
    ("mlp", 64),
    ("mlp", 512),
    ("mlp512", 64),
    ("convnet", 64),
    ("cifar_cnn", 100),
)


def default_steps(model: str, batch_size: int) -> int:
    """Steps per repeat from :data:`STEPS`, scaled by batch size for pairs it does not list."""
    if (model, batch_size) in STEPS:
        return STEPS[(model, batch_size)]
    known = [(b, s) for (m, b), s in STEPS.items() if m == model]
    if not known:
        return 20
    b, s = known[0]
    return max(2, s * b // batch_size)
