"""The ways of running the same training, behind one ``run(steps)`` interface.

=====================  ======================================================
variant                what one step is
=====================  ======================================================
``torch-eager``        ``zero_grad``; ``model(x)``; loss; ``backward``; ``step``
``torch-eager-ftz``    the same with ``torch.set_flush_denormal(True)`` (CPU only)
``torch-compile``      the same with ``torch.compile(model)`` (forward + backward
                       compiled by Inductor; the optimizer step stays eager)
``torch-compile-max``  the same with ``torch.compile(model, mode="max-autotune")``
``torch-bf16``         eager, the forward under ``torch.autocast(device_type,
                       dtype=torch.bfloat16)``, the loss in float32
``jax-jit``            ``jaxnet.step.make_train_step``: forward, backward and
                       update in one XLA executable, called once per step
``jax-scan``           ``jaxnet.step.make_scan_epoch``: ``steps`` steps in one
                       ``lax.scan`` call over device-resident data
``jax-jit-bf16``       ``jax-jit`` with jaxnet's ``bf16`` policy
                       (:mod:`jaxnet.precision`, as ``fit(precision="bf16")``):
                       bfloat16 compute, float32 parameters and loss
=====================  ======================================================

``cifar_speed`` (airbench94's net) trains with its own recipe, not the
tutorial loop: the jax variants run :func:`jaxnet.speedrun.make_speedrun_step`
(normalize the uint8 pixels on the device, forward, summed label-smoothed
loss, grouped Nesterov SGD with the triangle schedule; ``precision="bf16"``
for ``jax-jit-bf16``), the PyTorch ones its twin's
:func:`jaxnet.bench.speed_torch.torch_train_step` (``autocast_dtype`` for
``torch-bf16``) on the same pixels normalized on the host, channels-last,
as airbench runs it. Lookahead and augmentation happen between steps in the
speedrun and are not part of the timed step. Losses are reported per example.

``device`` is ``cpu`` or ``cuda``: PyTorch's model, optimizer state and
batches live there, JAX's state and batches are put on that device. A
runner's ``run(steps)`` ends by waiting for its framework's device
(:func:`wait_jax`, :func:`wait_torch`), so wall time around it is the time
of those steps.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnet.bench import machine, torch_models
from jaxnet.bench.workload import BF16_VARIANTS, SPEED_MODEL, Workload, check_variants, make_batch_pool
from jaxnet.interop import to_torch_state_dict
from jaxnet.models import Dropout, create_model
from jaxnet.optim import create_optimizer
from jaxnet.precision import apply_policy, apply_to_model, get_policy
from jaxnet.speedrun import (
    SpeedrunRecipe,
    make_speedrun_optimizer,
    make_speedrun_step,
    speedrun_compiler_options,
    speedrun_model,
)
from jaxnet.state import TrainState, create_train_state
from jaxnet.step import StepFn, loss_for_output, make_scan_epoch, make_train_step, train_step_fn

__all__ = [
    "Runner",
    "count_flops",
    "has_dropout",
    "initial_state_dict",
    "make_runner",
    "precision_of",
    "speed_recipe",
    "wait_jax",
    "wait_torch",
]

# The torch.device each --device puts PyTorch's tensors on (the tests map cuda to the CPU to run
# the cuda code paths on a machine without a GPU).
_TORCH_PLACEMENT = {"cpu": "cpu", "cuda": "cuda"}


class Runner(Protocol):
    """Runs training steps of one variant on its workload's batch pool."""

    variant: str

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        """Runs ``steps`` steps; returns their losses if ``record`` (else ``[]``)."""


def wait_jax(tree: Any) -> None:
    """Waits until JAX has computed ``tree`` (JAX dispatches asynchronously, on every device)."""
    jax.block_until_ready(tree)


