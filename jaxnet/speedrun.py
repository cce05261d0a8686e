"""The CIFAR-10 speedrun recipe (airbench94, Jordan, arXiv 2404.00498) on jaxnet's public pieces.

The recipe is data (:class:`SpeedrunRecipe`, airbench's ``hyp``); the loop
(:func:`train_speedrun`) composes :mod:`jaxnet.models.cifar_speed` (net and
whitening init), :mod:`jaxnet.data.augmentation` (alternating flip and
translation of the whole training set once per epoch, on the device),
:mod:`jaxnet.param_groups` (Nesterov SGD with per-group learning rates and
decay), :func:`jaxnet.step.make_train_step` (the summed, label-smoothed loss
is an ordinary ``loss_fn``), :mod:`jaxnet.averaging` (lookahead every 5120
examples, airbench's 5 steps of 1024, between compiled steps) and :mod:`jaxnet.tta` (evaluation).

airbench's learning rate and weight decay are "decoupled": given per 1024
examples and independent of the momentum. In PyTorch's units (what
:func:`speedrun_groups` returns) ``lr = 11.5 / kilostep`` and
``wd = 0.0153 * batch / kilostep`` with ``kilostep = 1024 * (1 + 1 / (1 -
momentum))``, each group's ``weight_decay = wd / group_lr``. Measured
accuracy and times: benchmarks/CIFAR_SPEED.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxnet.averaging import LookaheadState, lookahead_init, lookahead_sync, sync_decay
from jaxnet.data.augmentation import alternating_flip, flip_bits, random_translate
from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.transforms import normalize
from jaxnet.errors import ConfigError
from jaxnet.losses import cross_entropy
from jaxnet.models.cifar_speed import CifarSpeedNet, init_whitening
from jaxnet.param_groups import FROZEN, SGDGroup, label_params, make_group_sgd
from jaxnet.precision import apply_policy, get_policy
from jaxnet.state import TrainState, create_train_state
from jaxnet.step import StepFn, Transform, compile_step, make_predict_fn, train_step_fn
from jaxnet.tta import tta_accuracy

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "PARAM_RULES",
    "SpeedrunRecipe",
    "SpeedrunResult",
    "lookahead_step",
    "make_epoch_batches",
    "make_speedrun_optimizer",
    "make_speedrun_step",
    "speedrun_compiler_options",
    "speedrun_groups",
    "speedrun_model",
    "train_speedrun",
    "triangle_schedule",
]

# XLA:CPU hands this net's padded 3x3 float32 convolutions to YNNPACK, whose kernels run them
# slower than XLA's own Eigen ones (benchmarks/CIFAR_SPEED.md); this per-executable option turns
# YNNPACK off for the speedrun's step alone, leaving every other jit of the process as it is.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # airbench's statistics (the tutorial's are 0.5)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Dotted parameter path -> group (first match wins; everything else is "default").
PARAM_RULES = (
    (r"whiten\.kernel", "frozen"),  # set by the whitening init, never trained
    (r".*norm\d*\.scale", "frozen"),  # BatchNorm weight fixed at 1
    (r".*norm\d*\.bias", "norm_bias"),  # lr * bias_scaler
    (r"whiten\.bias", "whiten_bias"),  # trained for whiten_bias_epochs, then frozen
)


@dataclasses.dataclass(frozen=True)
class SpeedrunRecipe:
    """airbench94's hyper-parameters, in its decoupled units."""

    epochs: float = 9.9  # passes over the training set; steps = ceil(steps_per_epoch * epochs)
    batch_size: int = 1024  # examples per step; each epoch drops its last partial batch
    lr: float = 11.5  # learning rate per 1024 examples, decoupled from the momentum
    momentum: float = 0.85  # Nesterov momentum
    weight_decay: float = 0.0153  # weight decay per 1024 examples, decoupled from the lr
    bias_scaler: float = 64.0  # BatchNorm biases get lr * bias_scaler (same decay per step)
    label_smoothing: float = 0.2  # of the cross entropy, summed over the batch
    whiten_bias_epochs: int = 3  # the whitening bias trains this many epochs, then stays fixed
    warmup: float = 0.23  # fraction of the steps over which the lr factor rises to 1
    start_lr: float = 0.2  # lr factor at step 0
    end_lr: float = 0.07  # lr factor at the last step
    flip: bool = True  # alternating flip
    translate: int = 2  # largest random shift, pixels (reflection padding)
    widths: tuple[int, int, int] = (64, 256, 256)  # channels of the three conv groups
    batchnorm_momentum: float = 0.6  # airbench's convention: weight of the old statistics (torch's 0.4)
    whiten_images: int = 5000  # first training images whose patches initialize the whitening
    whiten_eps: float = 5e-4  # added to the patch covariance's eigenvalues
    lookahead_examples: int = 5120  # examples between lookahead syncs (airbench: every 5 steps of 1024)
    average_batch_stats: bool = True  # lookahead averages BatchNorm statistics too (airbench's state_dict)
    tta_level: int = 2  # 0 none, 1 mirror, 2 mirror + translate
    eval_batch_size: int = 2000  # test images per compiled evaluation call
    mean: tuple[float, ...] = CIFAR10_MEAN  # per-channel normalization, pixel / 255 units
    std: tuple[float, ...] = CIFAR10_STD
    precision: str = "fp32"  # "fp32" or "bf16" compute (parameters stay float32)

    @property
    def sync_every(self) -> int:
        """Optimizer steps between lookahead syncs at this batch size, one per ``lookahead_examples``.

        A smaller batch then syncs after as many examples as airbench does, not 2-4x as often.

        >>> SpeedrunRecipe().sync_every, SpeedrunRecipe(batch_size=256).sync_every
        (5, 20)
        """
        return max(1, round(self.lookahead_examples / self.batch_size))


