"""Test-time augmentation: a classifier's logits averaged over mirrored and translated views.

airbench's three levels (Jordan, arXiv 2404.00498, section 3.7), with
``mirror(x) = mean(net(x), net(flip(x)))``:

- level 0: ``net(x)``;
- level 1: ``mirror(x)``;
- level 2: ``0.5 * mirror(x) + 0.5 * mean(mirror(t1), mirror(t2))``, where
  ``t1``/``t2`` are ``x`` reflect-padded by 1 pixel and cropped at offsets
  ``(0, 0)`` and ``(2, 2)`` (shifted by one pixel down-right and up-left):
  six forward passes.

Views are taken of whatever the model is fed; flips and reflection padding
commute with per-channel normalization, so raw uint8 images work with a
``predict`` that normalizes (:func:`jaxnet.step.make_predict_fn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.data.augmentation import flip, reflect_crop
from jaxnet.errors import ConfigError

__all__ = ["TTA_LEVELS", "make_tta_predict", "tta_accuracy", "tta_logits", "tta_views"]

TTA_LEVELS = (0, 1, 2)


def tta_views(images: jax.Array, level: int) -> list[tuple[float, jax.Array]]:
    """The weighted views whose weighted sum of logits is the TTA logits of ``level``.

    Args:
        images: ``(B, H, W, C)``.
        level: 0, 1 or 2 (see the module docstring).

    Returns:
        ``[(weight, view), ...]``, weights summing to 1: ``[(1, x)]``,
        ``[(1/2, x), (1/2, flip x)]``, or ``x`` and ``flip x`` at 1/4 and the
        two translations and their flips at 1/8.

    Raises:
        ConfigError: for another level.

    >>> [w for w, _ in tta_views(jnp.zeros((1, 4, 4, 1)), 2)]
    [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    """
    if level not in TTA_LEVELS:
        raise ConfigError(f"tta level must be one of {TTA_LEVELS} (none, mirror, mirror + translate); got {level!r}")
    every = jnp.ones((jnp.shape(images)[0],), bool)

    def mirrored(x: jax.Array, weight: float) -> list[tuple[float, jax.Array]]:
        return [(weight / 2, x), (weight / 2, flip(x, every))]

    if level == 0:
        return [(1.0, images)]
    if level == 1:
        return mirrored(images, 1.0)
    shifted = [reflect_crop(images, 1, 0, 0), reflect_crop(images, 1, 2, 2)]  # one pixel down-right, up-left
    return mirrored(images, 0.5) + mirrored(shifted[0], 0.25) + mirrored(shifted[1], 0.25)


def tta_logits(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array, level: int = 2) -> jax.Array:
    """The TTA logits of ``level``: the weighted mean of ``apply_fn`` over :func:`tta_views`.

    Each view is one call of ``apply_fn`` (the views are not concatenated,
    so peak memory is that of one batch); the sum is taken in float32.

    Args:
        apply_fn: ``images (B, H, W, C) -> logits (B, K)``, the model in eval mode.
        images: ``(B, H, W, C)``.
        level: 0, 1 or 2.

    Returns:
        ``(B, K)`` float32 logits.

    Raises:
        ConfigError: for an unknown level.

    >>> tta_logits(lambda x: x.sum(axis=(1, 2)), jnp.ones((2, 4, 4, 3)), level=2).shape
    (2, 3)
    """
    terms = [weight * apply_fn(view).astype(jnp.float32) for weight, view in tta_views(images, level)]
    return functools.reduce(jnp.add, terms)


def make_tta_predict(
    predict: Callable[[Any, jax.Array], jax.Array], level: int = 2, *, compiler_options: dict[str, Any] | None = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """Compiles ``tta_predict(state, images) -> (B, K)`` TTA logits from ``predict(state, images)``.

    Args:
        predict: eval-mode outputs, e.g. :func:`jaxnet.step.make_predict_fn`'s.
        level: 0, 1 or 2.
        compiler_options: XLA options of the compiled function (``jax.jit``'s).

    Returns:
        The jitted function.

    Raises:
        ConfigError: for an unknown level.
    """
    if level not in TTA_LEVELS:
        raise ConfigError(f"tta level must be one of {TTA_LEVELS} (none, mirror, mirror + translate); got {level!r}")
    return jax.jit(
        lambda state, images: tta_logits(lambda x: predict(state, x), images, level), compiler_options=compiler_options
    )


def tta_accuracy(
    predict: Callable[[Any, jax.Array], jax.Array],
    state: Any,
    images: Any,
    labels: Any,
    *,
    level: int = 2,
    batch_size: int = 2000,
    compiler_options: dict[str, Any] | None = None,
) -> float:
    """Top-1 accuracy of the TTA logits over a whole split, in fixed-shape batches (one compile).

    The last batch is padded with copies of the first image and its padded
    rows are not counted. Counterpart of airbench's ``evaluate(model,
    test_loader, tta_level)``.

    Args:
        predict: ``predict(state, images) -> logits``, eval mode.
        state: passed to ``predict`` (a :class:`jaxnet.state.TrainState`).
        images: ``(N, H, W, C)``, as ``predict`` takes them (uint8 if it normalizes).
        labels: ``(N,)`` int class ids.
        level: 0, 1 or 2.
        batch_size: images per compiled call.
        compiler_options: XLA options of the compiled TTA function (see :func:`make_tta_predict`).

    Returns:
        The fraction of correct predictions, in ``[0, 1]``.

    Raises:
        ConfigError: for an unknown level, an empty split, or images and labels of different lengths.
    """
    n = len(labels)
    if n == 0 or len(images) != n:
        raise ConfigError(f"tta_accuracy needs as many images as labels (at least one); got {len(images)} and {n}")
    tta_predict = make_tta_predict(predict, level, compiler_options=compiler_options)
    batch_size = min(batch_size, n)
    correct = jnp.zeros((), jnp.int32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        valid = np.ones(batch_size, bool)
        valid[len(idx) :] = False
        idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        logits = tta_predict(state, jnp.asarray(images[idx]))
        hits = (jnp.argmax(logits, axis=-1) == jnp.asarray(np.asarray(labels)[idx])) & valid
        correct = correct + jnp.sum(hits, dtype=jnp.int32)
    return int(correct) / n
