"""The four ways of running the same training, behind one ``run(steps)`` interface.

=================  ==========================================================
variant            what one step is
=================  ==========================================================
``torch-eager``    ``zero_grad``; ``model(x)``; loss; ``backward``; ``step``
``torch-eager-ftz``  the same with ``torch.set_flush_denormal(True)``
``torch-compile``  the same with ``torch.compile(model)`` (forward + backward
                   compiled by Inductor; the optimizer step stays eager)
``jax-jit``        ``jaxnet.step.make_train_step``: forward, backward and
                   update in one XLA executable, called once per step
``jax-scan``       ``jaxnet.step.make_scan_epoch``: ``steps`` steps in one
                   ``lax.scan`` call over device-resident data
=================  ==========================================================

A runner's ``run(steps)`` returns only when the work is done (JAX results are
blocked on), so wall time around it is the time of those steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnet.bench import torch_models
from jaxnet.bench.workload import TORCH_VARIANTS, VARIANTS, Workload, make_batch_pool
from jaxnet.errors import ConfigError
from jaxnet.interop import to_torch_state_dict
from jaxnet.models import Dropout, create_model
from jaxnet.optim import create_optimizer
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_scan_epoch, make_train_step, train_step_fn

__all__ = ["Runner", "count_flops", "has_dropout", "initial_state_dict", "make_runner"]


class Runner(Protocol):
    """Runs training steps of one variant on its workload's batch pool."""

    variant: str

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        """Runs ``steps`` steps; returns their losses if ``record`` (else ``[]``)."""


def _jax_model(workload: Workload, dropout: bool) -> nnx.Module:
    model = create_model(workload.model, seed=workload.seed)
    if not dropout:
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Dropout):
                module.rate = 0.0  # static attribute: dropout becomes the identity, train mode kept
    return model


def has_dropout(model_name: str) -> bool:
    """Whether the model has dropout layers (then its variants agree only with dropout off)."""
    model = create_model(model_name, seed=0)
    return any(isinstance(m, Dropout) and m.rate > 0 for _, m in nnx.iter_modules(model))


def initial_state_dict(workload: Workload) -> dict[str, np.ndarray]:
    """The workload's initial weights in PyTorch layout (jaxnet's init with ``workload.seed``)."""
    return to_torch_state_dict(create_model(workload.model, seed=workload.seed))


def _jax_optimizer(workload: Workload) -> optax.GradientTransformation:
    if workload.optimizer in ("sgd", "rmsprop"):
        return create_optimizer(workload.optimizer, workload.lr, momentum=workload.momentum)
    return create_optimizer(workload.optimizer, workload.lr)


class JaxJitRunner:
    """``jax-jit``: one compiled ``train_step`` call per step."""

    variant = "jax-jit"

    def __init__(self, workload: Workload, *, dropout: bool = True):
        tx = _jax_optimizer(workload)
        self.graphdef, self.state = create_train_state(_jax_model(workload, dropout), tx, seed=workload.seed)
        classification = workload.output != "regression"
        self.step = make_train_step(self.graphdef, tx, loss_for_output(workload.output), classification=classification)
        images, labels = make_batch_pool(workload)
        self.pool = [jax.device_put({"image": x, "label": y}) for x, y in zip(images, labels)]
        self.position = 0

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        losses = []
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.pool[self.position % len(self.pool)])
            self.position += 1
            if record:
                losses.append(metrics["loss"])
        jax.block_until_ready(self.state)
        return [float(x) for x in losses]


class JaxScanRunner:
    """``jax-scan``: ``steps`` steps in one ``lax.scan`` call (one compile per distinct ``steps``)."""

    variant = "jax-scan"

    def __init__(self, workload: Workload, *, dropout: bool = True):
        tx = _jax_optimizer(workload)
        graphdef, self.state = create_train_state(_jax_model(workload, dropout), tx, seed=workload.seed)
        self.epoch = make_scan_epoch(
            graphdef, tx, loss_for_output(workload.output), classification=workload.output != "regression"
        )
        images, labels = make_batch_pool(workload)
        k, b = labels.shape
        self.images = jax.device_put(images.reshape(k * b, *images.shape[2:]))  # (K*B, ...)
        self.labels = jax.device_put(labels.reshape(k * b))
        self.pool_size, self.batch_size = k, b
        self.position = 0
        self._indices: dict[tuple[int, int], jax.Array] = {}

    def _batch_indices(self, steps: int) -> jax.Array:
        key = (self.position % self.pool_size, steps)
        if key not in self._indices:  # rows of the pool, in the order the jit runner visits them
            rows = (key[0] + np.arange(steps)) % self.pool_size
            idx = rows[:, None] * self.batch_size + np.arange(self.batch_size)[None, :]
            self._indices[key] = jax.device_put(idx.astype(np.int32))  # (steps, B)
        return self._indices[key]

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        self.state, metrics = self.epoch(self.state, self.images, self.labels, self._batch_indices(steps))
        self.position += steps
        jax.block_until_ready(self.state)
        return [float(x) for x in np.asarray(metrics["loss"])] if record else []