def wait_torch(torch: Any, device: str) -> None:
    """Waits until PyTorch's queued work on ``device`` is done: ``torch.cuda.synchronize()`` on cuda.

    CPU kernels run synchronously in eager PyTorch, so there is nothing to wait for there.
    """
    if device == "cuda":
        torch.cuda.synchronize()


def precision_of(variant: str) -> str:
    """``bf16`` for the bfloat16 variants, else ``fp32``."""
    return "bf16" if variant in BF16_VARIANTS else "fp32"


def speed_recipe(workload: Workload, precision: str = "fp32") -> SpeedrunRecipe:
    """airbench94's recipe at the workload's batch size and widths (cifar_speed only)."""
    return SpeedrunRecipe(widths=workload.widths, batch_size=workload.batch_size, precision=precision)


def _speed_schedule(workload: Workload, recipe: SpeedrunRecipe) -> dict[str, int]:
    """The schedule's length: the recipe's epochs of CIFAR-10's training set at this batch size."""
    steps_per_epoch = workload.steps_per_epoch
    return {"steps_per_epoch": steps_per_epoch, "total_steps": math.ceil(steps_per_epoch * recipe.epochs)}


def _speed_model(workload: Workload) -> nnx.Module:
    """The speedrun net of ``workload.seed``, its whitening layer set from the pool's images."""
    recipe = speed_recipe(workload)
    images, _ = make_batch_pool(workload)
    pixels = images.reshape(-1, *images.shape[2:])[: recipe.whiten_images]
    return speedrun_model(recipe, seed=workload.seed, whiten_from=pixels)


def _jax_model(workload: Workload, dropout: bool) -> nnx.Module:
    model = create_model(workload.model, seed=workload.seed)
    if not dropout:
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Dropout):
                module.rate = 0.0  # static attribute: dropout becomes the identity, train mode kept
    return model


def has_dropout(model_name: str) -> bool:
    """Whether the model has dropout layers (then its variants agree only with dropout off).

    The model is built abstractly (``nnx.eval_shape``): dropout rates are
    static attributes, and no weights need computing to read them.
    """
    model = nnx.eval_shape(lambda: create_model(model_name, seed=0))
    return any(isinstance(m, Dropout) and m.rate > 0 for _, m in nnx.iter_modules(model))


def initial_state_dict(workload: Workload) -> dict[str, np.ndarray]:
    """The workload's initial weights in PyTorch layout (jaxnet's init with ``workload.seed``)."""
    model = (
        _speed_model(workload) if workload.model == SPEED_MODEL else create_model(workload.model, seed=workload.seed)
    )
    return to_torch_state_dict(model)


def _jax_optimizer(workload: Workload) -> optax.GradientTransformation:
    if workload.optimizer in ("sgd", "rmsprop"):
        return create_optimizer(workload.optimizer, workload.lr, momentum=workload.momentum)
    return create_optimizer(workload.optimizer, workload.lr)


def _jax_train_step(workload: Workload, *, precision: str, dropout: bool, device: str) -> tuple[TrainState, StepFn]:
    """The first state, on ``device``, and the compiled step of the jax-jit variants.

    The tutorial models get :func:`jaxnet.step.make_train_step`, under a
    precision other than fp32 with the policy applied as ``fit`` applies it
    (the model's layers and the step's input cast and loss);
    ``cifar_speed`` gets its recipe's step, with the XLA options of the
    device's backend (not of the process's default backend).
    """
    if workload.model == SPEED_MODEL:
        recipe = speed_recipe(workload, precision)
        model = _speed_model(workload)
        tx = make_speedrun_optimizer(nnx.state(model, nnx.Param), recipe, **_speed_schedule(workload, recipe))
        graphdef, state = create_train_state(model, tx, seed=workload.seed)
        options = speedrun_compiler_options("cpu" if device == "cpu" else "gpu")
        step = make_speedrun_step(graphdef, tx, recipe, compiler_options=options)
    else:
        tx = _jax_optimizer(workload)
        model, loss, transform = _jax_model(workload, dropout), loss_for_output(workload.output), None
        if precision != "fp32":
            policy = get_policy(precision)
            model = apply_to_model(model, policy)
            transform, loss = apply_policy(policy, None, loss)
        graphdef, state = create_train_state(model, tx, seed=workload.seed)
        classification = workload.output != "regression"
        step = make_train_step(graphdef, tx, loss, transform=transform, classification=classification)
    return jax.device_put(state, machine.jax_device(device)), step


