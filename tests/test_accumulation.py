"""Gradient accumulation: K micro-steps of batch B equal one step of batch K*B."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxnet.accumulation import with_grad_accumulation
from jaxnet.errors import ConfigError
from jaxnet.models import create_model
from jaxnet.parallel import sharding
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_train_step
from jaxnet.train import make_image_transform
from tests.helpers import leafwise_rel_err, mnist_batch, rel_err, trees_equal

TRANSFORM = make_image_transform((0.1307,), (0.3081,))
LOSS = loss_for_output("logits")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_k_accumulation_steps_equal_one_step_of_k_times_the_batch(clip):
    k, b = 4, 8
    inner = optax.adam(1e-3) if clip is None else optax.chain(optax.clip_by_global_norm(clip), optax.adam(1e-3))
    big = mnist_batch(k * b, seed=3)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), inner, seed=0)
    ref, mref = make_train_step(graphdef, inner, LOSS, transform=TRANSFORM)(state, big)

    tx = with_grad_accumulation(inner, k)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    step = make_train_step(graphdef, tx, LOSS, transform=TRANSFORM)
    start = jax.tree.map(np.asarray, state.params)
    losses = []
    for i in range(k):
        micro = {key: v[i * b : (i + 1) * b] for key, v in big.items()}
        state, m = step(state, micro)
        losses.append(float(m["loss"]))
        if i < k - 1:
            assert trees_equal(state.params, start)  # nothing applied before the k-th micro-step
    assert leafwise_rel_err(state.params, ref.params) <= 1e-5
    assert rel_err(np.mean(losses), mref["loss"]) <= 1e-5
    assert int(state.step) == k


def test_accumulation_arguments():
    tx = optax.sgd(0.1)
    assert with_grad_accumulation(tx, 1) is tx
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer number of steps"):
            with_grad_accumulation(tx, bad)


def test_accumulation_composes_with_data_parallel_steps():
    # 8 devices x 2 micro-steps of 16 == one single-device step of 32.
    inner = optax.sgd(0.05, momentum=0.9)
    big = mnist_batch(32, seed=5)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), inner, seed=0)
    ref, _ = make_train_step(graphdef, inner, LOSS, transform=TRANSFORM)(state, big)
    tx = with_grad_accumulation(inner, 2)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    state = sharding.shard_state(state, shardings)
    for i in range(2):
        state, _ = step(state, {key: v[i * 16 : (i + 1) * 16] for key, v in big.items()})
    assert leafwise_rel_err(state.params, ref.params) <= 1e-5
