"""Gradient accumulation: one optimizer step per ``k`` micro-batches.

PyTorch accumulates by calling ``loss.backward()`` ``k`` times (gradients add
up in ``.grad``, the loss divided by ``k``) before one ``optimizer.step()``
and ``zero_grad()``. In jaxnet nothing accumulates by side effect, so the
accumulator is optimizer state: ``optax.MultiSteps`` keeps the running mean
of the gradients and applies the wrapped optimizer every ``k``-th call,
returning zero updates in between. ``k`` steps of batch ``B`` then equal one
step of batch ``k * B`` (for models without dropout or batch statistics).
"""

from __future__ import annotations

import operator

import optax

from jaxnet.errors import ConfigError


def with_grad_accumulation(tx: optax.GradientTransformation, every_k: int) -> optax.GradientTransformation:
    """``tx`` applied once every ``every_k`` steps, to the mean of their gradients.

    Counterpart of ``k`` ``loss.backward()`` calls (on ``loss / k``) per
    ``optimizer.step()``. Clipping inside ``tx`` (``create_optimizer(...,
    clip_norm=...)``) clips the accumulated gradient, as
    ``clip_grad_norm_`` before ``optimizer.step()`` does. The state's
    ``step`` still counts micro-steps; a learning-rate schedule inside ``tx``
    counts optimizer steps, so build it with ``steps_per_epoch // every_k``.
    Leftover micro-batches at the end of an epoch carry over into the next.

    Args:
        tx: the optimizer.
        every_k: micro-batches per optimizer step (1 returns ``tx`` itself).

    Returns:
        A ``GradientTransformation`` (state: ``optax.MultiStepsState``).

    Raises:
        ConfigError: if ``every_k`` is not a positive integer.

    >>> import optax, jax.numpy as jnp
    >>> tx = with_grad_accumulation(optax.sgd(0.1), 4)
    >>> type(tx.init({"w": jnp.zeros(2)})).__name__
    'MultiStepsState'
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ConfigError(f"gradient accumulation needs a positive integer number of steps, got {every_k!r}")
    every_k = operator.index(every_k)
    if every_k == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=every_k).gradient_transformation()
