"""Data parallel and FSDP with jit + NamedSharding against the single-device step (8 fake CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxnet.compilation import CompileCounter
from jaxnet.errors import ConfigError
from jaxnet.parallel import sharding
from jaxnet.step import make_eval_step
from tests.helpers import leafwise_rel_err, mnist_batches, rel_err
from tests.parallel.helpers import LOSS, TRANSFORM, setup, single_device_run

# --- mesh, sizes and layouts -------------------------------------------------------------


def test_make_mesh_uses_all_devices_with_auto_axis():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 8}
    assert mesh.axis_types == (AxisType.Auto,)
    assert list(mesh.devices) == jax.devices()
    assert dict(sharding.make_mesh(4).shape) == {"data": 4}


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_make_mesh_rejects_bad_counts(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        sharding.make_mesh(bad)


def test_make_mesh_too_many_devices_names_the_flag():
    with pytest.raises(ConfigError, match=r"asked for 16 devices but only 8 cpu.*device_count=16"):
        sharding.make_mesh(16)


def test_check_batch_divisible_suggests_the_nearest_multiples():
    sharding.check_batch_divisible(64, 8)
    expected = r"^batch size 100 is not divisible by 8 devices; use a multiple of 8 \(e\.g\. 96 or 104\)$"
    with pytest.raises(ConfigError, match=expected):
        sharding.check_batch_divisible(100, 8)
    with pytest.raises(ConfigError, match=r"use a multiple of 8 \(e\.g\. 8\)"):
        sharding.check_batch_divisible(5, 8)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((784, 512), PartitionSpec("data", None)),  # both divisible: the larger
        ((100, 512), PartitionSpec(None, "data")),  # only the second divisible
        ((3, 3, 32, 64), PartitionSpec(None, None, None, "data")),
        ((9216, 128), PartitionSpec("data", None)),
        ((99, 101), PartitionSpec()),  # nothing divisible: replicated
        ((512,), PartitionSpec()),
    ],  # small: replicated
)
def test_fsdp_spec(shape, expected):
    assert sharding.fsdp_spec(shape, 8) == expected


def test_shard_batch_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="batch size 12 is not divisible by 8 devices"):
        sharding.shard_batch(mnist_batches(1, 12)[0], sharding.make_mesh())
    placed = sharding.shard_batch(mnist_batches(1, 16)[0], sharding.make_mesh())
    assert placed["image"].sharding.spec == PartitionSpec("data")
    assert len(placed["image"].addressable_shards) == 8
    assert placed["image"].addressable_shards[0].data.shape == (2, 28, 28, 1)


# --- the jit-sharded steps equal the single-device step --------------------------------


@pytest.mark.parametrize("num_devices", [8, 4])
def test_data_parallel_step_equals_single_device_step_with_dropout(num_devices):
    # The jit-sharded program is the global program: dropout masks are drawn for
    # the global batch (partitionable threefry), so even the MLP with dropout matches.
    data = mnist_batches(3)
    ref_state, ref_losses = single_device_run("mlp", optax.adam(1e-3), data)
    graphdef, state, tx = setup("mlp")
    mesh = sharding.make_mesh(num_devices)
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    losses = []
    for batch in data:
        state, m = step(state, sharding.shard_batch(batch, mesh))
        losses.append(float(m["loss"]))
    assert rel_err(losses, ref_losses) <= 1e-5
    assert leafwise_rel_err(state.params, ref_state.params) <= 1e-5
    assert leafwise_rel_err(state.opt_state, ref_state.opt_state) <= 1e-5
    kernel = state.params["fc1"]["kernel"][...]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == num_devices


def test_fsdp_step_equals_single_device_step_and_really_shards():
    data = mnist_batches(3)
    ref_state, ref_losses = single_device_run("mlp", optax.adam(1e-3), data)
    graphdef, state, tx = setup("mlp")
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, fsdp=True)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    losses = []
    for batch in data:
        state, m = step(state, batch)  # host batches are split by in_shardings
        losses.append(float(m["loss"]))
    assert rel_err(losses, ref_losses) <= 1e-5
    assert leafwise_rel_err(state.params, ref_state.params) <= 1e-5
    # After the steps, parameters and Adam moments are still split 8 ways: each device
    # holds 1/8 of fc1's (784, 512) kernel.
    specs = sharding.describe_shardings(state)
    assert specs["params/fc1/kernel/value"] == "P('data', None)"
    assert specs["params/fc2/kernel/value"] == "P('data', None)"
    assert specs["params/fc3/kernel/value"] == "P()"  # (256, 10): below FSDP_MIN_SIZE
    assert specs["opt_state/0/mu/fc1/kernel/value"] == "P('data', None)"
    assert specs["opt_state/0/nu/fc2/kernel/value"] == "P('data', None)"
    assert specs["step"] == specs["rng"] == "P()"
    kernel = state.params["fc1"]["kernel"][...]
    assert not kernel.sharding.is_fully_replicated
    assert {s.data.shape for s in kernel.addressable_shards} == {(98, 512)}
    bias = state.params["fc1"]["bias"][...]
    assert bias.sharding.is_fully_replicated  # 512 values: below FSDP_MIN_SIZE


def test_sharded_step_compiles_once():
    graphdef, state, tx = setup("mlp512")
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    data = mnist_batches(3, 16)
    state, _ = step(state, data[0])
    with CompileCounter() as counter:
        for batch in data[1:]:
            state, m = step(state, batch)
        m["loss"].block_until_ready()
    assert counter.compiles == 0


def test_sharded_eval_step_equals_eval_step():
    graphdef, state, _ = setup("mlp")
    batch = mnist_batches(1, 20)[0]  # any size: evaluation batches are replicated
    ref = make_eval_step(graphdef, LOSS, transform=TRANSFORM)(state, batch)
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    out = sharding.make_sharded_eval_step(graphdef, LOSS, mesh, shardings, transform=TRANSFORM)(
        sharding.shard_state(state, shardings), batch
    )
    assert out["outputs"].sharding.is_fully_replicated
    assert rel_err(out["outputs"], ref["outputs"]) <= 1e-5
    assert rel_err(out["loss"], ref["loss"]) <= 1e-5


def test_step_keeps_structure_and_dtypes():
    graphdef, state, tx = setup("mlp")
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    new_state, _ = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)(
        sharding.shard_state(state, shardings), mnist_batches(1, 8)[0]
    )
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == before
    assert new_state.rng.dtype == jnp.uint32


def test_dispatch_limiter_keeps_long_loops_from_deadlocking():
    # 80 sharded steps dispatched back to back: without the limiter XLA:CPU's
    # collectives deadlock once ~32 steps are queued (the process aborts after 40 s).
    graphdef, state, tx = setup("mlp512", optax.sgd(0.01))
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    batch = sharding.shard_batch(mnist_batches(1, 16)[0], mesh)
    wait = sharding.make_dispatch_limiter()
    for _ in range(80):
        state, m = step(state, batch)
        wait(m)
    assert int(state.step) == 80 and np.isfinite(float(m["loss"]))
    with pytest.raises(ConfigError, match="max_in_flight must be at least 1"):
        sharding.make_dispatch_limiter(0)
