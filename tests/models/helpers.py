"""What the layer and convolution tests share (``tests/e2e/test_gpu.py`` too).

PyTorch <-> NHWC conversions, gradients the train step's way, a tolerance;
convolution outputs and gradients, by XLA and by a float64 reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

TOL = 1e-5


def nchw_to_nhwc(t: torch.Tensor) -> jax.Array:
    """A PyTorch ``(B, C, H, W)`` tensor as a jaxnet ``(B, H, W, C)`` array."""
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nhwc_to_numpy_nchw(a: jax.Array) -> np.ndarray:
    """A jaxnet ``(B, H, W, C)`` array in PyTorch's ``(B, C, H, W)`` layout, for comparison."""
    return np.asarray(a).transpose(0, 3, 1, 2)


def grads(module, loss, x):
    """Gradients of ``loss(module, x)`` w.r.t. the module's params and ``x``, the train step's way."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    # copy=True: merge otherwise reuses the Variable objects of ``rest``, and
    # BatchNorm may only update its stats at the trace level they were made in.
    return jax.grad(lambda p, xj: loss(nnx.merge(graphdef, p, rest, copy=True), xj), argnums=(0, 1))(params, x)


def close(actual, expected, tol: float = TOL) -> None:
    """Same shape, and equal within ``tol`` times the larger of 1 and the largest expected magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


# --- convolutions: XLA's numbers, a float64 reference, what was lowered ----------------------


def max_rel_err(actual: jax.Array, expected: jax.Array) -> float:
    """The largest absolute difference over the largest expected magnitude (same shapes required)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-30))


def values_and_grads(fn, x, kernel, geometry, cotangent):
    """Output, and the gradients w.r.t. input and kernel of <output, cotangent> (one compiled call)."""

    @jax.jit
    def run(x, kernel, cotangent):
        out, vjp = jax.vjp(lambda a, k: fn(a, k, **geometry), x, kernel)
        return (out, *vjp(cotangent))

    return run(x, kernel, cotangent)


def reference_values_and_grads(x, kernel, geometry, cotangent):
    """Output and both gradients in float64 NumPy, tap by tap (no XLA involved)."""
    x, kernel, cotangent = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
    (sh, sw), (dh, dw), pads = geometry["stride"], geometry["dilation"], geometry["padding"]
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    kh, kw = kernel.shape[:2]
    ho, wo = cotangent.shape[1:3]
    out = np.zeros(cotangent.shape)
    dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
    for p in range(kh):
        for q in range(kw):
            window = (
                slice(None),
                slice(p * dh, p * dh + sh * (ho - 1) + 1, sh),
                slice(q * dw, q * dw + sw * (wo - 1) + 1, sw),
            )
            out += np.einsum("bijc,co->bijo", xp[window], kernel[p, q])
            dk[p, q] = np.einsum("bijc,bijo->co", xp[window], cotangent)
            dxp[window] += np.einsum("bijo,co->bijc", cotangent, kernel[p, q])
    (top, bottom), (left, right) = pads
    dx = dxp[:, top : xp.shape[1] - bottom, left : xp.shape[2] - right]
    return out, dx, dk


def lowered_convolutions(fn, *args, platforms):
    """The ``stablehlo.convolution`` lines of ``jax.jit(fn)`` lowered for ``platforms`` (no such device needed)."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()
    return re.findall(r"stablehlo\.convolution.*", text)
