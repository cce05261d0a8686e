"""Lowering and packing a model: platforms, float inputs, bad arguments, RNG variables left out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnet.data.transforms import make_image_transform
from jaxnet.errors import ConfigError
from jaxnet.export import export_model, load_exported, make_forward, predict_files
from jaxnet.state import create_train_state
from jaxnet.step import make_predict_fn
from tests.export.helpers import MNIST_MEAN, MNIST_STD, Net, trained_state


def test_cpu_only_export(tmp_path):
    spec, graphdef, state = trained_state("mlp128")
    path = tmp_path / "m.jaxexport"
    path.write_bytes(
        export_model(
            graphdef,
            state,
            input_shape=spec.input_shape,
            transform=make_image_transform(MNIST_MEAN, MNIST_STD),
            platforms=("cpu",),
        )
    )
    assert load_exported(path).exported.platforms == ("cpu",)


def test_regression_model_takes_floats(tmp_path):
    spec, graphdef, state = trained_state("linear")
    path = tmp_path / "linear.jaxexport"
    path.write_bytes(export_model(graphdef, state, input_shape=spec.input_shape, output="regression"))
    model = load_exported(path)
    x = np.array([[1.0], [2.0], [3.0]], np.float32)
    live = make_predict_fn(graphdef)(state, x)
    np.testing.assert_array_equal(model(x), np.asarray(live))
    with pytest.raises(ConfigError, match="regression model"):
        predict_files(model, [])


def test_bad_export_arguments():
    spec, graphdef, state = trained_state("mlp128")
    with pytest.raises(ConfigError, match="input_shape"):
        export_model(graphdef, state, input_shape=(28, 0, 1))
    with pytest.raises(ConfigError, match="platform"):
        export_model(graphdef, state, input_shape=spec.input_shape, platforms=("cuda", "metal"))
    with pytest.raises(ConfigError, match=r"cannot export the model for inputs \(b, 32, 32, 3\)"):
        export_model(graphdef, state, input_shape=(32, 32, 3), transform=make_image_transform((0.5,) * 3, (0.5,) * 3))


def test_export_model_leaves_rng_variables_out(tmp_path):
    graphdef, state = create_train_state(Net(rngs=nnx.Rngs(0)), optax.sgd(0.1))
    forward = make_forward(graphdef, state.params, state.model_state)
    assert len(forward.names) == len(jax.tree.leaves(state.params)) + 2  # + BatchNorm mean and var
    assert all(not jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key) for s in forward.specs)
    path = tmp_path / "net.jaxexport"
    path.write_bytes(export_model(graphdef, state, input_shape=(28, 28, 1)))
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    np.testing.assert_allclose(load_exported(path)(x), np.asarray(model(jnp.asarray(x))), rtol=1e-5, atol=1e-5)