class TorchRunner:
    """``torch-eager``, ``torch-eager-ftz`` and ``torch-compile``: the tutorials' five-line loop."""

    def __init__(
        self,
        variant: str,
        workload: Workload,
        state_dict: Mapping[str, Any],
        *,
        dropout: bool = True,
        threads: int | None = None,
    ):
        torch = torch_models.import_torch()
        self.torch, self.variant = torch, variant
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = torch_models.build_torch_model(workload.model, state_dict)
        if not dropout:
            torch_models.set_dropout(self.model, 0.0)
        self.forward = torch.compile(self.model) if variant == "torch-compile" else self.model
        self.optimizer = torch_models.make_torch_optimizer(
            workload.optimizer, self.model.parameters(), workload.lr, momentum=workload.momentum
        )
        images, labels = make_batch_pool(workload)
        if images.ndim == 5:  # (K, B, H, W, C) -> (K, B, C, H, W), PyTorch's NCHW
            images = images.transpose(0, 1, 4, 2, 3)
        self.images = [torch.from_numpy(np.ascontiguousarray(x)) for x in images]
        regression = workload.output == "regression"
        self.labels = [torch.from_numpy(y if regression else y.astype(np.int64)) for y in labels]
        functional = torch.nn.functional
        if regression:
            self.loss_fn = lambda out, y: functional.mse_loss(out, y.view_as(out))
        else:
            self.loss_fn = functional.nll_loss if workload.output == "log_probs" else functional.cross_entropy
        self.position = 0

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        flush = self.variant == "torch-eager-ftz"
        if flush:
            self.torch.set_flush_denormal(True)
        losses = []
        try:
            for _ in range(steps):
                i = self.position % len(self.images)
                self.optimizer.zero_grad()
                loss = self.loss_fn(self.forward(self.images[i]), self.labels[i])
                loss.backward()
                self.optimizer.step()
                self.position += 1
                if record:
                    losses.append(float(loss.item()))
        finally:
            if flush:
                self.torch.set_flush_denormal(False)
        return losses


def make_runner(
    variant: str,
    workload: Workload,
    *,
    dropout: bool = True,
    state_dict: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> Runner:
    """Builds a variant's runner for ``workload``, from the workload's initial weights.

    Args:
        variant: one of ``VARIANTS``.
        workload: model, batch size, optimizer and batches.
        dropout: keep the model's dropout (False sets every rate to 0, for
            comparing losses across frameworks).
        state_dict: the initial weights for PyTorch variants (default:
            :func:`initial_state_dict`; the jax variants rebuild the same ones
            from ``workload.seed``).
        threads: ``torch.set_num_threads`` for PyTorch variants.

    Returns:
        A :class:`Runner`.

    Raises:
        ConfigError: unknown variant.
    """
    if variant == "jax-jit":
        return JaxJitRunner(workload, dropout=dropout)
    if variant == "jax-scan":
        return JaxScanRunner(workload, dropout=dropout)
    if variant in TORCH_VARIANTS:
        if state_dict is None:
            state_dict = initial_state_dict(workload)
        return TorchRunner(variant, workload, state_dict, dropout=dropout, threads=threads)
    raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def count_flops(workload: Workload) -> float | None:
    """FLOPs of one training step (forward, backward, update), by XLA's HLO cost analysis.

    The count is taken from the lowered, not yet optimized, jax train step
    (``jit(step).lower(state, batch).cost_analysis()["flops"]``); it counts
    only the work the math needs (e.g. no input gradient for the first
    layer), which is the same for every variant, so it is used for all of
    them. Returns None where the backend gives no count.
    """
    tx = _jax_optimizer(workload)
    graphdef, state = create_train_state(_jax_model(workload, True), tx, seed=workload.seed)
    # make_train_step's jit without donation, kept as a jax.jit object (make_train_step returns a StepFn)
    step = jax.jit(
        train_step_fn(graphdef, tx, loss_for_output(workload.output), classification=workload.output != "regression")
    )
    images, labels = make_batch_pool(workload)
    batch = {"image": jnp.asarray(images[0]), "label": jnp.asarray(labels[0])}
    analysis = step.lower(state, batch).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if analysis else None
    return float(flops) if flops else None
