"""The layers of the PyTorch tutorials as Flax NNX modules (NHWC, channels last).

Each layer takes PyTorch's arguments with PyTorch's meaning and initializes
its parameters the way PyTorch does, so a model written with them trains from
scratch like its tutorial. Two layout differences are deliberate, because they
are what XLA prefers: images are ``(B, H, W, C)`` instead of ``(B, C, H, W)``,
and weights are stored input-major (Linear ``(in, out)``, Conv2d ``(kh, kw,
in, out)``). ``jaxnet.interop`` converts to and from PyTorch's layouts.

Train/eval mode is NNX's: ``model.train()`` / ``model.eval()`` (counterparts of
PyTorch's ``model.train()`` / ``model.eval()``) set ``deterministic`` on the
dropout layers and ``use_running_average`` on the batch norms; ``nnx.view(model,
deterministic=True, use_running_average=True)`` gives an eval-mode view without
changing ``model``. The mode is a static attribute, so it is part of the
``graphdef`` returned by ``nnx.split``. Modules start in training mode, as in
PyTorch.

Parameters are ``nnx.Param`` and BatchNorm running statistics ``nnx.BatchStat``;
no layer stores an RNG stream: dropout takes ``rngs`` when called. BatchNorm
updates its statistics in a training forward pass, which needs
``nnx.merge(..., copy=True)`` inside ``jax.grad`` (see
:mod:`jaxnet.models.normalization`).

This module is the one list of the layers: max pooling lives in
:mod:`jaxnet.models.pooling`, batch normalization in
:mod:`jaxnet.models.normalization`, the convolution's implementations in
:mod:`jaxnet.models.conv`, the argument checks in
:mod:`jaxnet.models.arguments`; all are importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models import conv
from jaxnet.models.arguments import Padding, Pair, check_floating, check_positive, to_pair
from jaxnet.models.normalization import BatchNorm1d, BatchNorm2d
from jaxnet.models.pooling import max_pool2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Dropout2d",
    "Linear",
    "conv2d",
    "flatten",
    "max_pool2d",
    "torch_uniform_init",
]


def torch_uniform_init(key: jax.Array, shape: Sequence[int], fan_in: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default for Linear and Conv.

    ``kaiming_uniform_(w, a=sqrt(5))`` on the weight and the bias init in
    ``reset_parameters`` of ``torch.nn.Linear`` / ``torch.nn.Conv2d`` both reduce
    to this bound.

    Args:
        key: PRNG key.
        shape: shape of the array to draw.
        fan_in: number of inputs feeding each output unit (``in_features``,
            or ``in_channels * kh * kw`` for a convolution).
        dtype: floating dtype of the result.

    Returns:
        An array of ``shape`` with values uniform in ``[-b, b)``, ``b = 1/sqrt(fan_in)``
        (all zeros when ``fan_in`` is 0, as in PyTorch).
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return jax.random.uniform(key, tuple(shape), dtype, minval=-bound, maxval=bound)


class Linear(nnx.Module):
    """Fully connected layer ``y = x @ kernel + bias``. Counterpart of ``torch.nn.Linear``.

    ``kernel`` is ``(in_features, out_features)``, the transpose of PyTorch's
    ``weight``. It computes in the input's floating dtype (parameters are cast),
    so a bfloat16 input gives a bfloat16 result from float32 parameters.

    Args:
        in_features: size of the last input axis.
        out_features: size of the last output axis.
        bias: whether to add a learned bias.
        rngs: random streams for initialization (uses ``rngs.params()``).

    Raises:
        ConfigError: if a size is not a positive int.

    >>> layer = Linear(3, 2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 3))).shape
    (4, 2)
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs):
        check_positive(in_features=in_features, out_features=out_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel = nnx.Param(torch_uniform_init(rngs.params(), (in_features, out_features), in_features))
        self.bias = nnx.data(None)
        if bias:
            self.bias = nnx.Param(torch_uniform_init(rngs.params(), (out_features,), in_features))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x`` of shape ``(..., in_features)``."""
        check_floating(x, "Linear")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ConfigError(
                f"Linear({self.in_features}, {self.out_features}) got input of shape {x.shape}; "
                f"the last axis must have size {self.in_features}"
            )
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """Computes a 2-D convolution (cross-correlation, as in ``torch.nn.functional.conv2d``).

    This is the one place the convolution is computed. It runs the
    implementation selected in :mod:`jaxnet.models.conv`: by default
    (``"auto"``) a form of ``lax.conv_general_dilated`` that XLA:CPU runs on
    its fast Eigen kernel, and the plain call elsewhere (GPU/TPU) or when
    ``JAXNET_CONV_IMPL=xla``. All implementations compute the same sums.

    Args:
        x: input, ``(B, H, W, C_in)``.
        kernel: weights, ``(kh, kw, C_in, C_out)`` (HWIO), same dtype as ``x``.
        stride: ``(sh, sw)``.
        padding: explicit zero padding ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)`` spacing between kernel taps.

    Returns:
        ``(B, H_out, W_out, C_out)`` with ``H_out = (H + top + bottom - dh*(kh-1) - 1) // sh + 1``.
    """
    return conv.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)


class Conv2d(nnx.Module):
    """2-D convolution over NHWC images. Counterpart of ``torch.nn.Conv2d``.

    Arguments have PyTorch's names and meaning (zero padding, no groups).
    ``kernel`` is ``(kh, kw, in_channels, out_channels)``; PyTorch's ``weight``
    is ``(out, in, kh, kw)``.

    Args:
        in_channels: channels of the input (its last axis).
        out_channels: channels of the output.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: ``s`` or ``(sh, sw)``.
        padding: ``p`` or ``(ph, pw)`` zeros on each side, or ``'valid'`` (none)
            or ``'same'`` (output as large as the input; stride 1 only, as in
            PyTorch; an odd total goes to the bottom/right).
        dilation: ``d`` or ``(dh, dw)``.
        bias: whether to add a learned bias.
        rngs: random streams for initialization (uses ``rngs.params()``).

    Raises:
        ConfigError: for non-positive sizes, an unknown padding string, or
            ``padding='same'`` with a stride other than 1.

    >>> conv = Conv2d(1, 8, 3, padding=1, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 28, 28, 1))).shape
    (2, 28, 28, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        *,
        bias: bool = True,
        rngs: nnx.Rngs,
    ):
        check_positive(in_channels=in_channels, out_channels=out_channels)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = to_pair(kernel_size, "kernel_size")
        self.stride = to_pair(stride, "stride")
        self.dilation = to_pair(dilation, "dilation")
        self.padding = self._explicit_padding(padding)
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.kernel = nnx.Param(torch_uniform_init(rngs.params(), (kh, kw, in_channels, out_channels), fan_in))
        self.bias = nnx.Param(torch_uniform_init(rngs.params(), (out_channels,), fan_in)) if bias else nnx.data(None)

    def _explicit_padding(self, padding: int | Sequence[int] | str) -> Padding:
        if isinstance(padding, str):
            if padding == "valid":
                return ((0, 0), (0, 0))
            if padding != "same":
                raise ConfigError(f"padding={padding!r} is not valid; use an int, a pair of ints, 'same' or 'valid'")
            if self.stride != (1, 1):
                raise ConfigError(
                    f"padding='same' needs stride 1 (got stride={self.stride}), as in PyTorch; give an int padding"
                )
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return tuple((t // 2, t - t // 2) for t in totals)  # type: ignore[return-value]
        ph, pw = to_pair(padding, "padding", minimum=0)
        return ((ph, ph), (pw, pw))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution to ``x`` of shape ``(B, H, W, in_channels)``."""
        check_floating(x, "Conv2d")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ConfigError(
                f"Conv2d({self.in_channels}, {self.out_channels}) got input of shape {x.shape}; "
                f"it needs (B, H, W, {self.in_channels}) (channels last, unlike PyTorch's NCHW)"
            )
        kernel = self.kernel[...].astype(x.dtype)
        y = conv2d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def flatten(x: jax.Array) -> jax.Array:
    """Flattens all axes but the first: ``(B, ...) -> (B, prod(...))``.

    Counterpart of ``torch.flatten(x, 1)`` / ``torch.nn.Flatten()``. On NHWC
    feature maps the order is (H, W, C), not PyTorch's (C, H, W);
    ``jaxnet.interop`` permutes the next Linear's weights accordingly.

    >>> flatten(jnp.zeros((2, 3, 4, 5))).shape
    (2, 60)
    """
    return x.reshape(x.shape[0], -1)


def _check_rate(rate: float, name: str) -> float:
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{name} rate must be a probability in [0, 1], got {rate!r}")
    return float(rate)


class Dropout(nnx.Dropout):
    """Zeroes each element with probability ``rate`` in training mode and scales
    the rest by ``1 / (1 - rate)``; identity in eval mode. Counterpart of ``torch.nn.Dropout``.

    The module keeps no RNG state: pass ``rngs`` (an ``nnx.Rngs``; its
    ``dropout`` stream is used, else ``default``) when calling in training mode.

    Args:
        rate: probability of zeroing an element (PyTorch's ``p``).

    Raises:
        ConfigError: if ``rate`` is not in ``[0, 1]``.

    >>> drop = Dropout(0.5)
    >>> drop.eval()
    >>> drop(jnp.ones(3))
    Array([1., 1., 1.], dtype=float32)
    """

    _broadcast: tuple[int, ...] = ()

    def __init__(self, rate: float):
        super().__init__(_check_rate(rate, type(self).__name__), broadcast_dims=self._broadcast, deterministic=False)

    def __call__(  # type: ignore[override]
        self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None
    ) -> jax.Array:
        """Applies dropout to ``x``.

        Args:
            x: input array.
            rngs: random streams (or a key) for the mask; needed in training mode.

        Returns:
            The masked, rescaled ``x`` in training mode; ``x`` in eval mode.

        Raises:
            ConfigError: in training mode without ``rngs``.
        """
        if not self.deterministic and 0.0 < self.rate and rngs is None:
            raise ConfigError(
                f"{type(self).__name__}({self.rate}) is in training mode and needs random keys: "
                "call model(x, rngs=nnx.Rngs(dropout=key)), or model.eval() for inference"
            )
        return super().__call__(x, rngs=rngs)


class Dropout2d(Dropout):
    """Zeroes whole feature maps (channels) with probability ``rate`` in training mode.

    Counterpart of ``torch.nn.Dropout2d``: one draw per (example, channel),
    shared over H and W of the NHWC input, survivors scaled by ``1 / (1 - rate)``.

    Args:
        rate: probability of zeroing a channel.

    Raises:
        ConfigError: if ``rate`` is not in ``[0, 1]``; at call time, if the input
            is not ``(B, H, W, C)`` (PyTorch's 2-D-input behaviour is deprecated there).
    """

    _broadcast = (1, 2)  # H and W of (B, H, W, C) share the mask

    def __call__(  # type: ignore[override]
        self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None
    ) -> jax.Array:
        """Applies channel-wise dropout to ``x`` of shape ``(B, H, W, C)``."""
        if x.ndim != 4:
            raise ConfigError(f"Dropout2d needs (B, H, W, C) input, got shape {x.shape}; use Dropout for other shapes")
        return super().__call__(x, rngs=rngs)