def _loss_scale(workload: Workload) -> float:
    """Factor from a step's loss to the mean loss per example (the speedrun's loss is summed)."""
    return 1.0 / workload.batch_size if workload.model == SPEED_MODEL else 1.0


class JaxJitRunner:
    """``jax-jit`` and ``jax-jit-bf16``: one compiled train step call per step."""

    variant = "jax-jit"

    def __init__(self, workload: Workload, *, dropout: bool = True, device: str = "cpu", precision: str = "fp32"):
        self.variant = "jax-jit" if precision == "fp32" else f"jax-jit-{precision}"
        self.state, self.step = _jax_train_step(workload, precision=precision, dropout=dropout, device=device)
        self.scale = _loss_scale(workload)
        images, labels = make_batch_pool(workload)
        target = machine.jax_device(device)
        self.pool = [jax.device_put({"image": x, "label": y}, target) for x, y in zip(images, labels)]
        self.position = 0

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        losses = []
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.pool[self.position % len(self.pool)])
            self.position += 1
            if record:
                losses.append(metrics["loss"])
        wait_jax(self.state)
        return [float(x) * self.scale for x in losses]


class JaxScanRunner:
    """``jax-scan``: ``steps`` steps in one ``lax.scan`` call (one compile per distinct ``steps``)."""

    variant = "jax-scan"

    def __init__(self, workload: Workload, *, dropout: bool = True, device: str = "cpu"):
        tx = _jax_optimizer(workload)
        graphdef, state = create_train_state(_jax_model(workload, dropout), tx, seed=workload.seed)
        self.epoch = make_scan_epoch(
            graphdef, tx, loss_for_output(workload.output), classification=workload.output != "regression"
        )
        self.target = machine.jax_device(device)
        self.state = jax.device_put(state, self.target)
        images, labels = make_batch_pool(workload)
        k, b = labels.shape
        self.images = jax.device_put(images.reshape(k * b, *images.shape[2:]), self.target)  # (K*B, ...)
        self.labels = jax.device_put(labels.reshape(k * b), self.target)
        self.pool_size, self.batch_size = k, b
        self.position = 0
        self._indices: dict[tuple[int, int], jax.Array] = {}

    def _batch_indices(self, steps: int) -> jax.Array:
        key = (self.position % self.pool_size, steps)
        if key not in self._indices:  # rows of the pool, in the order the jit runner visits them
            rows = (key[0] + np.arange(steps)) % self.pool_size
            idx = rows[:, None] * self.batch_size + np.arange(self.batch_size)[None, :]
            self._indices[key] = jax.device_put(idx.astype(np.int32), self.target)  # (steps, B)
        return self._indices[key]

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        self.state, metrics = self.epoch(self.state, self.images, self.labels, self._batch_indices(steps))
        self.position += steps
        wait_jax(self.state)
        return [float(x) for x in np.asarray(metrics["loss"])] if record else []


@contextlib.contextmanager
def _flush_denormal(torch: Any, on: bool) -> Iterator[None]:
    """``torch.set_flush_denormal(True)`` inside, where ``on`` (a CPU setting: torch-eager-ftz)."""
    if on:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


