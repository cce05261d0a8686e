"""fit's compiled functions: the state and the train, eval and scan steps, on one device or a mesh.

:func:`build_steps` is where a run's choices meet the step factories: the
precision policy (:mod:`jaxnet.precision`), loss scaling for float16, and the
placement, one device (:func:`jaxnet.step.compile_step`) or a data-parallel
mesh (:mod:`jaxnet.parallel.sharding`). Every variant compiles the same pure
:func:`jaxnet.step.train_step_fn` (or its loss-scaled form), so a run on
eight devices or in scan mode trains what a plain run trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.state import TrainState, create_train_state
from jaxnet.step import (
    EpochFn,
    EvalFn,
    LossFn,
    MetricFn,
    StepFn,
    Transform,
    accuracy_for_output,
    compile_step,
    loss_for_output,
    make_eval_step,
    scan_epoch_fn,
    train_step_fn,
)


@dataclasses.dataclass(frozen=True)
class FitSteps:
    """The compiled functions of a run and where batches go."""

    graphdef: nnx.GraphDef
    state: TrainState  # the first state, placed as the steps expect it
    train: StepFn  # train_step(state, batch) -> (state, metrics)
    eval: EvalFn  # eval_step(state, batch) -> {"outputs", "loss", "metrics"}
    scan: EpochFn | None  # train_epoch(state, images, labels, idx) -> (state, metrics)
    batch_sharding: Any  # where training batches are placed (None: default device)
    mesh: Any  # the device mesh, or None on one device


def default_train_metrics(output: str) -> dict[str, MetricFn]:
    """The metrics a train step reports besides the loss: ``accuracy`` for classifiers, else none."""
    accuracy = accuracy_for_output(output)
    return {"accuracy": accuracy} if accuracy is not None else {}


def build_steps(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    output: str,
    transform: Transform | None,
    seed: int = 0,
    devices: int | None = None,
    fsdp: bool = False,
    precision: str = "fp32",
    scan: bool = False,
    loss_fn: LossFn | None = None,
    train_metrics: Mapping[str, MetricFn] | None = None,
    eval_metrics: Mapping[str, MetricFn] | None = None,
) -> FitSteps:
    """Builds the state and the compiled steps for one device or a data-parallel mesh.

    Args:
        model: the NNX model (not modified: a mixed-precision run computes with a copy).
        tx: the optimizer; ``precision="fp16"`` wraps it in
            :func:`jaxnet.precision.dynamic_loss_scaling` (``GradScaler``).
        output: the output kind (:data:`jaxnet.outputs.OUTPUT_KINDS`).
        transform: on-device preprocessing ``transform(key, images, train)``, or ``None``.
        seed: seed of the state's PRNG key.
        devices: more than 1 (or a multi-process run) splits every batch over
            a ``data`` mesh axis, the state replicated or, with ``fsdp``, sharded.
        fsdp: shard parameters and optimizer state over the devices.
        precision: a name of :data:`jaxnet.precision.PRECISIONS`: ``bf16`` and
            ``fp16`` compute in that dtype with float32 parameters.
        scan: also build the whole-epoch ``lax.scan`` (one device only).
        loss_fn: replaces the output kind's loss.
        train_metrics: computed in the train step (default: :func:`default_train_metrics`).
        eval_metrics: computed per example at evaluation.

    Returns:
        The :class:`FitSteps`.

    Raises:
        ConfigError: an unknown precision, a model that cannot compute in it,
            ``scan`` with several devices, or a device count that does not exist.
    """
    from jaxnet import precision as jprecision

    policy = jprecision.get_policy(precision)
    loss = loss_fn if loss_fn is not None else loss_for_output(output)
    if precision != "fp32":
        model = jprecision.apply_to_model(model, policy)  # Flax layers compute in the policy's dtype
        transform, loss = jprecision.apply_policy(policy, transform, loss)
    if policy.needs_loss_scaling:
        tx = jprecision.dynamic_loss_scaling(tx)
    graphdef, state = create_train_state(model, tx, seed=seed)
    make_step_fn = jprecision.loss_scaled_train_step_fn if policy.needs_loss_scaling else train_step_fn
    step_fn = make_step_fn(
        graphdef,
        tx,
        loss,
        transform=transform,
        metrics=default_train_metrics(output) if train_metrics is None else train_metrics,
    )
    if (devices or 1) <= 1 and jax.process_count() == 1:
        return FitSteps(
            graphdef,
            state,
            compile_step(step_fn),
            make_eval_step(graphdef, loss, transform=transform, metrics=eval_metrics),
            compile_step(scan_epoch_fn(step_fn)) if scan else None,
            None,
            None,
        )
    if scan:
        raise ConfigError("--scan runs on one device; drop --scan or --devices")
    return _sharded_steps(
        graphdef, state, tx, loss, step_fn, devices=devices, fsdp=fsdp, transform=transform, eval_metrics=eval_metrics
    )


def _sharded_steps(
    graphdef: nnx.GraphDef,
    state: TrainState,
    tx: optax.GradientTransformation,
    loss: LossFn,
    step_fn: StepFn,
    *,
    devices: int | None,
    fsdp: bool,
    transform: Transform | None,
    eval_metrics: Mapping[str, MetricFn] | None,
) -> FitSteps:
    """The steps over a ``data`` mesh of ``devices`` (all of them in a multi-process run)."""
    from jaxnet.parallel import sharding as jsharding

    mesh = jsharding.make_mesh(devices if jax.process_count() == 1 else None)
    shardings = jsharding.state_shardings(state, mesh, fsdp=fsdp)
    train = jsharding.make_sharded_train_step(graphdef, tx, loss, mesh, shardings, step_fn=step_fn)
    evaluate_step = jsharding.make_sharded_eval_step(
        graphdef, loss, mesh, shardings, transform=transform, metrics=eval_metrics
    )
    return FitSteps(
        graphdef,
        jsharding.shard_state(state, shardings),
        train,
        evaluate_step,
        None,
        jsharding.batch_sharding(mesh),
        mesh,
    )