@dataclasses.dataclass(frozen=True)
class SpeedrunResult:
    """What :func:`train_speedrun` measured."""

    accuracy: float  # test accuracy without TTA
    tta_accuracy: float  # test accuracy at recipe.tta_level
    train_seconds: float  # whitening init + every step, compilation included (airbench's clock)
    tta_seconds: float  # the TTA evaluation (airbench adds it to the total)
    steps: int  # optimizer steps taken
    losses: list[float]  # per-step mean loss per example
    graphdef: nnx.GraphDef  # with state: the trained model, nnx.merge(graphdef, params, model_state)
    state: TrainState
    # (training seconds so far, steps, test accuracy without TTA) after each epoch, if asked for
    curve: list[tuple[float, int, float]] = dataclasses.field(default_factory=list)


def triangle_schedule(total_steps: int, *, start: float = 0.2, end: float = 0.07, warmup: float = 0.23) -> Any:
    """airbench's lr factor: linear from ``start`` to 1 over ``int(warmup * total_steps)`` steps, then to ``end``.

    Returns:
        ``schedule(t) -> factor`` for the ``t``-th update (0-based), jnp in and out.

    >>> s = triangle_schedule(100)
    >>> [round(float(s(t)), 3) for t in (0, 23, 100)]
    [0.2, 1.0, 0.07]
    """
    peak = int(warmup * total_steps)

    def schedule(count: Any) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        rise = start + (1.0 - start) * t / max(peak, 1)
        fall = 1.0 + (end - 1.0) * (t - peak) / max(total_steps - peak, 1)
        return jnp.where(t < peak, rise, fall)

    return schedule


def speedrun_groups(recipe: SpeedrunRecipe, steps_per_epoch: int) -> dict[str, SGDGroup | None]:
    """The PyTorch-unit SGD groups of :data:`PARAM_RULES`' labels (see the module docstring)."""
    kilostep = 1024 * (1 + 1 / (1 - recipe.momentum))
    lr = recipe.lr / kilostep
    wd = recipe.weight_decay * recipe.batch_size / kilostep
    bias_lr = lr * recipe.bias_scaler
    return {
        "frozen": FROZEN,
        "norm_bias": SGDGroup(bias_lr, wd / bias_lr),
        "whiten_bias": SGDGroup(lr, wd / lr, stop_step=recipe.whiten_bias_epochs * steps_per_epoch),
        "default": SGDGroup(lr, wd / lr),
    }


def make_speedrun_optimizer(
    params: nnx.State, recipe: SpeedrunRecipe, *, steps_per_epoch: int, total_steps: int
) -> Any:
    """Nesterov SGD over the recipe's parameter groups with the triangle schedule (an optax transform)."""
    schedule = triangle_schedule(total_steps, start=recipe.start_lr, end=recipe.end_lr, warmup=recipe.warmup)
    return make_group_sgd(
        label_params(params, PARAM_RULES),
        speedrun_groups(recipe, steps_per_epoch),
        momentum=recipe.momentum,
        nesterov=True,
        schedule=schedule,
    )


@functools.lru_cache(maxsize=8)
def _initializer(widths: tuple[int, ...], batchnorm_momentum: float) -> Any:
    """One compiled ``key -> CifarSpeedNet`` per architecture: built eagerly, each layer's random
    init compiles on its own, and a compile per call (a new closure each time) costs seconds on a CPU."""
    return nnx.jit(
        lambda key: CifarSpeedNet(widths=widths, batchnorm_momentum=batchnorm_momentum, rngs=nnx.Rngs(params=key))
    )


