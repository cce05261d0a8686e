"""Batch normalization with PyTorch's semantics: :class:`BatchNorm2d` and :class:`BatchNorm1d`.

Parameters are ``nnx.Param`` (``scale``, ``bias``: PyTorch's ``weight`` and
``bias``) and the running statistics ``nnx.BatchStat`` (``mean``, ``var``).
A training forward pass writes the new running statistics into the
``BatchStat`` variables; NNX allows that only at the trace level the
variable was made in, so inside ``jax.grad`` build the model with
``nnx.merge(graphdef, params, rest, copy=True)`` (a plain merge reuses the
outer variables and raises ``TraceContextError``), then return
``nnx.state(model, nnx.BatchStat)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.arguments import check_floating, check_positive

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(nnx.Module):
    """Batch normalization over the last (channel) axis, with PyTorch's semantics.

    Training mode normalizes with the batch mean and biased variance and
    updates ``running = (1 - momentum) * running + momentum * batch`` with the
    *unbiased* batch variance, as PyTorch does (``nnx.BatchNorm`` uses the
    biased one and the opposite momentum convention). Eval mode normalizes
    with the running statistics. Statistics are computed in float32.
    """

    _ndims: tuple[int, ...] = ()
    _shape_text = ""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, rngs: nnx.Rngs | None = None):
        del rngs  # initial values are deterministic (ones and zeros); kept for a uniform signature
        check_positive(num_features=num_features)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ConfigError(
                f"momentum={momentum!r} must be a float in [0, 1] (PyTorch's momentum=None is not supported)"
            )
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise ConfigError(f"eps={eps!r} must be a positive float")
        self.num_features = int(num_features)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))  # PyTorch's weight
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))  # running_mean
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))  # running_var

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: ``use_running_average=True`` is eval mode."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` per channel (its last axis); updates running stats in training mode.

        Raises:
            ConfigError: for a wrong input shape, or a training batch with one
                value per channel (as PyTorch).
        """
        name = type(self).__name__
        if x.ndim not in self._ndims or x.shape[-1] != self.num_features:
            raise ConfigError(f"{name}({self.num_features}) needs input of shape {self._shape_text}, got {x.shape}")
        check_floating(x, name)
        axes = tuple(range(x.ndim - 1))
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            count = math.prod(x.shape[:-1])
            if count < 2:
                raise ConfigError(f"{name} in training mode needs more than 1 value per channel, got input {x.shape}")
            mean = xf.mean(axis=axes)
            var = jnp.square(xf - mean).mean(axis=axes)  # biased, used to normalize
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient((1.0 - m) * self.mean[...] + m * mean)
            unbiased = var * (count / (count - 1))
            self.var[...] = jax.lax.stop_gradient((1.0 - m) * self.var[...] + m * unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of ``(B, H, W, C)`` feature maps. Counterpart of ``torch.nn.BatchNorm2d``.

    ``scale``/``bias`` are ``nnx.Param`` (PyTorch's ``weight``/``bias``),
    ``mean``/``var`` are ``nnx.BatchStat`` (``running_mean``/``running_var``).

    Args:
        num_features: number of channels ``C``.
        momentum: PyTorch's convention, weight of the new batch in the running stats.
        eps: added to the variance for stability.
        rngs: unused (initial values are ones and zeros); accepted for a uniform signature.

    Raises:
        ConfigError: for a non-positive ``num_features``, ``momentum`` outside
            ``[0, 1]`` or a non-positive ``eps``.

    >>> bn = BatchNorm2d(3)
    >>> bn(jnp.ones((2, 4, 4, 3))).shape
    (2, 4, 4, 3)
    """

    _ndims = (4,)
    _shape_text = "(B, H, W, C)"


class BatchNorm1d(_BatchNorm):
    """Batch normalization of ``(B, C)`` or ``(B, L, C)`` input. Counterpart of ``torch.nn.BatchNorm1d``.

    Channels are last: PyTorch's ``(B, C, L)`` is ``(B, L, C)`` here. Arguments,
    variables and errors are :class:`BatchNorm2d`'s.

    >>> BatchNorm1d(5)(jnp.ones((8, 5))).shape
    (8, 5)
    """

    _ndims = (2, 3)
    _shape_text = "(B, C) or (B, L, C)"
