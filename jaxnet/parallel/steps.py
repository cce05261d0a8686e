"""The data-parallel step written the DDP way: per-device loss, explicit all-reduce.

:func:`jaxnet.parallel.sharding.make_sharded_train_step` lets XLA place the
collectives. This module spells them out, which is how PyTorch's
``DistributedDataParallel`` works and how to think about it:

1. every device holds a full replica of the state and a ``B / n`` slice of
   the global batch;
2. it computes the loss *of its slice* and the gradients of that loss;
3. the gradients are averaged over the devices (``jax.lax.pmean``, DDP's
   all-reduce during ``backward``), so every replica applies the same
   update and the replicas stay identical.

Two spellings: :func:`make_shard_map_train_step` (``jax.shard_map``, the
current API) and :func:`make_pmap_train_step` (``jax.pmap``, kept for
comparison: JAX has it in maintenance mode and reimplemented it on top of
``jit`` + ``shard_map``; new code should not use it).

Both reuse :func:`jaxnet.step.train_step_fn` unchanged: the all-reduce is an
optax transformation placed in front of the optimizer
(:func:`all_reduce_gradients`), the counterpart of DDP's gradient hook.

Semantics that differ from the single-device step:

- Dropout and augmentation draw from ``fold_in(state.rng, device_index)``, so
  each device has its own masks (like giving every DDP rank its own seed);
  the masks are therefore not those of a single-device step on the global
  batch. Without dropout or augmentation the step equals the single-device
  step.
- BatchNorm normalizes with the statistics of the device's own slice (DDP
  without ``SyncBatchNorm``); the running statistics are then averaged over
  the devices so the replicas stay identical.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxnet.errors import ConfigError
from jaxnet.parallel.sharding import DATA_AXIS, check_batch_divisible
from jaxnet.state import TrainState
from jaxnet.step import Batch, LossFn, StepFn, compile_step, train_step_fn


def all_reduce_gradients(tx: optax.GradientTransformation, axis: str = DATA_AXIS) -> optax.GradientTransformation:
    """``tx`` preceded by an average of the gradients over the devices of ``axis``.

    Counterpart of DDP's gradient all-reduce (``dist.all_reduce(grad) / world_size``
    for every parameter). Its state is ``tx``'s own, so a state built with
    ``tx`` works with it. Only valid inside ``shard_map`` or ``pmap`` over ``axis``.

    Args:
        tx: the optimizer.
        axis: the mesh (or pmap) axis to average over.

    Returns:
        A ``GradientTransformation`` with ``tx.init`` and an ``update`` that
        all-reduces the gradients first.
    """

    def update_fn(grads, state, params=None):
        return tx.update(jax.lax.pmean(grads, axis), state, params)

    return optax.GradientTransformation(tx.init, update_fn)


def _pmean_floating(tree: Any, axis: str) -> Any:
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def per_device_train_step_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    axis: str = DATA_AXIS,
    **step_options: Any,
) -> StepFn:
    """What one device runs in a DDP step: its slice's step, with grads all-reduced.

    Args:
        graphdef, tx, loss_fn: as for :func:`jaxnet.step.train_step_fn`.
        axis: the device axis name of the surrounding ``shard_map``/``pmap``.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`jaxnet.step.train_step_fn`.

    Returns:
        ``step(state, local_batch) -> (state, metrics)`` whose metrics are
        averaged over the devices (the global batch's mean loss and accuracy).
    """
    local_step = train_step_fn(graphdef, all_reduce_gradients(tx, axis), loss_fn, **step_options)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        device_rng = jax.random.fold_in(state.rng, jax.lax.axis_index(axis))  # own dropout masks
        new_state, metrics = local_step(state.replace(rng=device_rng), batch)
        new_state = new_state.replace(rng=state.rng, model_state=_pmean_floating(new_state.model_state, axis))
        return new_state, jax.lax.pmean(metrics, axis)  # local means -> global means (equal slices)

    return step


def make_shard_map_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    mesh: Mesh,
    *,
    donate: bool = True,
    axis: str = DATA_AXIS,
    **step_options: Any,
) -> StepFn:
    """The DDP train step with ``jax.shard_map``: replicated state, batch split, explicit ``pmean``.

    Counterpart of one ``DistributedDataParallel`` iteration. The state goes in
    and out replicated (``P()``); the global batch is split over ``axis``
    (``P(axis)``). ``check_vma=False`` gives the classic per-device view in
    which ``jax.grad`` returns each device's *local* gradients, so the
    all-reduce is ours to write (with JAX's varying-axes checking on, the
    gradient of a replicated parameter would already be summed over devices).

    Args:
        graphdef, tx, loss_fn, donate: as for :func:`jaxnet.step.make_train_step`.
        mesh: a one-axis mesh from :func:`jaxnet.parallel.sharding.make_mesh`.
        axis: the mesh axis to split the batch over.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`jaxnet.step.train_step_fn`.

    Returns:
        The compiled ``train_step(state, batch) -> (state, metrics)``; the
        global batch size must be divisible by the number of devices.
    """
    step = per_device_train_step_fn(graphdef, tx, loss_fn, axis=axis, **step_options)
    sharded = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(axis)),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )
    return compile_step(sharded, donate=donate)


def make_pmap_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    devices: list[Any] | None = None,
    donate: bool = True,
    axis: str = DATA_AXIS,
    **step_options: Any,
) -> StepFn:
    """The same DDP step under ``jax.pmap`` -- for comparison only; ``pmap`` is in maintenance mode.

    ``pmap`` maps over a leading device axis: the state must be stacked
    (:func:`replicate`), the batch reshaped to ``(n, B / n, ...)``
    (:func:`split_batch`), and outputs come back stacked (:func:`unreplicate`).
    ``shard_map`` (:func:`make_shard_map_train_step`) does the same on
    ordinary global arrays and is what JAX now builds ``pmap`` on.

    Args:
        graphdef, tx, loss_fn, donate: as for :func:`jaxnet.step.make_train_step`.
        devices: the devices to map over (default: all local devices).
        axis: the pmap axis name.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`jaxnet.step.train_step_fn`.

    Returns:
        ``train_step(stacked_state, split_batch) -> (stacked_state, stacked_metrics)``.
    """
    step = per_device_train_step_fn(graphdef, tx, loss_fn, axis=axis, **step_options)
    return compile_step(step, donate=donate, compiler=jax.pmap, axis_name=axis, devices=devices)


def replicate(tree: Any, num_devices: int) -> Any:
    """Stacks ``num_devices`` copies of every leaf along a new first axis, for ``pmap``."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices, *jnp.shape(x))), tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a ``pmap`` output (all copies are equal after a DDP step)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Batch, num_devices: int) -> Batch:
    """``(B, ...) -> (num_devices, B / num_devices, ...)`` for ``pmap``.

    Raises:
        ConfigError: if ``B`` is not divisible by ``num_devices``.
    """

    def split(x: Any) -> Any:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        check_batch_divisible(x.shape[0], num_devices)
        return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])

    if num_devices < 1:
        raise ConfigError(f"number of devices must be at least 1, got {num_devices}")
    return jax.tree.map(split, batch)