def speedrun_model(recipe: SpeedrunRecipe, *, seed: int = 0, whiten_from: Any = None) -> CifarSpeedNet:
    """The net of ``recipe.widths``, its whitening layer set from ``whiten_from`` (uint8 images) if given."""
    initializer = _initializer(tuple(recipe.widths), 1.0 - recipe.batchnorm_momentum)
    model = initializer(jax.random.key(seed))  # what nnx.Rngs(params=seed) makes of the seed
    if whiten_from is not None:
        init_whitening(model, normalize(whiten_from, recipe.mean, recipe.std), recipe.whiten_eps)
    return model


def _transforms(recipe: SpeedrunRecipe) -> tuple[Transform, Any]:
    """The on-device ``ToTensor + Normalize`` (cast to the compute dtype) and the summed smoothed loss."""

    def to_inputs(key: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        return normalize(images, recipe.mean, recipe.std)

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return cross_entropy(logits, labels, reduction="sum", label_smoothing=recipe.label_smoothing)

    return apply_policy(get_policy(recipe.precision), to_inputs, loss)


def speedrun_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options for the speedrun's step: :data:`CPU_COMPILER_OPTIONS` on the CPU, none elsewhere.

    >>> speedrun_compiler_options("gpu")
    {}
    """
    return dict(CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}


def make_speedrun_step(
    graphdef: nnx.GraphDef, tx: Any, recipe: SpeedrunRecipe, *, compiler_options: dict[str, str] | None = None
) -> StepFn:
    """The compiled train step: normalize, forward, summed label-smoothed loss, grouped SGD update.

    Args:
        graphdef, tx, recipe: the model's graph, the optimizer, the recipe.
        compiler_options: XLA options of the step's executable; default
            :func:`speedrun_compiler_options` (``{}`` compiles as ``jax.jit`` does by default).
    """
    transform, loss = _transforms(recipe)
    options = speedrun_compiler_options() if compiler_options is None else compiler_options
    return compile_step(train_step_fn(graphdef, tx, loss, transform=transform), compiler_options=options)


@functools.partial(jax.jit, static_argnames="batch_stats", donate_argnums=(0, 1))
def lookahead_step(
    state: TrainState, lookahead: LookaheadState, decay: jax.Array, *, batch_stats: bool = True
) -> tuple[TrainState, LookaheadState]:
    """One lookahead sync of the state's parameters (and BatchNorm statistics if ``batch_stats``)."""
    tree = (state.params, state.model_state) if batch_stats else state.params
    lookahead, tree = lookahead_sync(lookahead, tree, decay)
    params, model_state = tree if batch_stats else (tree, state.model_state)
    return state.replace(params=params, model_state=model_state), lookahead


def make_epoch_batches(recipe: SpeedrunRecipe, steps_per_epoch: int) -> Any:
    """Compiles ``(key, images, labels, bits, epoch) -> (S, B, H, W, C) images, (S, B) labels``.

    One epoch of the training set, on the device: alternating flip (``bits``
    from :func:`jaxnet.data.augmentation.flip_bits`), random translation,
    then a random order cut into ``S = steps_per_epoch`` batches.
    """
    size = steps_per_epoch * recipe.batch_size

    @jax.jit
    def epoch_batches(
        key: jax.Array, images: jax.Array, labels: jax.Array, bits: jax.Array, epoch: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        shift_key, order_key = jax.random.split(key)
        if recipe.flip:
            images = alternating_flip(images, bits, epoch)
        if recipe.translate:
            images = random_translate(shift_key, images, recipe.translate)
        order = jax.random.permutation(order_key, images.shape[0])[:size]
        batched = (steps_per_epoch, recipe.batch_size)
        return images[order].reshape(*batched, *images.shape[1:]), labels[order].reshape(batched)

    return epoch_batches


@jax.jit
def _take_batch(images: jax.Array, labels: jax.Array, i: jax.Array) -> dict[str, jax.Array]:
    """Batch ``i`` of an epoch from :func:`make_epoch_batches` (one compile for every ``i``)."""
    return {"image": images[i], "label": labels[i]}


def _check(dataset: ArrayDataset, recipe: SpeedrunRecipe) -> None:
    if tuple(dataset.image_shape) != (32, 32, 3):
        raise ConfigError(
            f"the speedrun net takes 32x32 RGB images (CIFAR-10); got images of shape {dataset.image_shape}"
        )
    if not 0 < recipe.batch_size <= dataset.num_train:
        raise ConfigError(f"batch_size {recipe.batch_size} must be in 1..{dataset.num_train} (the training set)")
    if recipe.epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {recipe.epochs}")
    if recipe.lookahead_examples < 1:
        raise ConfigError(
            f"lookahead_examples must be >= 1 (examples between lookahead syncs; airbench: 5120), "
            f"got {recipe.lookahead_examples}"
        )


def train_speedrun(
    dataset: ArrayDataset,
    *,
    recipe: SpeedrunRecipe = SpeedrunRecipe(),
    seed: int = 0,
    progress: bool = True,
    curve: bool = False,
) -> SpeedrunResult:
    """Trains the speedrun net with ``recipe`` on ``dataset`` and evaluates it with and without TTA.

    Args:
        dataset: CIFAR-10 (or a subset), uint8 NHWC images, e.g. ``jaxnet.data.load_dataset("cifar10")``.
        recipe: the hyper-parameters; the default is airbench94's.
        seed: seeds the weights, the flips, the translations and the order.
        progress: show a tqdm bar over the steps.
        curve: also measure the test accuracy (no TTA) after every epoch, with the
            clock stopped, into :attr:`SpeedrunResult.curve`.

    Returns:
        A :class:`SpeedrunResult`.

    Raises:
        ConfigError: for images that are not 32x32x3, a batch larger than the
            training set, or an invalid recipe setting.
    """
    _check(dataset, recipe)
    start = time.perf_counter()
    model = speedrun_model(recipe, seed=seed, whiten_from=dataset.train_images[: recipe.whiten_images])
    steps_per_epoch = dataset.num_train // recipe.batch_size
    total_steps = math.ceil(steps_per_epoch * recipe.epochs)
    params = nnx.state(model, nnx.Param)
    tx = make_speedrun_optimizer(params, recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    graphdef, state = create_train_state(model, tx, seed=seed)
    step = make_speedrun_step(graphdef, tx, recipe)
    epoch_batches = make_epoch_batches(recipe, steps_per_epoch)
    batch_stats = recipe.average_batch_stats
    lookahead = lookahead_init((state.params, state.model_state) if batch_stats else state.params)
    # Everything committed to one device up front: the compiled step's outputs are, and a first call
    # on uncommitted inputs would compile the step a second time.
    device = jax.devices()[0]
    state, lookahead = jax.device_put((state, lookahead), device)
    images, labels = jax.device_put((np.asarray(dataset.train_images), dataset.train_labels), device)
    test_images = jax.device_put(np.asarray(dataset.test_images), device)
    predict = make_predict_fn(graphdef, transform=_transforms(recipe)[0])

    def evaluate(level: int) -> float:
        return tta_accuracy(
            predict,
            state,
            test_images,
            dataset.test_labels,
            level=level,
            batch_size=recipe.eval_batch_size,
            compiler_options=speedrun_compiler_options(),
        )

    key = jax.random.PRNGKey(seed)
    bits = flip_bits(jax.random.fold_in(key, 0), dataset.num_train)
    losses: list[jax.Array] = []
    points: list[tuple[float, int, float]] = []
    clock = 0.0  # training seconds before `start`
    with tqdm(total=total_steps, desc="speedrun", disable=not progress) as bar:
        for epoch in range(math.ceil(recipe.epochs)):
            xs, ys = epoch_batches(jax.random.fold_in(key, epoch + 1), images, labels, bits, epoch)
            for i in range(min(steps_per_epoch, total_steps - len(losses))):
                state, metrics = step(state, _take_batch(xs, ys, i))
                losses.append(metrics["loss"])
                decay = sync_decay(len(losses), total_steps, every=recipe.sync_every)
                if decay is not None:
                    state, lookahead = lookahead_step(state, lookahead, decay, batch_stats=batch_stats)
                bar.update()
            bar.set_postfix(loss=f"{float(losses[-1]) / recipe.batch_size:.4f}")  # one wait per epoch
            if curve:  # the evaluation is off the clock
                jax.block_until_ready(state)
                clock += time.perf_counter() - start
                points.append((clock, len(losses), evaluate(0)))
                bar.set_postfix(loss=f"{float(losses[-1]) / recipe.batch_size:.4f}", test=f"{points[-1][2]:.4f}")
                start = time.perf_counter()
    jax.block_until_ready(state)
    train_seconds = clock + time.perf_counter() - start
    start = time.perf_counter()
    tta = evaluate(recipe.tta_level)
    tta_seconds = time.perf_counter() - start
    plain = points[-1][2] if points else evaluate(0)
    per_example = [float(loss) / recipe.batch_size for loss in jax.device_get(losses)]
    return SpeedrunResult(
        accuracy=plain,
        tta_accuracy=tta,
        train_seconds=train_seconds,
        tta_seconds=tta_seconds,
        steps=len(losses),
        losses=per_example,
        graphdef=graphdef,
        state=state,
        curve=points,
    )