class _TorchRunner(abc.ABC):
    """What every PyTorch variant shares: the device, the threads, the compiled forward, the timed loop."""

    def __init__(self, variant: str, workload: Workload, *, threads: int | None, device: str):
        self.torch = torch_models.import_torch()
        self.variant, self.device = variant, device
        self.place = self.torch.device(_TORCH_PLACEMENT[device])
        if threads is not None and device == "cpu":  # intra-op threads: a CPU setting
            self.torch.set_num_threads(threads)
        self.bf16 = variant == "torch-bf16"
        self.scale = _loss_scale(workload)
        self.pool_size = workload.pool_size
        self.position = 0

    def _compiled(self, model: Any) -> Any:
        """The module the variant calls: ``model`` itself, or ``torch.compile`` of it."""
        if self.variant == "torch-compile":
            return self.torch.compile(model)
        if self.variant == "torch-compile-max":
            return self.torch.compile(model, mode="max-autotune")
        return model

    @abc.abstractmethod
    def _step(self, i: int) -> Any:
        """One training step on batch ``i`` of the pool; returns the loss tensor (not waited for)."""

    def run(self, steps: int, *, record: bool = False) -> list[float]:
        losses = []
        with _flush_denormal(self.torch, self.variant == "torch-eager-ftz"):
            for _ in range(steps):
                loss = self._step(self.position % self.pool_size)
                self.position += 1
                if record:
                    losses.append(float(loss.item()) * self.scale)
        wait_torch(self.torch, self.device)
        return losses


class TorchRunner(_TorchRunner):
    """The PyTorch variants of the tutorial models: the tutorials' five-line loop."""

    def __init__(
        self,
        variant: str,
        workload: Workload,
        state_dict: Mapping[str, Any],
        *,
        dropout: bool = True,
        threads: int | None = None,
        device: str = "cpu",
    ):
        super().__init__(variant, workload, threads=threads, device=device)
        torch = self.torch
        self.model = torch_models.build_torch_model(workload.model, state_dict).to(self.place)
        if not dropout:
            torch_models.set_dropout(self.model, 0.0)
        self.forward = self._compiled(self.model)
        self.optimizer = torch_models.make_torch_optimizer(
            workload.optimizer, self.model.parameters(), workload.lr, momentum=workload.momentum
        )
        images, labels = make_batch_pool(workload)
        if images.ndim == 5:  # (K, B, H, W, C) -> (K, B, C, H, W), PyTorch's NCHW
            images = images.transpose(0, 1, 4, 2, 3)
        self.images = [torch.from_numpy(np.ascontiguousarray(x)).to(self.place) for x in images]
        regression = workload.output == "regression"
        self.labels = [torch.from_numpy(y if regression else y.astype(np.int64)).to(self.place) for y in labels]
        functional = torch.nn.functional
        if regression:
            self.loss_fn = lambda out, y: functional.mse_loss(out, y.view_as(out))
        else:
            self.loss_fn = functional.nll_loss if workload.output == "log_probs" else functional.cross_entropy

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return self.torch.autocast(self.place.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _step(self, i: int) -> Any:
        self.optimizer.zero_grad()
        with self._autocast():
            out = self.forward(self.images[i])
        loss = self.loss_fn(out.float() if self.bf16 else out, self.labels[i])  # the loss in float32
        loss.backward()
        self.optimizer.step()
        return loss


class TorchSpeedRunner(_TorchRunner):
    """The PyTorch variants of ``cifar_speed``: its twin and :func:`jaxnet.bench.speed_torch.torch_train_step`."""

    def __init__(
        self,
        variant: str,
        workload: Workload,
        state_dict: Mapping[str, Any],
        *,
        dropout: bool = True,  # the net has no dropout
        threads: int | None = None,
        device: str = "cpu",
    ):
        from jaxnet.bench import speed_torch

        super().__init__(variant, workload, threads=threads, device=device)
        torch, self.speed_torch = self.torch, speed_torch
        self.recipe = recipe = speed_recipe(workload)
        channels_last = torch.channels_last
        self.model = speed_torch.build_torch_speed_net(
            dict(state_dict), widths=recipe.widths, batchnorm_momentum=1.0 - recipe.batchnorm_momentum
        ).to(self.place, memory_format=channels_last)
        self.forward = self._compiled(self.model)
        schedule = _speed_schedule(workload, recipe)
        self.optimizer, self.scheduler = speed_torch.make_torch_speedrun_optimizer(self.model, recipe, **schedule)
        self.whiten_bias_steps = recipe.whiten_bias_epochs * schedule["steps_per_epoch"]
        images, labels = make_batch_pool(workload)
        mean, std = np.asarray(recipe.mean, np.float32), np.asarray(recipe.std, np.float32)
        normalized = ((images.astype(np.float32) / np.float32(255.0)) - mean) / std  # jaxnet.data.normalize
        self.images = [
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.place, memory_format=channels_last)
            for x in normalized
        ]
        self.labels = [torch.from_numpy(y.astype(np.int64)).to(self.place) for y in labels]

    def _step(self, i: int) -> Any:
        return self.speed_torch.torch_train_step(
            self.forward,
            self.optimizer,
            self.scheduler,
            self.images[i],
            self.labels[i],
            label_smoothing=self.recipe.label_smoothing,
            whiten_bias_trainable=self.position < self.whiten_bias_steps,
            autocast_dtype=self.torch.bfloat16 if self.bf16 else None,
        )


