"""max_pool2d against PyTorch: values and gradients (ties included), forward mode, second order, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxnet.errors import ConfigError
from jaxnet.models import layers
from jaxnet.models.pooling import max_pool2d
from tests.models.helpers import close, nchw_to_nhwc, nhwc_to_numpy_nchw

# --- max_pool2d -------------------------------------------------------------

POOL_CASES = [
    # (input H, W, kernel, stride, padding, fast reshape path?)
    (8, 8, 2, None, 0, True),
    (7, 9, 2, 2, 0, True),  # floor mode drops the last row/columns
    (9, 9, 3, None, 0, True),
    (8, 6, (2, 3), None, 0, True),
    (9, 9, 3, 2, 0, False),  # overlapping windows
    (8, 8, 2, 1, 0, False),
    (8, 8, 2, 2, 1, False),  # padding
    (8, 7, 3, (2, 1), 1, False),
]


@pytest.mark.parametrize(("h", "w", "kernel", "stride", "padding", "fast"), POOL_CASES)
def test_max_pool2d_matches_torch_values_and_grads(h, w, kernel, stride, padding, fast):
    torch.manual_seed(2)
    x = torch.randn(2, 3, h, w, requires_grad=True)  # continuous values: no ties
    out = F.max_pool2d(x, kernel, stride, padding)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()

    def loss(xj):
        return (max_pool2d(xj, kernel, stride, padding) * nchw_to_nhwc(weights)).sum()

    xj = nchw_to_nhwc(x)
    np.testing.assert_array_equal(nhwc_to_numpy_nchw(max_pool2d(xj, kernel, stride, padding)), out.detach().numpy())
    close(nhwc_to_numpy_nchw(jax.grad(loss)(xj)), x.grad.numpy())
    jaxpr = str(jax.make_jaxpr(lambda a: max_pool2d(a, kernel, stride, padding))(xj))
    assert ("reduce_window" not in jaxpr) == fast


def test_max_pool2d_rejects_bad_input():
    with pytest.raises(ConfigError, match=r"\(B, H, W, C\)"):
        max_pool2d(jnp.ones((4, 4)), 2)
    with pytest.raises(ConfigError, match="half the kernel"):
        max_pool2d(jnp.ones((1, 4, 4, 1)), 2, padding=2)
    with pytest.raises(ConfigError, match="does not fit"):
        max_pool2d(jnp.ones((1, 2, 2, 1)), 3)


# --- max_pool2d: PyTorch's gradient on ties, in one pass -----------------------------


@pytest.mark.parametrize(("size", "kernel"), [(8, 2), (9, 3), (12, (2, 3)), (18, 9)])
def test_max_pool_sends_the_gradient_to_the_first_maximum_like_torch(size, kernel):
    # Small integers and ReLU zeros: most windows hold several equal maxima.
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-2, 3, (2, 3, size, size)), 0).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    out = F.max_pool2d(xt, kernel)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    w = jnp.asarray(weights.numpy().transpose(0, 2, 3, 1))
    pooled = layers.max_pool2d(xj, kernel)
    np.testing.assert_array_equal(np.asarray(pooled).transpose(0, 3, 1, 2), out.detach().numpy())
    grad = jax.grad(lambda a: jnp.sum(layers.max_pool2d(a, kernel) * w))(xj)
    np.testing.assert_array_equal(np.asarray(grad).transpose(0, 3, 1, 2), xt.grad.numpy())


def test_max_pool_forward_mode_and_second_order():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 6, 2), dtype=np.float32))
    t = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape, dtype=np.float32))
    out, tangent = jax.jvp(lambda a: layers.max_pool2d(a, 2), (x,), (t,))
    ref_out, ref_tangent = jax.jvp(
        lambda a: jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"), (x,), (t,)
    )
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(tangent, ref_tangent)
    # d2/dx2 of sum(max^2): 2 on the diagonal entry of each window's maximum, 0 elsewhere.
    hess = jax.hessian(lambda a: jnp.sum(layers.max_pool2d(a, 2) ** 2))(x).reshape(x.size, x.size)
    is_max = np.asarray(x == jnp.repeat(jnp.repeat(out, 2, axis=1), 2, axis=2)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(hess), np.diag(2.0 * is_max))
