"""The DDP step written per device (shard_map and pmap, explicit pmean) against the single-device step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from jaxnet.errors import ConfigError
from jaxnet.parallel import sharding
from jaxnet.parallel import steps as distributed_step
from jaxnet.step import train_step_fn
from tests.helpers import leafwise_rel_err, mnist_batches, rel_err
from tests.parallel.helpers import LOSS, TRANSFORM, setup, single_device_run


def test_shard_map_step_equals_single_device_step():
    tx = optax.sgd(0.05, momentum=0.9)
    data = mnist_batches(3)
    ref_state, ref_losses = single_device_run("mlp512", tx, data)  # no dropout
    graphdef, state, _ = setup("mlp512", tx)
    mesh = sharding.make_mesh()
    step = distributed_step.make_shard_map_train_step(graphdef, tx, LOSS, mesh, transform=TRANSFORM)
    losses = []
    for batch in data:
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert rel_err(losses, ref_losses) <= 1e-5
    assert leafwise_rel_err(state.params, ref_state.params) <= 1e-5
    assert int(state.step) == 3
    assert rel_err(state.rng, ref_state.rng) == 0  # the per-device key is not kept


def test_shard_map_step_without_all_reduce_would_diverge():
    # The explicit pmean is what keeps the replicas equal: without it, each
    # device applies its own slice's gradient and the "replicated" output is
    # just device 0's parameters, not the global-batch step.
    tx = optax.sgd(0.05)
    data = mnist_batches(1)
    ref_state, _ = single_device_run("mlp512", tx, data)
    graphdef, state, _ = setup("mlp512", tx)
    mesh = sharding.make_mesh()
    local = train_step_fn(graphdef, tx, LOSS, transform=TRANSFORM)
    no_allreduce = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec("data")),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,
        )
    )
    state, _ = no_allreduce(state, data[0])
    assert leafwise_rel_err(state.params, ref_state.params) > 1e-3


def test_pmap_step_equals_single_device_step():
    tx = optax.adam(1e-3)
    data = mnist_batches(2)
    ref_state, ref_losses = single_device_run("mlp512", tx, data)
    graphdef, state, _ = setup("mlp512", tx)
    step = distributed_step.make_pmap_train_step(graphdef, tx, LOSS, transform=TRANSFORM)
    stacked = distributed_step.replicate(state, 8)
    losses = []
    for batch in data:
        stacked, m = step(stacked, distributed_step.split_batch(batch, 8))
        assert m["loss"].shape == (8,)
        losses.append(float(m["loss"][0]))
    final = distributed_step.unreplicate(stacked)
    assert rel_err(losses, ref_losses) <= 1e-5
    assert leafwise_rel_err(final.params, ref_state.params) <= 1e-5
    # Every replica holds the same parameters after the all-reduced update.
    kernel = np.asarray(stacked.params["fc1"]["kernel"][...])
    assert np.array_equal(kernel[0], kernel[7])


def test_split_batch_rejects_indivisible():
    with pytest.raises(ConfigError, match="batch size 10 is not divisible by 8 devices"):
        distributed_step.split_batch(mnist_batches(1, 10)[0], 8)