def make_runner(
    variant: str,
    workload: Workload,
    *,
    dropout: bool = True,
    state_dict: Mapping[str, Any] | None = None,
    threads: int | None = None,
    device: str = "cpu",
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
        threads: ``torch.set_num_threads`` for PyTorch variants on the CPU.
        device: ``cpu`` or ``cuda`` (see the module docstring).

    Returns:
        A :class:`Runner`.

    Raises:
        ConfigError: an unknown variant, or one that the model or the device
            cannot run (:func:`jaxnet.bench.workload.check_variants`).
    """
    check_variants([variant], workload.model, device)
    if variant == "jax-scan":
        return JaxScanRunner(workload, dropout=dropout, device=device)
    if variant.startswith("jax-jit"):
        return JaxJitRunner(workload, dropout=dropout, device=device, precision=precision_of(variant))
    if state_dict is None:
        state_dict = initial_state_dict(workload)
    runner = TorchSpeedRunner if workload.model == SPEED_MODEL else TorchRunner
    return runner(variant, workload, state_dict, dropout=dropout, threads=threads, device=device)


def count_flops(workload: Workload, *, device: str = "cpu") -> float | None:
    """FLOPs of one training step (forward, backward, update), by XLA's HLO cost analysis.

    The count is taken from the lowered, not yet optimized, float32 jax
    train step (``jit(step).lower(state, batch).cost_analysis()["flops"]``;
    for ``cifar_speed``, the speedrun's step); it counts only the work the
    math needs (e.g. no input gradient for the first layer), which is the
    same for every variant, bf16 ones included, so it is used for all of
    them. Returns None where the backend gives no count.
    """
    images, labels = make_batch_pool(workload)
    batch = jax.device_put(
        {"image": jnp.asarray(images[0]), "label": jnp.asarray(labels[0])}, machine.jax_device(device)
    )
    if workload.model == SPEED_MODEL:
        state, step = _jax_train_step(workload, precision="fp32", dropout=True, device=device)
    else:
        tx = _jax_optimizer(workload)
        graphdef, state = create_train_state(_jax_model(workload, True), tx, seed=workload.seed)
        # make_train_step's jit without donation, kept as a jax.jit object (make_train_step returns a StepFn)
        classification = workload.output != "regression"
        step = jax.jit(train_step_fn(graphdef, tx, loss_for_output(workload.output), classification=classification))
    analysis = cast(Any, step).lower(state, batch).cost_analysis()  # a jax.jit object, typed as a StepFn
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if analysis else None
    return float(flops) if flops else None
