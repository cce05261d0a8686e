"""Max pooling over NHWC images, with PyTorch's gradient: :func:`max_pool2d`.

When the windows tile the image, the max is taken tap by tap and a
``jax.custom_jvp`` sends the gradient to the first maximum of each window,
as PyTorch does, in one elementwise pass: on XLA:CPU that is several times
faster end to end than ``lax.reduce_window`` and than JAX's reduce-max
gradient, mostly in the backward pass (``benchmarks/CONV_CPU.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError
from jaxnet.models.arguments import to_pair

__all__ = ["max_pool2d"]

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
        taps, t_taps = _window_taps(windows)[::-1], _window_taps(t)[::-1]
        t_out = t_taps[0]
        for tap, t_tap in zip(taps[1:], t_taps[1:]):
            t_out = jnp.where(tap == out, t_tap, t_out)
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
    pass, several times faster on XLA:CPU than ``lax.reduce_window`` (see the
    module docstring). Other windows use ``lax.reduce_window``, whose
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
    kh, kw = to_pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else to_pair(stride, "stride")
    ph, pw = to_pair(padding, "padding", minimum=0)
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
