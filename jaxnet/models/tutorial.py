"""The PyTorch tutorials' models, layer for layer, as Flax NNX modules.

Every model is built as ``Model(*, rngs=nnx.Rngs(seed))`` and called as
``model(x, *, rngs=None)`` with NHWC float32 images; dropout layers draw
their masks from ``rngs`` in training mode (``model.train()``, the default,
as in PyTorch) and are the identity after ``model.eval()``. Attribute names
are the tutorials' (``fc1``, ``conv2``, ...), so PyTorch ``state_dict`` keys
map onto them directly (see ``jaxnet.interop``).

A model whose first Linear layer follows a conv stack names that layer and the
PyTorch ``(C, H, W)`` shape it flattens in ``torch_flatten_inputs``: PyTorch
flattens NCHW feature maps channel-major, jaxnet flattens NHWC ones
channel-minor, and ``jaxnet.interop`` permutes that layer's weights between
the two orders.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import jax
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.layers import Conv2d, Dropout, Dropout2d, Linear, flatten, max_pool2d

__all__ = ["MLP", "MLP128", "MLP512", "CifarCNN", "ConvNet", "LinearRegression"]

_NO_FLATTEN: Mapping[str, tuple[int, int, int]] = MappingProxyType({})


def _flatten_images(x: jax.Array, features: int, model: str) -> jax.Array:
    """``(B, ...) -> (B, features)``, PyTorch's ``x.view(-1, 784)`` for one image per row."""
    if x.ndim < 2 or x.size // x.shape[0] != features:
        raise ConfigError(
            f"{model} needs a batch of {features}-value examples, e.g. (B, 28, 28, 1) MNIST images; got shape {x.shape}"
        )
    return flatten(x)


class MLP(nnx.Module):
    """MNIST MLP 784-512-256-10 with ReLU and Dropout(0.2) after each hidden layer.

    The first tutorial's ``Net``; returns logits. Counterpart of::

        x = x.view(-1, 784)
        x = dropout1(relu(fc1(x)))   # fc1 = nn.Linear(784, 512), nn.Dropout(p=0.2)
        x = dropout2(relu(fc2(x)))   # fc2 = nn.Linear(512, 256), nn.Dropout(p=0.2)
        return fc3(x)                # fc3 = nn.Linear(256, 10)

    Args:
        rngs: random streams for parameter initialization.

    >>> MLP(rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1)), rngs=nnx.Rngs(dropout=1)).shape
    (2, 10)
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = _NO_FLATTEN

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = Linear(784, 512, rngs=rngs)
        self.dropout1 = Dropout(0.2)
        self.fc2 = Linear(512, 256, rngs=rngs)
        self.dropout2 = Dropout(0.2)
        self.fc3 = Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 28, 28, 1)`` (or ``(B, 784)``) images to ``(B, 10)`` logits."""
        x = _flatten_images(x, 784, "MLP")  # (B, 784)
        x = self.dropout1(jax.nn.relu(self.fc1(x)), rngs=rngs)
        x = self.dropout2(jax.nn.relu(self.fc2(x)), rngs=rngs)
        return self.fc3(x)


class MLP512(nnx.Module):
    """MNIST MLP 784-512-10 with ReLU (the second tutorial's ``Net``); returns logits.

    Counterpart of ``fc2(relu(fc1(x.view(-1, 28*28))))`` with
    ``fc1 = nn.Linear(784, 512)`` and ``fc2 = nn.Linear(512, 10)``.

    Args:
        rngs: random streams for parameter initialization.
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = _NO_FLATTEN

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = Linear(784, 512, rngs=rngs)
        self.fc2 = Linear(512, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 28, 28, 1)`` images to ``(B, 10)`` logits; ``rngs`` is unused (no dropout)."""
        del rngs
        x = _flatten_images(x, 784, "MLP512")  # (B, 784)
        return self.fc2(jax.nn.relu(self.fc1(x)))


class MLP128(nnx.Module):
    """MNIST MLP Flatten-784-128-ReLU-10 (the last tutorial's ``Net``); returns logits.

    Counterpart of ``linear2(relu(linear1(nn.Flatten()(x))))`` with
    ``linear1 = nn.Linear(28*28, 128)`` and ``linear2 = nn.Linear(128, 10)``.

    Args:
        rngs: random streams for parameter initialization.
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = _NO_FLATTEN

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = Linear(28 * 28, 128, rngs=rngs)
        self.linear2 = Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 28, 28, 1)`` images to ``(B, 10)`` logits; ``rngs`` is unused (no dropout)."""
        del rngs
        x = _flatten_images(x, 784, "MLP128")  # (B, 784)
        return self.linear2(jax.nn.relu(self.linear1(x)))


