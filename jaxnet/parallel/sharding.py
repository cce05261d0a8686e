"""Data parallelism and FSDP with ``jax.jit`` and ``NamedSharding``.

PyTorch scales a model out by wrapping it, ``DistributedDataParallel(model)``
(a replica per device, gradients all-reduced during ``backward``) or
``FullyShardedDataParallel(model)`` (parameters and optimizer state split over
the devices, gathered when needed). jaxnet keeps the *same* pure train step
(:func:`jaxnet.step.train_step_fn`) and only tells ``jax.jit`` where each
array lives:

- a :class:`~jax.sharding.Mesh` of devices with one axis, ``"data"``;
- the batch split along its first axis over ``"data"`` (:func:`batch_sharding`);
- the state replicated (data parallel, :func:`replicated`) or each large
  parameter and optimizer-state array split along one axis (FSDP,
  :func:`fsdp_shardings`).

XLA's partitioner then inserts the collectives itself: the mean over the
global batch becomes a per-device partial sum plus an all-reduce, exactly
DDP's all-reduce of gradients, and under FSDP the all-gathers of parameters
and the reduce-scatter of gradients. The program means the same thing on one
device or many, so the sharded step equals the single-device step on the same
global batch -- dropout included, since JAX's partitionable ``threefry``
draws the same random bits for the global batch however it is split.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxnet.errors import ConfigError
from jaxnet.step import Batch, EvalFn, LossFn, StepFn, Transform, compile_step, eval_step_fn, train_step_fn

DATA_AXIS = "data"
# Arrays smaller than this many elements stay replicated under FSDP: splitting
# a bias costs a collective for no memory saved (torch FSDP's min_num_params idea).
FSDP_MIN_SIZE = 2**12

# Most multi-device steps to queue before waiting for the oldest: on XLA:CPU
# too many queued sharded steps deadlock in their collectives (measured in
# benchmarks/SCALING.md, "Keep at most a few multi-device steps queued").
MAX_STEPS_IN_FLIGHT = 8


def make_mesh(num_devices: int | None = None, *, axis: str = DATA_AXIS, devices: list[Any] | None = None) -> Mesh:
    """A one-axis device mesh for data parallelism.

    Counterpart of ``torch.distributed.init_process_group`` plus the list of
    ranks: the mesh names the devices a step runs on. Devices keep JAX's order
    (grouped by process), so each process owns one contiguous block of every
    batch (see :func:`jaxnet.parallel.multiprocess.process_batch_slice`). The axis type
    is ``Auto`` (``jax.make_mesh`` defaults to ``Explicit``), which lets both
    ``jit`` with shardings and ``shard_map`` use the mesh.

    Args:
        num_devices: how many devices to use; ``None`` uses all of them
            (across all processes). With several processes it must be all.
        axis: the mesh axis name.
        devices: devices to choose from; default ``jax.devices()``.

    Returns:
        A ``Mesh`` of shape ``(num_devices,)`` over axis ``axis``.

    Raises:
        ConfigError: more devices asked for than exist, fewer than 1, or a
            subset of the devices in a multi-process run.

    >>> dict(make_mesh(1).shape)
    {'data': 1}
    """
    available = list(jax.devices() if devices is None else devices)
    n = len(available) if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"number of devices must be a positive integer, got {num_devices!r}")
    if n > len(available):
        platform = available[0].platform if available else "none"
        hint = (
            f"; on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count={n} set before JAX starts"
            if platform == "cpu"
            else ""
        )
        raise ConfigError(f"asked for {n} devices but only {len(available)} {platform} devices exist{hint}")
    if jax.process_count() > 1 and n != len(available):
        raise ConfigError(
            f"with {jax.process_count()} processes the mesh must use all {len(available)} devices, "
            f"got {n}; leave the number of devices unset (--devices) in a multi-process run"
        )
    return Mesh(np.array(available[:n]), (axis,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, *, axis: str = DATA_AXIS) -> NamedSharding:
    """Splits an array's first (batch) axis over ``axis``: each device gets ``B / n`` rows.

    Counterpart of what ``DistributedSampler`` does per rank, for one batch.

    >>> batch_sharding(make_mesh(1)).spec
    P('data',)
    """
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh`` (DDP's model replicas).

    >>> replicated(make_mesh(1)).spec
    P()
    """
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
    """Checks that a global batch splits evenly over the data-parallel devices.

    Raises:
        ConfigError: naming the nearest valid batch sizes, e.g. "batch size 96
            is not divisible by 7 devices; use a multiple of 7 (e.g. 91 or 98)".

    >>> check_batch_divisible(64, 8)
    """
    if num_devices < 1:
        raise ConfigError(f"number of devices must be at least 1, got {num_devices}")
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        upper = lower + num_devices
        options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ConfigError(
            f"batch size {batch_size} is not divisible by {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {options})"
        )


