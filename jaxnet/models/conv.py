"""The 2-D convolution behind :class:`jaxnet.models.Conv2d`, and the switch that picks its implementation.

Why there is more than one way to call ``lax.conv_general_dilated``
-------------------------------------------------------------------
On the CPU, XLA (jaxlib 0.10) hands a convolution either to YNNPACK or to its
own multi-threaded Eigen kernel. It gives YNNPACK every 2-D float32 NHWC
convolution that YNNPACK accepts, and on this project's 2-core machine that
kernel is 3-4x slower than Eigen's for the tutorial ConvNet's layers (conv2,
batch 64: forward 25 ms vs 7-9 ms, weight gradient 29-33 ms vs 11-13 ms;
``benchmarks/CONV_CPU.md`` has the numbers). YNNPACK declines a convolution
whose output is larger than its input, or whose kernel is larger than its
input, along a spatial axis; XLA then runs Eigen.

The ``"eigen"`` implementation uses that rule without changing the
mathematics: it adds a few columns (or rows) of zero padding on the high side
of one spatial axis, so that the output is one larger than the input, and
slices the extra outputs off. Nothing is approximated: the extra outputs are
computed and dropped, and the kept ones are the same sums as before. The
gradients come from JAX's ordinary autodiff of those ``pad``/``conv``/``slice``
ops, and XLA's transposes of them meet the same rule: the input gradient is a
convolution whose output (the input's size) is larger than its input (the
output's size), and the weight gradient one whose kernel (the padded output
gradient) is larger than its input. All three run on Eigen, for the cost of
the dropped outputs (3 of 27 columns for the ConvNet's conv2, about 12%).
Because it is plain autodiff, higher derivatives, ``jvp`` and ``vmap`` work.

Which implementation runs
-------------------------
``"auto"`` (the default) picks ``"eigen"`` when the default backend is the
CPU and the convolution is one YNNPACK would take and the padding trick is
cheap for (stride 1, more than 16 input or output channels); everything else,
and every convolution on GPU/TPU, uses ``"xla"``, the plain
``lax.conv_general_dilated``. Choose explicitly with the environment variable
``JAXNET_CONV_IMPL`` (``auto``, ``xla`` or ``eigen``) or, for a block of code,
``with use_conv_impl("xla"): ...``. The choice is read when a function is
traced, so make it before building (and first calling) a jitted step: a
compiled step keeps the implementation it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax
from jax import lax

from jaxnet.errors import ConfigError

__all__ = [
    "CONV_IMPLS",
    "ENV_VAR",
    "conv2d",
    "conv2d_eigen",
    "conv2d_xla",
    "conv_impl",
    "resolve_conv_impl",
    "use_conv_impl",
]

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]  # ((top, bottom), (left, right))

CONV_IMPLS = ("auto", "xla", "eigen")
ENV_VAR = "JAXNET_CONV_IMPL"
_DIMS = ("NHWC", "HWIO", "NHWC")
# YNNPACK leaves convolutions with at most this many input and output channels to Eigen.
_YNN_MIN_CHANNELS = 16

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxnet_conv_impl", default=None)


def _check_impl(name: object, source: str) -> str:
    if name not in CONV_IMPLS:
        raise ConfigError(f"{source}={name!r} is not a convolution implementation; use one of {', '.join(CONV_IMPLS)}")
    return str(name)


def conv_impl() -> str:
    """The convolution implementation in effect: ``use_conv_impl``'s, else ``$JAXNET_CONV_IMPL``, else ``"auto"``.

    Returns:
        ``"auto"``, ``"xla"`` or ``"eigen"``.

    Raises:
        ConfigError: if ``$JAXNET_CONV_IMPL`` names no implementation.
    """
    override = _override.get()
    if override is not None:
        return override
    return _check_impl(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


@contextlib.contextmanager
def use_conv_impl(name: str) -> Iterator[None]:
    """Selects the convolution implementation for the code in the ``with`` block.

    Functions traced inside the block use ``name``; a step compiled before
    keeps the implementation it was traced with.

    Args:
        name: ``"auto"``, ``"xla"`` (plain ``lax.conv_general_dilated``) or
            ``"eigen"`` (see the module docstring).

    Raises:
        ConfigError: for any other name.

    >>> with use_conv_impl("xla"):
    ...     conv_impl()
    'xla'
    """
    token = _override.set(_check_impl(name, "use_conv_impl"))
    try:
        yield
    finally:
        _override.reset(token)


def resolve_conv_impl(
    impl: str, *, stride: Pair, in_channels: int, out_channels: int, backend: str | None = None
) -> str:
    """The implementation ``impl`` stands for on a convolution: ``"xla"`` or ``"eigen"``.

    ``"auto"`` is ``"eigen"`` on the CPU backend for stride-1 convolutions with
    more than 16 input or output channels (those XLA would give YNNPACK), and
    ``"xla"`` otherwise. ``"eigen"`` needs stride 1; for other strides it is ``"xla"``.

    Args:
        impl: ``"auto"``, ``"xla"`` or ``"eigen"``.
        stride: the convolution's ``(sh, sw)``.
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        backend: the platform to decide for; ``jax.default_backend()`` when ``None``.

    Returns:
        ``"xla"`` or ``"eigen"``.

    Raises:
        ConfigError: for an unknown ``impl``.
    """
    impl = _check_impl(impl, "impl")
    if impl == "xla" or tuple(stride) != (1, 1):
        return "xla"
    if impl == "eigen":
        return "eigen"
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or max(in_channels, out_channels) <= _YNN_MIN_CHANNELS:
        return "xla"
    return "eigen"


def conv2d_xla(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """Plain ``lax.conv_general_dilated`` over NHWC input and an HWIO kernel; XLA picks the kernel."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=padding, rhs_dilation=dilation, dimension_numbers=_DIMS
    )


