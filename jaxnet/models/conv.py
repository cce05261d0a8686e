"""The 2-D convolution behind :class:`jaxnet.models.Conv2d`, and the switch that picks its implementation.

Why there is more than one way to call ``lax.conv_general_dilated``: XLA:CPU
hands every 2-D float32 NHWC convolution that YNNPACK accepts to YNNPACK,
which is several times slower than XLA's own Eigen kernel on unpadded
convolutions and on weight gradients (and faster on padded ones).
:func:`conv2d_eigen` computes the same sums in a form that YNNPACK declines,
and :func:`conv2d_cpu` takes, per piece (forward pass, input gradient,
weight gradient), the faster form. Both are exact rewrites: derivatives of
any order, ``jvp`` and ``vmap`` work as for the plain op. Two XLA:CPU bugs
bound where the rewrites apply (:func:`supports_fast_path`) and make
:func:`conv2d` move padding beyond the kernel's extent into an explicit
``lax.pad`` on the CPU (:func:`_pad_beyond_extent`); a third, an abort while
compiling ``jax.grad`` of some tiny strided convolutions, is upstream and
not worked around. ``benchmarks/CONV_CPU.md`` has the measurements, the
forms tried and dropped, and the cases that show each bug.

Which implementation runs
-------------------------
``"auto"`` (the default) is ``"cpu"`` (:func:`conv2d_cpu`) where the
convolution is compiled for the CPU, and ``"xla"`` (:func:`conv2d_xla`, the
plain ``lax.conv_general_dilated``) on GPU/TPU. :func:`conv2d` stages both
out with ``lax.platform_dependent`` and the choice is made when the function
is lowered, for the platform it is compiled for: a step traced on a machine
with a GPU but run on its CPU gets the CPU's forms, and an export for
several platforms (``jaxnet export``) carries each platform's own; the
compiled program holds only the chosen branch. ``"eigen"`` forces
:func:`conv2d_eigen` for all three pieces. Convolutions outside
:func:`supports_fast_path` always run ``"xla"``. Choose with the
environment variable ``JAXNET_CONV_IMPL`` (one of ``CONV_IMPLS``) or, for a
block of code, ``with use_conv_impl("xla"):``. The choice is read when a
function is traced, so make it before building (and first calling) a
jitted step: a compiled step keeps the implementation it was traced with.

Do not train convolution models with ``fit(scan=True)`` on the CPU: XLA:CPU
runs convolutions inside ``lax.scan`` far slower than in a plain jitted step,
whichever implementation (``benchmarks/CONV_CPU.md``, section 3).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxnet.errors import ConfigError

__all__ = [
    "CONV_IMPLS",
    "ENV_VAR",
    "conv2d",
    "conv2d_cpu",
    "conv2d_eigen",
    "conv2d_xla",
    "conv_impl",
    "resolve_conv_impl",
    "supports_fast_path",
    "use_conv_impl",
]

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]  # ((top, bottom), (left, right))

CONV_IMPLS = ("auto", "xla", "eigen", "cpu")
ENV_VAR = "JAXNET_CONV_IMPL"
_DIMS = ("NHWC", "HWIO", "NHWC")
_T = TypeVar("_T")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxnet_conv_impl", default=None)


def _pair(values: Iterable[_T]) -> tuple[_T, _T]:
    """``values`` (a tuple, list or array row of two) as a tuple of two; any other length raises."""
    first, second = values
    return first, second


def _kernel_size(kernel: jax.Array) -> Pair:
    """``(kh, kw)`` of an HWIO kernel."""
    return _pair(kernel.shape[:2])


def _check_impl(name: object, source: str) -> str:
    if name not in CONV_IMPLS:
        raise ConfigError(f"{source}={name!r} is not a convolution implementation; use one of {', '.join(CONV_IMPLS)}")
    return str(name)


def conv_impl() -> str:
    """The convolution implementation in effect: ``use_conv_impl``'s, else ``$JAXNET_CONV_IMPL``, else ``"auto"``.

    Returns:
        One of ``CONV_IMPLS``: ``"auto"``, ``"xla"``, ``"eigen"`` or ``"cpu"``.

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
        name: ``"auto"``, ``"xla"`` (plain ``lax.conv_general_dilated``),
            ``"eigen"`` or ``"cpu"`` (see the module docstring).

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


