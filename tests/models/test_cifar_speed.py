"""The speedrun net: shapes, parameter count, Dirac init, and the whitening init against its definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.cifar_speed import WIDTHS, CifarSpeedNet, dirac_kernel, init_whitening, whitening_filters
from jaxnet.models.layers import max_pool2d

SMALL = (8, 16, 12)


def small_net(seed: int = 0) -> CifarSpeedNet:
    return CifarSpeedNet(widths=SMALL, rngs=nnx.Rngs(seed))


def test_full_width_net_has_airbench94s_shape_and_size():
    model = CifarSpeedNet(rngs=nnx.Rngs(0))
    assert isinstance(model, CifarSpeedNet) and WIDTHS == (64, 256, 256)
    params = nnx.state(model, nnx.Param)
    c = (24, *WIDTHS)
    convs = sum(9 * a * b + 9 * b * b for a, b in zip(c[:-1], c[1:]))
    expected = (2 * 2 * 3 * 24 + 24) + convs + sum(4 * w for w in WIDTHS) + WIDTHS[-1] * 10  # 1,972,792
    assert sum(x.size for x in jax.tree.leaves(params)) == expected == 1_972_792
    model.eval()  # BatchNorm may not write its statistics from inside eval_shape's trace
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32))
    assert out.shape == (3, 10) and out.dtype == jnp.float32


def test_feature_map_shapes_through_the_groups():
    model = small_net()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    h = jax.nn.gelu(model.whiten(x), approximate=False)
    shapes = [h.shape]
    for group in model.groups:
        h = group(h)
        shapes.append(h.shape)
    assert shapes == [(2, 31, 31, 24), (2, 15, 15, 8), (2, 7, 7, 16), (2, 3, 3, 12)]
    assert max_pool2d(h, 3).shape == (2, 1, 1, 12)
    logits = model(x)
    np.testing.assert_allclose(logits, (max_pool2d(h, 3).reshape(2, 12) @ model.head.kernel[...]) / 9, rtol=1e-5)


def test_bfloat16_input_computes_in_bfloat16():
    assert small_net()(jnp.zeros((2, 32, 32, 3), jnp.bfloat16)).dtype == jnp.bfloat16


def test_convolutions_start_with_identity_filters_and_a_zero_whitening_bias():
    model = small_net()
    assert np.all(np.asarray(model.whiten.bias[...]) == 0)
    for group in model.groups:
        for conv in (group.conv1, group.conv2):
            k = np.asarray(conv.kernel[...])  # (3, 3, cin, cout)
            n = min(conv.in_channels, conv.out_channels)
            identity = np.zeros((3, 3, conv.in_channels, n), np.float32)
            identity[1, 1, np.arange(n), np.arange(n)] = 1
            np.testing.assert_array_equal(k[..., :n], identity)
            if conv.out_channels > n:  # the remaining filters keep PyTorch's uniform init
                rest = k[..., n:]
                bound = 1 / np.sqrt(9 * conv.in_channels)
                assert np.abs(rest).max() <= bound and np.abs(rest).min() > 0 and rest.std() > bound / 3


def test_dirac_kernel_even_size_and_fewer_outputs_than_inputs():
    k = np.asarray(dirac_kernel(jnp.full((2, 2, 3, 2), 7.0)))  # torch.nn.init.dirac_: centre tap kh // 2
    expected = np.zeros((2, 2, 3, 2))
    expected[1, 1, 0, 0] = expected[1, 1, 1, 1] = 1
    np.testing.assert_array_equal(k, expected)
    with pytest.raises(ConfigError, match="HWIO"):
        dirac_kernel(jnp.ones((3, 3, 2)))


def test_widths_are_checked():
    with pytest.raises(ConfigError, match="three positive ints"):
        CifarSpeedNet(widths=(8, 16), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="three positive ints"):
        CifarSpeedNet(widths=(8, 0, 4), rngs=nnx.Rngs(0))


# --- whitening ------------------------------------------------------------------------------------


def images(n: int = 6, size: int = 7, seed: int = 0) -> np.ndarray:
    """Correlated channels and neighbours, so the covariance is far from the identity."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size + 1, size + 1, 1))
    x = base[:, 1:, 1:] + 0.5 * base[:, :-1, :-1] + 0.3 * rng.normal(size=(n, size, size, 3))
    return (x * np.array([1.0, 2.0, 0.5])).astype(np.float32)


def reference_filters(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The definition, one patch at a time, float64: (eigenvalues desc, (12, 12) unit filters as rows)."""
    patches = [
        x[n, i : i + 2, j : j + 2, :].astype(np.float64).reshape(-1)  # (row, col, channel) order
        for n in range(x.shape[0])
        for i in range(x.shape[1] - 1)
        for j in range(x.shape[2] - 1)
    ]
    p = np.stack(patches)
    cov = p.T @ p / len(p)
    lam, v = np.linalg.eig(cov)  # a different solver than the library's eigh
    order = np.argsort(lam.real)[::-1]
    lam, v = lam.real[order], v.real[:, order]
    return lam, (v / np.sqrt(lam + eps)).T


def test_whitening_filters_match_the_float64_definition_up_to_sign():
    x, eps = images(), 5e-4
    lam, ref = reference_filters(x, eps)
    w = whitening_filters(x, eps=eps, chunk=4)  # chunked sums: 6 images in blocks of 4 and 2
    assert w.shape == (2, 2, 3, 24) and w.dtype == np.float32
    flat = w.reshape(12, 24).T  # (24, 12): filter k as a row, (row, col, channel) order
    for k in range(12):
        sign = np.sign(flat[k] @ ref[k])
        np.testing.assert_allclose(sign * flat[k], ref[k], rtol=2e-4, atol=1e-5 * np.abs(ref[k]).max())
    np.testing.assert_array_equal(flat[12:], -flat[:12])


def test_whitening_conv_decorrelates_the_patches_it_was_built_from():
    x, eps = images(n=8, size=9, seed=1), 1e-3
    model = small_net()
    init_whitening(model, x, eps=eps)
    out = np.asarray(model.whiten(jnp.asarray(x)), np.float64) - np.asarray(model.whiten.bias[...])  # (8, 8, 8, 24)
    z = out.reshape(-1, 24)[:, :12]
    cov = z.T @ z / len(z)
    lam, _ = reference_filters(x, eps)
    np.testing.assert_allclose(cov, np.diag(lam / (lam + eps)), atol=2e-4)
    np.testing.assert_allclose(out[..., 12:], -out[..., :12], atol=1e-5)


def test_whitening_input_is_checked():
    with pytest.raises(ConfigError, match="at least 2x2"):
        whitening_filters(np.zeros((2, 1, 5, 3)))
    with pytest.raises(ConfigError, match="3 channels"):
        init_whitening(small_net(), np.zeros((2, 8, 8, 1)))