def _growth(size: int, lo: int, hi: int, extent: int) -> tuple[int, int, int]:
    """``(out, p, f)`` for one spatial axis: output size, explicit input padding, extra conv padding.

    With the input padded by ``p`` and the convolution by ``f`` more on the
    high side, the forward output (``out + p + f``) exceeds its input
    (``size + p``), the input gradient's output (``size + p``) exceeds its
    input (``out``), and the weight gradient's kernel (``out + p + f``)
    exceeds its input (``size + p``).
    """
    out = size + lo + hi - extent
    return out, max(0, out - size + 1), max(0, size - out + 1)


def conv2d_eigen(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """``conv2d_xla``'s result, computed so that XLA:CPU runs all three convolutions on Eigen.

    Pads one spatial axis on the high side (input by ``p``, convolution by
    ``f`` more) and slices the extra outputs off; see the module docstring.

    Args:
        x: ``(B, H, W, C_in)``.
        kernel: ``(kh, kw, C_in, C_out)``.
        stride: must be ``(1, 1)``.
        padding: ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)``.

    Returns:
        ``(B, H_out, W_out, C_out)``, equal to ``conv2d_xla``'s.

    Raises:
        ConfigError: for a stride other than 1.
    """
    if tuple(stride) != (1, 1):
        raise ConfigError(f"the 'eigen' convolution needs stride 1, got stride={stride}; use impl 'xla' or 'auto'")
    axes = []
    for axis in (1, 2):  # H, W of NHWC
        (lo, hi), d, k = padding[axis - 1], dilation[axis - 1], kernel.shape[axis - 1]
        out, p, f = _growth(x.shape[axis], lo, hi, d * (k - 1))
        axes.append(((p + f) / max(out, 1), axis, out, p, f))
    _, axis, out, p, f = min(axes)  # the axis where the dropped outputs cost least
    if p:
        widths = [(0, 0)] * 4
        widths[axis] = (0, p)
        x = jax.numpy.pad(x, widths)
    pads = [tuple(padding[0]), tuple(padding[1])]
    pads[axis - 1] = (pads[axis - 1][0], pads[axis - 1][1] + f)
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=pads, rhs_dilation=dilation, dimension_numbers=_DIMS
    )
    return lax.slice_in_dim(y, 0, out, axis=axis)


def conv2d(
    x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair, impl: str | None = None
) -> jax.Array:
    """2-D cross-correlation of NHWC ``x`` with an HWIO ``kernel``, by the selected implementation.

    Args:
        x: ``(B, H, W, C_in)``.
        kernel: ``(kh, kw, C_in, C_out)``, same dtype as ``x``.
        stride: ``(sh, sw)``.
        padding: explicit zero padding ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)``.
        impl: ``"auto"``, ``"xla"`` or ``"eigen"``; ``conv_impl()`` when ``None``.

    Returns:
        ``(B, H_out, W_out, C_out)``.

    Raises:
        ConfigError: for an unknown ``impl``.
    """
    impl = conv_impl() if impl is None else impl
    chosen = resolve_conv_impl(impl, stride=stride, in_channels=kernel.shape[2], out_channels=kernel.shape[3])
    fn = conv2d_eigen if chosen == "eigen" else conv2d_xla
    return fn(x, kernel, stride=stride, padding=padding, dilation=dilation)
