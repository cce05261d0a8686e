"""The training state: what create_train_state splits off, merge_model rebuilds and copy_state protects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnet
from jaxnet.models import create_model
from jaxnet.parallel import sharding
from jaxnet.state import TrainState, copy_state, count_params, create_train_state, merge_model
from tests.helpers import trees_equal


class Net(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout (its own stream) -> Linear, on (B, 6) inputs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def tabular(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5]).astype(np.int32)


def test_create_train_state_splits_params_from_the_other_variables():
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(Net(rngs=nnx.Rngs(0)), tx, seed=7)
    assert isinstance(state, TrainState)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(7))
    assert set(state.params) == {"fc1", "bn", "fc2"}  # BatchNorm's scale and bias are trained
    assert set(state.params["bn"]) == {"scale", "bias"}
    assert set(state.model_state["bn"]) == {"mean", "var"}  # its running statistics are not
    assert "rngs" in state.model_state["drop"]  # Dropout's own stream travels in the state
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(state.params))
    model = nnx.merge(graphdef, state.params, state.model_state)
    assert isinstance(model, Net)


def test_create_train_state_gives_the_state_buffers_of_its_own():
    # The first donated step must not delete the arrays of the model the user still holds.
    model = Net(rngs=nnx.Rngs(0))
    kernel = np.asarray(model.fc1.kernel[...]).copy()
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(model, tx)
    x, y = tabular(16)
    jaxnet.make_train_step(graphdef, tx, jaxnet.loss_for_output("logits"))(state, {"image": x, "label": y})
    assert jax.tree.leaves(state.params)[0].is_deleted()  # the state itself was donated ...
    np.testing.assert_array_equal(np.asarray(model.fc1.kernel[...]), kernel)  # ... the model's arrays were not


def test_merge_model_rebuilds_the_model_in_eval_mode():
    graphdef, state = create_train_state(Net(rngs=nnx.Rngs(0)), optax.sgd(0.1))
    model = merge_model(graphdef, state)
    assert model.bn.use_running_average and model.drop.deterministic  # model.eval()
    x, _ = tabular(8)
    np.testing.assert_array_equal(model(x), model(x))  # no dropout: the same outputs twice
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert trees_equal(params, state.params)


def test_count_params_counts_every_scalar():
    _, state = create_train_state(create_model("mlp"), optax.sgd(0.1))
    assert count_params(state.params) == 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10  # torch's numel sum
    assert count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10


def test_copy_state_keeps_a_state_through_donated_steps():
    x, y = tabular(32)
    tx = optax.sgd(0.1)
    graphdef, state = jaxnet.create_train_state(Net(rngs=nnx.Rngs(0)), tx)
    step = jaxnet.make_train_step(graphdef, tx, jaxnet.loss_for_output("logits"))
    state, _ = step(state, {"image": x[:16], "label": y[:16]})
    best = jaxnet.copy_state(state)
    kept = jax.tree.map(np.asarray, best.params)
    donated = state
    state, _ = step(state, {"image": x[16:], "label": y[16:]})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, best.params), kept)
    with pytest.raises(RuntimeError, match="deleted"):  # what the copy protects against
        np.asarray(jax.tree.leaves(donated.params)[0])


def test_copy_state_keeps_the_shardings():
    _, state = create_train_state(create_model("mlp"), optax.sgd(0.1))
    mesh = sharding.make_mesh()
    sharded = sharding.shard_state(state, sharding.state_shardings(state, mesh, fsdp=True))
    copy = copy_state(sharded)
    assert sharding.describe_shardings(copy) == sharding.describe_shardings(sharded)
    assert sharding.describe_shardings(copy)["params/fc1/kernel/value"] == "P('data', None)"
    assert all(a is not b for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(sharded)))
    assert trees_equal(copy, sharded)
