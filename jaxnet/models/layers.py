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
writes its new running statistics into its ``BatchStat`` during a training
forward pass; NNX allows that only at the trace level the variable was made
in, so inside ``jax.grad`` build the model with ``nnx.merge(graphdef, params,
rest, copy=True)`` (a plain merge reuses the outer variables and raises
``TraceContextError``), then return ``nnx.state(model, nnx.BatchStat)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models import conv

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

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]  # ((top, bottom), (left, right))


def _pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> Pair:
    """Normalizes PyTorch's ``int or (int, int)`` argument to a pair."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ConfigError(f"{name}={value!r} must be an int or a pair of ints, e.g. {name}=3 or {name}=(3, 3)")
    if any(v < minimum for v in pair):
        raise ConfigError(f"{name}={value!r} must be >= {minimum}")
    return int(pair[0]), int(pair[1])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive int")


def _check_floating(x: jax.Array, layer: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer} got an input of dtype {x.dtype}; it needs floating point input, "
            "e.g. images.astype(jnp.float32) / 255"
        )


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
        _check_positive(in_features=in_features, out_features=out_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel = nnx.Param(torch_uniform_init(rngs.params(), (in_features, out_features), in_features))
        self.bias = nnx.data(None)
        if bias:
            self.bias = nnx.Param(torch_uniform_init(rngs.params(), (out_features,), in_features))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x`` of shape ``(..., in_features)``."""
        _check_floating(x, "Linear")
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
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
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
        ph, pw = _pair(padding, "padding", minimum=0)
        return ((ph, ph), (pw, pw))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution to ``x`` of shape ``(B, H, W, in_channels)``."""
        _check_floating(x, "Conv2d")
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


_UNROLLED_TAPS = 64  # windows up to this size take the max tap by tap (elementwise, fused by XLA)


def _window_taps(windows: jax.Array) -> list[jax.Array]:
    """The taps of ``(B, oh, kh, ow, kw, C)`` windows in row-major order, each ``(B, oh, ow, C)``."""
    return [windows[:, :, a, :, b, :] for a in range(windows.shape[2]) for b in range(windows.shape[4])]


@jax.custom_jvp
def _window_max(windows: jax.Array) -> jax.Array:
    """Max over the window axes 2 and 4 of ``(B, oh, kh, ow, kw, C)``; its derivative is PyTorch's.

    The derivative follows the first tap (row-major) holding the maximum, as
    ``torch.nn.functional.max_pool2d``'s backward does, instead of JAX's
    reduce-max rule (which splits it between equal maxima and needs two more
    passes over the input to count them).
    """
    if windows.shape[2] * windows.shape[4] <= _UNROLLED_TAPS:
        return functools.reduce(jnp.maximum, _window_taps(windows))
    return windows.max(axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (windows,), (t,) = primals, tangents
    out = _window_max(windows)
    kh, kw = windows.shape[2], windows.shape[4]
    if kh * kw <= _UNROLLED_TAPS:
        # One elementwise select chain: the last tap is the fallback, each earlier
        # tap that equals the maximum takes over, so the first one wins.
        t_out = None
        for tap, t_tap in zip(_window_taps(windows)[::-1], _window_taps(t)[::-1]):
            t_out = t_tap if t_out is None else jnp.where(tap == out, t_tap, t_out)
        return out, t_out
    # Large windows: the row-major rank of the first maximum, then a masked sum.
    rank = jax.lax.broadcasted_iota(jnp.int32, (1, 1, kh, 1, kw, 1), 2) * kw + jax.lax.broadcasted_iota(
        jnp.int32, (1, 1, kh, 1, kw, 1), 4
    )
    hit = windows == out[:, :, None, :, None, :]
    first = jnp.where(hit, rank, kh * kw).min(axis=(2, 4))
    mask = rank == first[:, :, None, :, None, :]
    return out, jnp.where(mask, t, jnp.zeros((), t.dtype)).sum(axis=(2, 4))


def max_pool2d(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> jax.Array:
    """Max pooling over H and W of NHWC input. Counterpart of ``torch.nn.functional.max_pool2d``.

    Floor mode (``ceil_mode=False``); padding counts as ``-inf``. When the
    windows tile the image (stride == kernel, no padding) it reshapes to
    ``(B, H/kh, kh, W/kw, kw, C)``, dropping the rows/columns that floor mode
    drops, and takes the max tap by tap; its gradient goes to the first
    maximum of each window (row-major), as PyTorch's does, in one elementwise
    pass. On XLA:CPU this is several times faster end to end than
    ``lax.reduce_window`` and than a reduce-max over the window axes, mostly
    in the backward pass. Other windows use ``lax.reduce_window``, whose
    gradient also goes to one maximum per window.

    Args:
        x: ``(B, H, W, C)``.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: ``s`` or ``(sh, sw)``; defaults to ``kernel_size`` as in PyTorch.
        padding: ``p`` or ``(ph, pw)``, at most half the kernel size.

    Returns:
        ``(B, H_out, W_out, C)``, ``H_out = (H + 2*ph - kh) // sh + 1``.

    Raises:
        ConfigError: for a non-4-D input, bad sizes, or an empty output.

    >>> max_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride")
    ph, pw = _pair(padding, "padding", minimum=0)
    if x.ndim != 4:
        raise ConfigError(f"max_pool2d needs (B, H, W, C) input, got shape {x.shape}")
    if 2 * ph > kh or 2 * pw > kw:
        raise ConfigError(f"max_pool2d padding {(ph, pw)} must be at most half the kernel size {(kh, kw)}")
    _, height, width, _ = x.shape
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ConfigError(
            f"max_pool2d kernel {(kh, kw)} does not fit input of shape {x.shape} (with padding {(ph, pw)})"
        )
    if (sh, sw) == (kh, kw) and (ph, pw) == (0, 0):
        # Non-overlapping windows: crop what floor mode drops, then split each
        # spatial axis into (windows, window): (B, out_h, kh, out_w, kw, C).
        x = x[:, : out_h * kh, : out_w * kw, :]
        windows = x.reshape(x.shape[0], out_h, kh, out_w, kw, x.shape[3])
        return _window_max(windows)
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = np.array(-np.inf, dtype=x.dtype)
    else:
        init = np.array(jnp.iinfo(x.dtype).min, dtype=x.dtype)
    return jax.lax.reduce_window(
        x, init, jax.lax.max, (1, kh, kw, 1), (1, sh, sw, 1), ((0, 0), (ph, ph), (pw, pw), (0, 0))
    )


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

    def __init__(
        self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, rngs: nnx.Rngs | None = None
    ):
        del rngs  # initial values are deterministic (ones and zeros); kept for a uniform signature
        _check_positive(num_features=num_features)
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
        _check_floating(x, name)
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

    Channels are last: PyTorch's ``(B, C, L)`` is ``(B, L, C)`` here.

    Args:
        num_features: number of channels ``C``.
        momentum: PyTorch's convention, weight of the new batch in the running stats.
        eps: added to the variance for stability.
        rngs: unused (initial values are ones and zeros); accepted for a uniform signature.

    Raises:
        ConfigError: for a non-positive ``num_features``, ``momentum`` outside
            ``[0, 1]`` or a non-positive ``eps``.
    """

    _ndims = (2, 3)
    _shape_text = "(B, C) or (B, L, C)"
