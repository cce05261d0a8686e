"""Learning-rate schedules by name, with ``torch.optim.lr_scheduler``'s formulas.

:func:`create_schedule` returns an optax schedule, a pure function of the
optimizer step count, for ``jaxnet.optim.create_optimizer(...,
learning_rate=)``. torch steps its schedulers from the training loop (per
epoch for ``StepLR``/``ExponentialLR`` in the tutorials); here the epoch is
derived from the step as ``step // steps_per_epoch``, so the schedule needs
no state of its own and resumes exactly from a checkpoint's step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError

__all__ = ["SCHEDULES", "WARMUP_FRACTION", "create_schedule"]

SCHEDULES = ("constant", "step", "exponential", "cosine", "warmup_cosine")
# Default warm-up of "warmup_cosine": this share of the run's steps (at least one).
WARMUP_FRACTION = 0.05


def create_schedule(
    name: str,
    base_lr: float,
    *,
    steps_per_epoch: int,
    epochs: int | None = None,
    step_size: int | None = None,
    gamma: float = 0.1,
    warmup_steps: int | None = None,
    warmup_epochs: float | None = None,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """A learning-rate schedule of the optimizer *step* count, torch's formulas.

    Counterparts of ``torch.optim.lr_scheduler``. torch schedulers are
    stepped by the training loop (per epoch for ``StepLR``/``ExponentialLR``
    in the tutorials); an optax schedule is a pure function of the update
    count, so epochs are derived as ``epoch = step // steps_per_epoch``:

    * ``constant``: ``base_lr``.
    * ``step``: ``StepLR``, ``base_lr * gamma ** (epoch // step_size)``.
    * ``exponential``: ``ExponentialLR``, ``base_lr * gamma ** epoch``.
    * ``cosine``: ``CosineAnnealingLR(T_max=epochs * steps_per_epoch,
      eta_min=end_lr)`` stepped per step; held at ``end_lr`` after ``T_max``.
    * ``warmup_cosine``: linear warm-up from 0 to ``base_lr`` over the first
      ``warmup_steps`` steps (or ``warmup_epochs`` epochs; by default
      :data:`WARMUP_FRACTION` of the run, at least one step), then cosine to
      ``end_lr`` at ``epochs * steps_per_epoch`` (torch: ``SequentialLR`` of
      ``LinearLR`` and ``CosineAnnealingLR``). A warm-up of 0 is ``cosine``.

    Args:
        name: one of :data:`SCHEDULES`.
        base_lr: the initial (peak, for warm-up) learning rate.
        steps_per_epoch: optimizer steps in one epoch.
        epochs: length of the run; required by ``cosine`` and ``warmup_cosine``.
        step_size: epochs between decays; required by ``step``.
        gamma: decay factor of ``step`` and ``exponential``.
        warmup_steps: steps of linear warm-up (``warmup_cosine`` only).
        warmup_epochs: the warm-up in epochs instead, rounded to whole steps
            (``warmup_cosine`` only; not together with ``warmup_steps``).
        end_lr: final learning rate of the cosine schedules (torch ``eta_min``).

    Returns:
        ``schedule(step) -> lr``, usable as ``create_optimizer(..., learning_rate=)``.

    Raises:
        ConfigError: unknown name, or a missing or invalid argument.

    >>> schedule = create_schedule("step", 0.1, steps_per_epoch=100, step_size=30)
    >>> round(float(schedule(3000)), 6)  # epoch 30: 0.1 * 0.1
    0.01
    >>> warm = create_schedule("warmup_cosine", 0.1, steps_per_epoch=100, epochs=10)  # 50 warm-up steps
    >>> [round(float(warm(s)), 6) for s in (0, 25, 50)]
    [0.0, 0.05, 0.1]
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if not base_lr >= 0.0:
        raise ConfigError(f"base_lr must be >= 0; got {base_lr}")
    if not (isinstance(steps_per_epoch, int) and steps_per_epoch > 0):
        raise ConfigError(f"steps_per_epoch must be a positive int; got {steps_per_epoch!r}")
    if name != "warmup_cosine" and (warmup_steps is not None or warmup_epochs is not None):
        what = "warmup_steps" if warmup_steps is not None else "warmup_epochs"
        raise ConfigError(f"{what} applies to schedule 'warmup_cosine', not {name!r}; drop it or use warmup_cosine")
    if name == "constant":
        return lambda count: jnp.full(jnp.shape(count), base_lr, jnp.float32)
    if name in ("step", "exponential"):
        return _epoch_decay(name, base_lr, steps_per_epoch, step_size, gamma)
    if not (isinstance(epochs, int) and epochs > 0):
        raise ConfigError(f"schedule {name!r} needs epochs=, a positive int; got {epochs!r}")
    total = epochs * steps_per_epoch
    if name == "cosine":
        return _cosine(base_lr, end_lr, total)
    warmup = _warmup_steps(warmup_steps, warmup_epochs, steps_per_epoch, total)
    if warmup == 0:
        return _cosine(base_lr, end_lr, total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup, decay_steps=total, end_value=end_lr
    )


def _warmup_steps(warmup_steps: int | None, warmup_epochs: float | None, steps_per_epoch: int, total: int) -> int:
    """The warm-up of ``warmup_cosine`` in steps: given in steps or epochs, else a share of the run."""
    if warmup_steps is not None and warmup_epochs is not None:
        raise ConfigError(f"give warmup_steps or warmup_epochs, not both; got {warmup_steps} and {warmup_epochs}")
    if warmup_epochs is not None:
        if not (isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs * steps_per_epoch < total):
            raise ConfigError(
                f"warmup_epochs must be in [0, {total / steps_per_epoch:g}) (the run's epochs); got {warmup_epochs!r}"
            )
        return round(warmup_epochs * steps_per_epoch)
    if warmup_steps is None:  # the default: a short warm-up, never the whole run
        return min(max(1, round(WARMUP_FRACTION * total)), total - 1)
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < total):
        raise ConfigError(f"warmup_steps must be in [0, {total}) (epochs * steps_per_epoch); got {warmup_steps!r}")
    return warmup_steps


def _epoch_decay(
    name: str, base_lr: float, steps_per_epoch: int, step_size: int | None, gamma: float
) -> optax.Schedule:
    """``StepLR``/``ExponentialLR`` as a function of the step count."""
    if not gamma > 0.0:
        raise ConfigError(f"gamma must be > 0; got {gamma}")
    every = steps_per_epoch  # ExponentialLR: decays every epoch
    if name == "step":
        if not (isinstance(step_size, int) and step_size > 0):
            raise ConfigError(
                f"schedule 'step' needs step_size=, a positive int of epochs; "
                f"got {step_size!r}. E.g. step_size=30 like StepLR(step_size=30)"
            )
        every = steps_per_epoch * step_size

    def schedule(count: jax.Array) -> jax.Array:
        decays = (jnp.asarray(count) // every).astype(jnp.float32)
        return jnp.float32(base_lr) * jnp.float32(gamma) ** decays

    return schedule


def _cosine(base_lr: float, end_lr: float, total: int) -> Callable[[jax.Array], jax.Array]:
    """``CosineAnnealingLR(T_max=total, eta_min=end_lr)``'s closed form, clamped at ``total``."""

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.minimum(jnp.asarray(count), total).astype(jnp.float32)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * t / total))
        return jnp.float32(end_lr) + jnp.float32(base_lr - end_lr) * cosine

    return schedule