def fsdp_spec(
    shape: tuple[int, ...], num_devices: int, *, axis: str = DATA_AXIS, min_size: int = FSDP_MIN_SIZE
) -> PartitionSpec:
    """Where FSDP splits one array: along its largest axis divisible by ``num_devices``.

    Args:
        shape: the array's shape.
        num_devices: size of the mesh axis.
        axis: the mesh axis name.
        min_size: arrays with fewer elements are replicated.

    Returns:
        ``PartitionSpec`` with ``axis`` at the chosen dimension, or ``P()``
        (replicated) for small arrays and arrays with no divisible axis.

    >>> fsdp_spec((784, 512), 8, min_size=1)
    P('data', None)
    >>> fsdp_spec((10,), 8, min_size=1)
    P()
    """
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    divisible = [d for d in range(len(shape)) if shape[d] % num_devices == 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda d: (shape[d], -d))  # the largest; the first of equals
    return PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))


def fsdp_shardings(abstract_state: Any, mesh: Mesh, *, axis: str = DATA_AXIS, min_size: int = FSDP_MIN_SIZE) -> Any:
    """Shardings that split every large array of a state over the devices (FSDP / ZeRO-3).

    Counterpart of ``FullyShardedDataParallel(model)`` with its sharded
    optimizer: each device keeps ``1/n`` of every large parameter and of its
    Adam moments. Parameters and their optimizer state share a shape, so they
    get the same split. Scalars (step counts, the PRNG key) are replicated.

    Args:
        abstract_state: the state or its ``jax.eval_shape`` (only shapes are read).
        mesh: the device mesh.
        axis: the mesh axis to split over.
        min_size: arrays with fewer elements stay replicated.

    Returns:
        A pytree of ``NamedSharding`` with the state's structure, for
        :func:`shard_state` and :func:`make_sharded_train_step`.
    """
    n = mesh.shape[axis]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, axis=axis, min_size=min_size)), abstract_state
    )


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool = False, axis: str = DATA_AXIS) -> Any:
    """The state's shardings: replicated (data parallel) or split (FSDP).

    Args:
        abstract_state: the state or its ``jax.eval_shape``.
        mesh: the device mesh.
        fsdp: split large arrays over ``axis`` instead of replicating them.
        axis: the mesh axis.

    Returns:
        A pytree of ``NamedSharding`` with the state's structure.
    """
    if fsdp:
        return fsdp_shardings(abstract_state, mesh, axis=axis)
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def shard_state(state: Any, shardings: Any) -> Any:
    """Places a state onto its shardings (``model.to(device)`` for a sharded model).

    Every process must pass the same values (e.g. the state built from the
    same seed); each device receives only its own shard.

    Args:
        state: the state, on the host or any device.
        shardings: from :func:`state_shardings` or :func:`fsdp_shardings`.

    Returns:
        The state as sharded ``jax.Array`` leaves.
    """
    return jax.device_put(state, shardings)