def supports_fast_path(kernel_size: Pair, *, stride: Pair, padding: Padding, dilation: Pair) -> bool:
    """Whether :func:`conv2d_eigen` and :func:`conv2d_cpu` take a convolution of this geometry.

    They need stride 1 and no side padded by more than the kernel's extent
    ``d * (k - 1)`` (``'valid'``, ``'same'`` and ``'full'`` padding qualify):
    then the transposed convolutions of the gradients have no negative
    padding, which XLA:CPU mishandles together with input dilation
    (wrong input gradients, or an abort while compiling strided ones).

    Args:
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)``.

    Returns:
        True when the fast forms apply.
    """
    if tuple(stride) != (1, 1):
        return False
    extents = (dilation[0] * (kernel_size[0] - 1), dilation[1] * (kernel_size[1] - 1))
    return all(0 <= side <= extent for sides, extent in zip(padding, extents) for side in sides)


def resolve_conv_impl(
    impl: str, *, kernel_size: Pair, stride: Pair, padding: Padding, dilation: Pair, backend: str | None = None
) -> str:
    """The implementation that runs one convolution: ``"xla"``, ``"eigen"`` or ``"cpu"``.

    ``"auto"`` is ``"cpu"`` on the CPU backend and ``"xla"`` elsewhere (GPU,
    TPU). ``"eigen"`` and ``"cpu"`` are ``"xla"`` for a geometry
    :func:`supports_fast_path` rejects (strides, padding beyond the kernel).
    :func:`conv2d` asks this for each platform it may be lowered for.

    Args:
        impl: one of ``CONV_IMPLS``.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)``.
        backend: the platform to decide for (``"cpu"``, or any other name for
            the rest); ``jax.default_backend()`` when ``None``.

    Returns:
        ``"xla"``, ``"eigen"`` or ``"cpu"``.

    Raises:
        ConfigError: for an unknown ``impl``.

    >>> same = dict(kernel_size=(3, 3), stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    >>> resolve_conv_impl("auto", backend="cpu", **same), resolve_conv_impl("auto", backend="gpu", **same)
    ('cpu', 'xla')
    """
    impl = _check_impl(impl, "impl")
    if impl == "xla" or not supports_fast_path(kernel_size, stride=stride, padding=padding, dilation=dilation):
        return "xla"
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    return "cpu" if backend == "cpu" else "xla"


def _check_fast_path(kernel: jax.Array, stride: Pair, padding: Padding, dilation: Pair, impl: str) -> None:
    if not supports_fast_path(_kernel_size(kernel), stride=stride, padding=padding, dilation=dilation):
        raise ConfigError(
            f"the {impl!r} convolution needs stride 1 and padding at most dilation * (kernel - 1) per side, got "
            f"stride={tuple(stride)}, padding={padding}, dilation={tuple(dilation)}, kernel {kernel.shape[:2]}; "
            "call conv2d, which uses 'xla' for such convolutions"
        )


