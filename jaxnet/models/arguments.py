"""Checks of the layers' PyTorch-style arguments and inputs, made where the layer is built or called.

Shared by :mod:`jaxnet.models.layers`, :mod:`jaxnet.models.pooling` and
:mod:`jaxnet.models.normalization`; each raises ``ConfigError`` (or
``TypeError``) naming the bad value and the fix, outside ``jit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]  # ((top, bottom), (left, right))


def to_pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> Pair:
    """Normalizes PyTorch's ``int or (int, int)`` argument to a pair."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ConfigError(f"{name}={value!r} must be an int or a pair of ints, e.g. {name}=3 or {name}=(3, 3)")
    if any(v < minimum for v in pair):
        raise ConfigError(f"{name}={value!r} must be >= {minimum}")
    return int(pair[0]), int(pair[1])


def check_positive(**values: int) -> None:
    """Raises ``ConfigError`` naming the first of ``values`` (a size, a channel count) that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive int")


def check_floating(x: jax.Array, layer: str) -> None:
    """Raises ``TypeError`` if ``x``, the input of ``layer``, is not floating point (e.g. raw uint8 pixels)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer} got an input of dtype {x.dtype}; it needs floating point input, "
            "e.g. images.astype(jnp.float32) / 255"
        )