class ConvNet(nnx.Module):
    """The tutorial's MNIST ``ConvNet``; returns log-probabilities (``log_softmax``).

    conv(1->32, 3) ReLU, conv(32->64, 3) ReLU, max_pool 2, Dropout2d(0.25),
    flatten (12*12*64 = 9216), fc1 128, ReLU, Dropout(0.5), fc2 10, log_softmax.

    The tutorial applies ``nn.Dropout2d(0.5)`` to fc1's 2-D output; PyTorch
    deprecates that (on 2-D input it drops whole rows) and its own MNIST
    example uses plain ``nn.Dropout(0.5)`` there, as this model does.

    Args:
        rngs: random streams for parameter initialization.

    >>> ConvNet(rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1)), rngs=nnx.Rngs(dropout=1)).shape
    (2, 10)
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = MappingProxyType({"fc1": (64, 12, 12)})

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(1, 32, 3, 1, rngs=rngs)
        self.conv2 = Conv2d(32, 64, 3, 1, rngs=rngs)
        self.dropout1 = Dropout2d(0.25)
        self.dropout2 = Dropout(0.5)
        self.fc1 = Linear(9216, 128, rngs=rngs)
        self.fc2 = Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 28, 28, 1)`` images to ``(B, 10)`` log-probabilities."""
        x = jax.nn.relu(self.conv1(x))  # (B, 26, 26, 32)
        x = jax.nn.relu(self.conv2(x))  # (B, 24, 24, 64)
        x = max_pool2d(x, 2)  # (B, 12, 12, 64)
        x = self.dropout1(x, rngs=rngs)
        x = flatten(x)  # (B, 9216), (H, W, C) order
        x = self.dropout2(jax.nn.relu(self.fc1(x)), rngs=rngs)
        return jax.nn.log_softmax(self.fc2(x), axis=-1)


class CifarCNN(nnx.Module):
    """The tutorial's CIFAR-10 ``CNN``; returns logits.

    conv(3->16, 3, pad 1), max_pool 2, conv(16->32, 3, pad 1), max_pool 2,
    flatten, fc1(32*8*8 -> 128), fc2(128 -> 10). Exactly as the tutorial, it
    has *no* activation functions, so it is a linear model of its input apart
    from the max-pooling. The tutorial's ``32 * 7 * 7`` input size of fc1 is a
    bug for 32x32 images (two 2x2 poolings leave 8x8); it is ``32 * 8 * 8`` here.

    Args:
        rngs: random streams for parameter initialization.

    >>> CifarCNN(rngs=nnx.Rngs(0))(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = MappingProxyType({"fc1": (32, 8, 8)})

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 16, kernel_size=3, stride=1, padding=1, rngs=rngs)
        self.conv2 = Conv2d(16, 32, kernel_size=3, stride=1, padding=1, rngs=rngs)
        self.fc1 = Linear(32 * 8 * 8, 128, rngs=rngs)
        self.fc2 = Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 32, 32, 3)`` images to ``(B, 10)`` logits; ``rngs`` is unused (no dropout)."""
        del rngs
        x = max_pool2d(self.conv1(x), kernel_size=2, stride=2)  # (B, 16, 16, 16)
        x = max_pool2d(self.conv2(x), kernel_size=2, stride=2)  # (B, 8, 8, 32)
        return self.fc2(self.fc1(flatten(x)))  # (B, 2048) -> (B, 128) -> (B, 10)


class LinearRegression(nnx.Module):
    """Linear regression ``y = x @ W + b``, the tutorials' ``LinearRegression`` / ``nn.Linear(1, 1)``.

    Args:
        in_features: number of input features.
        out_features: number of outputs.
        rngs: random streams for parameter initialization.

    Raises:
        ConfigError: if a size is not a positive int.

    >>> LinearRegression(rngs=nnx.Rngs(0))(jnp.ones((4, 1))).shape
    (4, 1)
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = _NO_FLATTEN

    def __init__(self, in_features: int = 1, out_features: int = 1, *, rngs: nnx.Rngs):
        self.linear = Linear(in_features, out_features, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, in_features)`` to ``(B, out_features)``; ``rngs`` is unused."""
        del rngs
        return self.linear(x)