def conv2d_xla(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """Plain ``lax.conv_general_dilated`` over NHWC input and an HWIO kernel; XLA picks the kernel."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=padding, rhs_dilation=dilation, dimension_numbers=_DIMS
    )


def conv2d_eigen(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """``conv2d_xla``'s result, in the form XLA:CPU runs (with its gradients) on Eigen.

    Along W: input dilation 2 (a zero between neighbouring columns), kernel
    dilation ``2 * dw``, stride 2 and padding ``(2 * left, 2 * right)``. The
    window then reads exactly the input's original columns, in the same
    order, so every output is the same sum of the same products; Eigen skips
    the inserted zeros. XLA's transposed convolutions for the gradients carry
    the dilation too, so they run on Eigen as well.

    Args:
        x: ``(B, H, W, C_in)``.
        kernel: ``(kh, kw, C_in, C_out)``.
        stride: must be ``(1, 1)``.
        padding: ``((top, bottom), (left, right))``, each at most ``d * (k - 1)``.
        dilation: ``(dh, dw)``.

    Returns:
        ``(B, H_out, W_out, C_out)``, the same values as ``conv2d_xla``'s.

    Raises:
        ConfigError: for a geometry :func:`supports_fast_path` rejects.
    """
    _check_fast_path(kernel, stride, padding, dilation, "eigen")
    (top, bottom), (left, right) = padding
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 2),
        padding=((top, bottom), (2 * left, 2 * right)),
        lhs_dilation=(1, 2),
        rhs_dilation=(dilation[0], 2 * dilation[1]),
        dimension_numbers=_DIMS,
    )


def _conv2d_cpu_primal(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: Pair) -> jax.Array:
    fn = conv2d_eigen if padding == ((0, 0), (0, 0)) else conv2d_xla
    return fn(x, kernel, stride=(1, 1), padding=padding, dilation=dilation)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv2d_cpu(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: Pair) -> jax.Array:
    return _conv2d_cpu_primal(x, kernel, padding, dilation)


def _conv2d_cpu_jvp(
    padding: Padding, dilation: Pair, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    # The convolution is bilinear: d(x * k) = dx * k + x * dk. Each term is written
    # in the form whose transpose XLA:CPU runs fastest: reverse mode transposes
    # the first into the input gradient (plain form) and the second into the
    # weight gradient (Eigen form). A term whose tangent is a symbolic zero
    # (the images, for the first layer) is skipped.
    (x, kernel), (dx, dkernel) = primals, tangents
    y = _conv2d_cpu(x, kernel, padding, dilation)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(conv2d_xla(dx, kernel, stride=(1, 1), padding=padding, dilation=dilation))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(conv2d_eigen(x, dkernel, stride=(1, 1), padding=padding, dilation=dilation))
    dy = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
    return y, dy


_conv2d_cpu.defjvp(_conv2d_cpu_jvp, symbolic_zeros=True)


def conv2d_cpu(x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair) -> jax.Array:
    """``conv2d_xla``'s result, each of its three convolutions in the form XLA:CPU runs fastest.

    On XLA:CPU, YNNPACK is slow on unpadded convolutions and on every weight
    gradient, Eigen is slower on padded ones (``benchmarks/CONV_CPU.md``).
    So the forward pass is :func:`conv2d_eigen` without padding and
    :func:`conv2d_xla` with it, the weight gradient always the
    Eigen form and the input gradient always the plain form (for an
    unpadded convolution XLA runs that on Eigen anyway). It is a
    ``jax.custom_jvp`` whose tangent is the sum of those two convolutions,
    so forward- and reverse-mode derivatives of any order work.

    Arguments, result and errors are :func:`conv2d_eigen`'s: the same
    geometries, the same values.
    """
    _check_fast_path(kernel, stride, padding, dilation, "cpu")
    (top, bottom), (left, right) = padding
    padding = ((int(top), int(bottom)), (int(left), int(right)))
    return _conv2d_cpu(x, kernel, padding, (int(dilation[0]), int(dilation[1])))


def _pad_beyond_extent(x: jax.Array, kernel_size: Pair, padding: Padding, dilation: Pair) -> tuple[jax.Array, Padding]:
    """Moves the padding beyond the kernel's extent out of the convolution, into an explicit ``lax.pad``.

    XLA:CPU computes the input gradient of a stride-1 convolution padded by
    more than ``d * (k - 1)`` on a side wrongly, whichever kernel runs it:
    that gradient is a convolution with negative padding, and its result
    holds values read from memory it never wrote (``benchmarks/CONV_CPU.md``,
    section 2b; ``tests/models/test_conv.py`` checks the fix). Zero-padding first and convolving with
    the rest is the same function, and the gradient of the pad is a slice.
    Negative padding (cropping) is left alone.

    Returns:
        ``(x, padding)``: the input with the excess zero rows and columns
        added, and the padding left for the convolution (at most the extent).
    """
    extents = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    inner = _pair((min(lo, ext), min(hi, ext)) for (lo, hi), ext in zip(padding, extents))
    outer = [(lo - a, hi - b) for (lo, hi), (a, b) in zip(padding, inner)]
    if not any(lo > 0 or hi > 0 for lo, hi in outer):
        return x, padding
    config = [(0, 0, 0), (*outer[0], 0), (*outer[1], 0), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config), inner


_IMPLEMENTATIONS = {"xla": conv2d_xla, "eigen": conv2d_eigen, "cpu": conv2d_cpu}


def conv2d(
    x: jax.Array, kernel: jax.Array, *, stride: Pair, padding: Padding, dilation: Pair, impl: str | None = None
) -> jax.Array:
    """2-D cross-correlation of NHWC ``x`` with an HWIO ``kernel``, by the selected implementation.

    Counterpart of ``torch.nn.functional.conv2d`` (channels last, no groups).

    Args:
        x: ``(B, H, W, C_in)``.
        kernel: ``(kh, kw, C_in, C_out)``, same dtype as ``x``.
        stride: ``(sh, sw)``.
        padding: explicit zero padding ``((top, bottom), (left, right))``.
        dilation: ``(dh, dw)``.
        impl: one of ``CONV_IMPLS``; ``conv_impl()`` when ``None``.

    Returns:
        ``(B, H_out, W_out, C_out)``.

    Raises:
        ConfigError: for an unknown ``impl``.

    >>> x, k = jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 2))
    >>> conv2d(x, k, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1))[0, :, :, 0]
    Array([[9., 9., 9.],
           [9., 9., 9.],
           [9., 9., 9.]], dtype=float32)
    """
    impl = _check_impl(conv_impl() if impl is None else impl, "impl")
    vertical, horizontal = padding
    stride, padding, dilation = _pair(stride), (_pair(vertical), _pair(horizontal)), _pair(dilation)
    # Chosen per platform when the function is lowered, not from the default
    # backend when it is traced: a step traced once and compiled for the CPU
    # (a CPU device on a machine with a GPU, or an export for several
    # platforms) still gets the CPU's forms, and a GPU gets the plain op.
    return lax.platform_dependent(
        x,
        kernel,
        cpu=functools.partial(_conv2d_on_cpu, impl=impl, stride=stride, padding=padding, dilation=dilation),
        default=functools.partial(_conv2d_elsewhere, impl=impl, stride=stride, padding=padding, dilation=dilation),
    )


def _conv2d_on_cpu(
    x: jax.Array, kernel: jax.Array, *, impl: str, stride: Pair, padding: Padding, dilation: Pair
) -> jax.Array:
    if tuple(stride) == (1, 1):
        x, padding = _pad_beyond_extent(x, _kernel_size(kernel), padding, dilation)
    chosen = resolve_conv_impl(
        impl, kernel_size=_kernel_size(kernel), stride=stride, padding=padding, dilation=dilation, backend="cpu"
    )
    return _IMPLEMENTATIONS[chosen](x, kernel, stride=stride, padding=padding, dilation=dilation)


def _conv2d_elsewhere(
    x: jax.Array, kernel: jax.Array, *, impl: str, stride: Pair, padding: Padding, dilation: Pair
) -> jax.Array:
    chosen = resolve_conv_impl(
        impl, kernel_size=_kernel_size(kernel), stride=stride, padding=padding, dilation=dilation, backend="other"
    )
    return _IMPLEMENTATIONS[chosen](x, kernel, stride=stride, padding=padding, dilation=dilation)
