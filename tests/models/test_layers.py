"""Linear, Conv2d, flatten and Dropout against their PyTorch counterparts: values, gradients, modes, init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models import layers
from jaxnet.models.layers import Conv2d, Dropout, Dropout2d, Linear, flatten
from tests.models.helpers import close, grads, nchw_to_nhwc, nhwc_to_numpy_nchw

# --- Linear -----------------------------------------------------------------


def test_linear_matches_torch_values_and_grads():
    torch.manual_seed(0)
    ref = torch.nn.Linear(7, 5)
    layer = Linear(7, 5, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(ref.weight.detach().numpy().T)
    layer.bias[...] = jnp.asarray(ref.bias.detach().numpy())
    x = torch.randn(3, 7, requires_grad=True)
    (ref(x) ** 2).sum().backward()

    xj = jnp.asarray(x.detach().numpy())
    close(layer(xj), ref(x).detach().numpy())
    g, gx = grads(layer, lambda m, a: jnp.square(m(a)).sum(), xj)
    close(g["kernel"][...], ref.weight.grad.numpy().T)
    close(g["bias"][...], ref.bias.grad.numpy())
    close(gx, x.grad.numpy())


def test_linear_without_bias_and_shape_errors():
    layer = Linear(4, 2, bias=False, rngs=nnx.Rngs(0))
    assert layer.bias is None
    assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 1
    with pytest.raises(ConfigError, match="last axis must have size 4"):
        layer(jnp.ones((3, 5)))
    with pytest.raises(TypeError, match="astype"):
        layer(jnp.ones((3, 4), jnp.uint8))
    with pytest.raises(ConfigError, match="in_features=0"):
        Linear(0, 2, rngs=nnx.Rngs(0))


def test_linear_computes_in_input_dtype():
    layer = Linear(4, 2, rngs=nnx.Rngs(0))
    assert layer(jnp.ones((3, 4), jnp.bfloat16)).dtype == jnp.bfloat16
    assert layer.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize(
    ("make", "fan_in"),
    [
        (lambda r: Linear(300, 200, rngs=r), 300),
        (lambda r: Conv2d(16, 64, 3, rngs=r), 16 * 9),
        (lambda r: Conv2d(3, 40, (5, 3), rngs=r), 3 * 15),
    ],
)
def test_init_is_torch_default_uniform(make, fan_in):
    layer = make(nnx.Rngs(3))
    bound = 1 / math.sqrt(fan_in)
    for value in (layer.kernel[...], layer.bias[...]):
        assert float(jnp.abs(value).max()) <= bound
    kernel = np.asarray(layer.kernel[...])
    # U(-b, b): mean 0, std b / sqrt(3), and it reaches close to the bound.
    assert abs(kernel.mean()) < 0.02 * bound
    assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.03
    assert np.abs(kernel).max() > 0.99 * bound
    assert float(jnp.abs(layer.bias[...]).max()) > 0.5 * bound


def test_torch_uniform_init_zero_fan_in_gives_zeros():
    assert float(jnp.abs(layers.torch_uniform_init(jax.random.key(0), (3,), 0)).max()) == 0.0


# --- Conv2d -----------------------------------------------------------------

CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=4, padding="same"),  # even kernel: the odd pad goes bottom/right
    dict(kernel_size=3, dilation=(2, 1), padding="same"),
    dict(kernel_size=3, padding="valid", bias=False),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_conv2d_matches_torch_values_and_grads(kwargs):
    torch.manual_seed(1)
    ref = torch.nn.Conv2d(3, 5, **kwargs)
    layer = Conv2d(3, 5, **kwargs, rngs=nnx.Rngs(0))
    assert layer.kernel[...].shape == tuple(ref.weight.shape[2:]) + (3, 5)
    layer.kernel[...] = jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0))
    if ref.bias is not None:
        layer.bias[...] = jnp.asarray(ref.bias.detach().numpy())
    x = torch.randn(2, 3, 11, 9, requires_grad=True)
    out = ref(x)
    (out**2).sum().backward()

    xj = nchw_to_nhwc(x)
    close(nhwc_to_numpy_nchw(layer(xj)), out.detach().numpy())
    g, gx = grads(layer, lambda m, a: jnp.square(m(a)).sum(), xj)
    close(np.asarray(g["kernel"][...]).transpose(3, 2, 0, 1), ref.weight.grad.numpy())
    if ref.bias is not None:
        close(g["bias"][...], ref.bias.grad.numpy())
    close(nhwc_to_numpy_nchw(gx), x.grad.numpy())


def test_conv2d_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="stride 1"):
        Conv2d(1, 2, 3, stride=2, padding="same", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'full'"):
        Conv2d(1, 2, 3, padding="full", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="kernel_size"):
        Conv2d(1, 2, (3, 3, 3), rngs=nnx.Rngs(0))
    conv = Conv2d(3, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="channels last"):
        conv(jnp.ones((1, 3, 8, 8)))  # NCHW by mistake


def test_conv2d_goes_through_conv2d_function(monkeypatch):
    calls = []
    original = layers.conv2d

    def spy(x, kernel, **kwargs):
        calls.append(kwargs)
        return original(x, kernel, **kwargs)

    monkeypatch.setattr(layers, "conv2d", spy)
    Conv2d(1, 2, 3, padding=1, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 1)))
    assert calls == [dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))]


def test_flatten_is_hwc_order():
    x = jnp.arange(24.0).reshape(1, 2, 3, 4)
    np.testing.assert_array_equal(flatten(x)[0], np.arange(24.0))
    assert flatten(jnp.zeros((5, 2, 3, 4))).shape == (5, 24)


# --- Dropout ----------------------------------------------------------------


def test_dropout_train_mode_masks_and_rescales():
    drop = Dropout(0.3)
    x = jnp.ones((200, 500))
    y = np.asarray(drop(x, rngs=nnx.Rngs(dropout=0)))
    zeroed = y == 0
    assert abs(zeroed.mean() - 0.3) < 0.01
    np.testing.assert_allclose(y[~zeroed], 1 / 0.7, rtol=1e-6)
    # The same key gives the same mask, another key another one.
    np.testing.assert_array_equal(y, drop(x, rngs=nnx.Rngs(dropout=0)))
    assert not np.array_equal(y, drop(x, rngs=nnx.Rngs(dropout=1)))


def test_dropout_eval_mode_is_identity_and_train_needs_rngs():
    drop = Dropout(0.5)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    with pytest.raises(ConfigError, match="rngs=nnx.Rngs"):
        drop(x)
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    np.testing.assert_array_equal(drop(x, rngs=nnx.Rngs(0)), x)
    drop.train()
    assert not np.array_equal(drop(x, rngs=nnx.Rngs(0)), x)
    assert nnx.view(drop, deterministic=True).deterministic and not drop.deterministic
    with pytest.raises(ConfigError, match="probability"):
        Dropout(1.5)


def test_dropout_keeps_no_rng_state():
    assert jax.tree.leaves(nnx.state(Dropout2d(0.5))) == []


def test_dropout2d_drops_whole_channels():
    drop = Dropout2d(0.25)
    x = jnp.ones((64, 5, 4, 32))
    y = np.asarray(drop(x, rngs=nnx.Rngs(dropout=3)))
    per_map = y.reshape(64, 20, 32)
    # Every (example, channel) map is all zeros or all 1/(1-p).
    assert np.all(per_map.min(axis=1) == per_map.max(axis=1))
    kept = per_map[:, 0, :] != 0
    assert abs(1 - kept.mean() - 0.25) < 0.05
    np.testing.assert_allclose(per_map[:, 0, :][kept], 1 / 0.75, rtol=1e-6)
    with pytest.raises(ConfigError, match="Dropout2d needs"):
        drop(jnp.ones((4, 8)), rngs=nnx.Rngs(0))
