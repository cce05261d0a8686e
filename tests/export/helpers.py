"""What the export tests share (here and in tests/cli/test_export.py): trained states, images, a Flax-docs model."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from jaxnet.models import MODELS, create_model
from jaxnet.state import create_train_state

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def trained_state(name: str, seed: int = 0):
    """A state whose weights moved away from the initialization (a few SGD steps on noise)."""
    spec = MODELS[name]
    tx = optax.sgd(0.05)
    graphdef, state = create_train_state(create_model(name, seed=seed), tx, seed=seed)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype) * 0.1, state.params)
    params = jax.tree.map(lambda p, g: p - g, state.params, grads)
    return spec, graphdef, state.replace(params=params)


def random_images(shape, n=64, seed=0) -> np.ndarray:
    """``n`` random uint8 images of ``shape``."""
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


class Net(nnx.Module):
    """A model as the Flax docs write one: BatchNorm statistics and a Dropout that keeps its own RNG stream."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear = nnx.Linear(14 * 14 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.bn(self.conv(x))), window_shape=(2, 2), strides=(2, 2))
        return self.linear(self.dropout(x.reshape(x.shape[0], -1)))