def make_sharded_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    mesh: Mesh,
    shardings: Any,
    *,
    step_fn: StepFn | None = None,
    donate: bool = True,
    axis: str = DATA_AXIS,
    **step_options: Any,
) -> StepFn:
    """The data-parallel (or FSDP) ``train_step(state, batch)``: one jit with explicit shardings.

    Counterpart of a ``DistributedDataParallel`` (or ``FullyShardedDataParallel``)
    training iteration. The math is :func:`jaxnet.step.train_step_fn`'s; only
    the placement differs: the batch is split over ``axis``, the state is laid
    out as ``shardings`` says, and metrics come back replicated.

    Args:
        graphdef, tx, loss_fn: as for :func:`jaxnet.step.make_train_step`.
        mesh: the device mesh (:func:`make_mesh`).
        shardings: the state's shardings (:func:`state_shardings`).
        step_fn: a pure step to compile instead of ``train_step_fn(...)``,
            e.g. :func:`jaxnet.precision.loss_scaled_train_step_fn` (then
            ``graphdef``, ``tx``, ``loss_fn`` and ``step_options`` are ignored).
        donate: donate the input state's buffers.
        axis: the batch's mesh axis.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`jaxnet.step.train_step_fn`.

    Returns:
        The compiled ``train_step(state, batch) -> (state, metrics)``; the
        global batch size must be divisible by ``mesh.shape[axis]``.
    """
    if step_fn is None:
        step_fn = train_step_fn(graphdef, tx, loss_fn, **step_options)
    return compile_step(
        step_fn,
        donate=donate,
        in_shardings=(shardings, batch_sharding(mesh, axis=axis)),
        out_shardings=(shardings, replicated(mesh)),
    )


def make_sharded_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    mesh: Mesh,
    shardings: Any,
    *,
    transform: Transform | None = None,
    metrics: Any = None,
) -> EvalFn:
    """``eval_step(state, batch) -> {"outputs", "loss", "metrics"}`` over a sharded state.

    Like :func:`jaxnet.step.make_eval_step`; the batch is replicated (every
    process passes the same whole evaluation batch, of any size) and the
    outputs come back replicated, so each process can read them.

    Args:
        graphdef: the model's graph definition.
        loss_fn: the training loss, reported per example.
        mesh: the device mesh.
        shardings: the state's shardings.
        transform: on-device preprocessing, applied with ``train=False``.
        metrics: per-example evaluation metrics (see :func:`jaxnet.step.make_eval_step`).

    Returns:
        The compiled evaluation step.
    """
    return jax.jit(
        eval_step_fn(graphdef, loss_fn, transform=transform, metrics=metrics),
        in_shardings=(shardings, replicated(mesh)),
        out_shardings=replicated(mesh),
    )


def shard_batch(batch: Batch, mesh: Mesh, *, axis: str = DATA_AXIS) -> Batch:
    """Sends a host batch straight onto its shards (no copy through one device).

    Single-process counterpart of :func:`jaxnet.parallel.multiprocess.global_batch_from_local`.

    Raises:
        ConfigError: if the batch size is not divisible by the number of devices.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    for size in sizes:
        check_batch_divisible(int(size), mesh.shape[axis])
    return jax.device_put(batch, batch_sharding(mesh, axis=axis))


def describe_shardings(tree: Any) -> dict[str, str]:
    """``{"params/fc1/kernel/value": "P('data', None)", ...}`` for a sharded pytree, to print or test."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): str(leaf.sharding.spec) for path, leaf in flat}


def make_dispatch_limiter(max_in_flight: int = MAX_STEPS_IN_FLIGHT) -> Callable[[Any], None]:
    """A loop helper that keeps at most ``max_in_flight`` multi-device steps queued.

    JAX dispatches steps asynchronously, so a Python loop can run far ahead of
    the devices. On XLA:CPU, too many queued multi-device steps deadlock in
    their collectives (see ``MAX_STEPS_IN_FLIGHT``); waiting for the step
    ``max_in_flight`` back keeps the pipeline full without getting there.
    Call the returned ``wait(metrics)`` after every step.

    Args:
        max_in_flight: steps allowed to be queued (>= 1).

    Returns:
        ``wait(outputs)``: records a step's outputs and blocks until the
        oldest recorded ones are ready when more than ``max_in_flight`` are queued.

    Raises:
        ConfigError: if ``max_in_flight`` < 1.

    >>> wait = make_dispatch_limiter(2)
    >>> for i in range(5):
    ...     wait(jax.numpy.ones(3) * i)
    """
    if max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
    pending: collections.deque = collections.deque()

    def wait(outputs: Any) -> None:
        pending.append(outputs)
        while len(pending) > max_in_flight:
            jax.block_until_ready(pending.popleft())

    return wait
