"""Data parallel, FSDP, shard_map and pmap steps against the single-device step (8 fake CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxnet.parallel import steps as distributed_step
from jaxnet.parallel import sharding
from jaxnet.compilation import CompileCounter
from jaxnet.errors import ConfigError
from jaxnet.models import create_model
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_eval_step, make_train_step, train_step_fn
from jaxnet.train import make_image_transform

TRANSFORM = make_image_transform((0.1307,), (0.3081,))
LOSS = loss_for_output("logits")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over every leaf of two pytrees (0 when both are 0)."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def leafwise_rel_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def batches(n_steps: int, batch_size: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
         "label": rng.integers(0, 10, batch_size).astype(np.int32)}
        for _ in range(n_steps)
    ]


def setup(model_name: str = "mlp", tx: optax.GradientTransformation | None = None):
    tx = tx or optax.adam(1e-3)
    graphdef, state = create_train_state(create_model(model_name, seed=0), tx, seed=0)
    return graphdef, state, tx


def single_device_run(model_name: str, tx: optax.GradientTransformation, data):
    graphdef, state, _ = setup(model_name, tx)
    step = make_train_step(graphdef, tx, LOSS, transform=TRANSFORM)
    losses = []
    for batch in data:
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


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
    [((784, 512), PartitionSpec("data", None)),  # both divisible: the larger
     ((100, 512), PartitionSpec(None, "data")),  # only the second divisible
     ((3, 3, 32, 64), PartitionSpec(None, None, None, "data")),
     ((9216, 128), PartitionSpec("data", None)),
     ((99, 101), PartitionSpec()),  # nothing divisible: replicated
     ((512,), PartitionSpec())],  # small: replicated
)
def test_fsdp_spec(shape, expected):
    assert sharding.fsdp_spec(shape, 8) == expected


def test_shard_batch_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="batch size 12 is not divisible by 8 devices"):
        sharding.shard_batch(batches(1, 12)[0], sharding.make_mesh())
    placed = sharding.shard_batch(batches(1, 16)[0], sharding.make_mesh())
    assert placed["image"].sharding.spec == PartitionSpec("data")
    assert len(placed["image"].addressable_shards) == 8
    assert placed["image"].addressable_shards[0].data.shape == (2, 28, 28, 1)


# --- each parallel step equals the single-device step ------------------------------------


@pytest.mark.parametrize("num_devices", [8, 4])
def test_data_parallel_step_equals_single_device_step_with_dropout(num_devices):
    # The jit-sharded program is the global program: dropout masks are drawn for
    # the global batch (partitionable threefry), so even the MLP with dropout matches.
    data = batches(3)
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
    data = batches(3)
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


def test_shard_map_step_equals_single_device_step():
    tx = optax.sgd(0.05, momentum=0.9)
    data = batches(3)
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
    data = batches(1)
    ref_state, _ = single_device_run("mlp512", tx, data)
    graphdef, state, _ = setup("mlp512", tx)
    mesh = sharding.make_mesh()
    local = train_step_fn(graphdef, tx, LOSS, transform=TRANSFORM)
    no_allreduce = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                                         out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False))
    state, _ = no_allreduce(state, data[0])
    assert leafwise_rel_err(state.params, ref_state.params) > 1e-3


def test_pmap_step_equals_single_device_step():
    tx = optax.adam(1e-3)
    data = batches(2)
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
        distributed_step.split_batch(batches(1, 10)[0], 8)


def test_sharded_step_compiles_once():
    graphdef, state, tx = setup("mlp512")
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)
    data = batches(3, 16)
    state, _ = step(state, data[0])
    with CompileCounter() as counter:
        for batch in data[1:]:
            state, m = step(state, batch)
        m["loss"].block_until_ready()
    assert counter.compiles == 0


def test_sharded_eval_step_equals_eval_step():
    graphdef, state, _ = setup("mlp")
    batch = batches(1, 20)[0]  # any size: evaluation batches are replicated
    ref = make_eval_step(graphdef, LOSS, transform=TRANSFORM)(state, batch)
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    out = sharding.make_sharded_eval_step(graphdef, LOSS, mesh, shardings, transform=TRANSFORM)(
        sharding.shard_state(state, shardings), batch)
    assert out["outputs"].sharding.is_fully_replicated
    assert rel_err(out["outputs"], ref["outputs"]) <= 1e-5
    assert rel_err(out["loss"], ref["loss"]) <= 1e-5


def test_step_keeps_structure_and_dtypes():
    graphdef, state, tx = setup("mlp")
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    new_state, _ = sharding.make_sharded_train_step(graphdef, tx, LOSS, mesh, shardings, transform=TRANSFORM)(
        sharding.shard_state(state, shardings), batches(1, 8)[0])
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
    batch = sharding.shard_batch(batches(1, 16)[0], mesh)
    wait = sharding.make_dispatch_limiter()
    for _ in range(80):
        state, m = step(state, batch)
        wait(m)
    assert int(state.step) == 80 and np.isfinite(float(m["loss"]))
    with pytest.raises(ConfigError, match="max_in_flight must be at least 1"):
        sharding.make_dispatch_limiter(0)
