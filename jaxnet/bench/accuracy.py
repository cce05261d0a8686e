"""Time to accuracy on real MNIST: PyTorch eager vs jaxnet, same recipe, same start.

Both sides train the model from the same initial weights (jaxnet's init,
copied into PyTorch with ``jaxnet.interop``), with the model's tutorial
recipe (``jaxnet.recipes``: optimizer, learning rate and its schedule over
the recipe's epochs, batch size, ``ToTensor`` with or without ``Normalize``),
for at most the recipe's epochs, on the same shuffled order (``jaxnet.data.epoch_permutation``)
with the last partial batch dropped. The
clock runs while training only: it includes JAX's compilation (in the first
step) and the host-to-device copies, and stops during the test-set
evaluations, which happen every ``eval_every`` steps and at the end of each
epoch. PyTorch gets its normalized training set as one float tensor before
the clock starts (a DataLoader would convert every batch); jaxnet converts
uint8 batches on the device inside the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as jdata
from jaxnet.bench import torch_models
from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError
from jaxnet.interop import to_torch_state_dict
from jaxnet.models import MODELS, create_model
from jaxnet.optim import create_optimizer, create_schedule
from jaxnet.recipes import RECIPES
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_predict_fn, make_train_step
from jaxnet.train import make_image_transform

__all__ = ["TTA_DEFAULT_VARIANTS", "TTA_TARGETS", "TTA_VARIANTS", "time_to_accuracy"]

TTA_TARGETS = {"mlp": 0.98, "convnet": 0.99}  # the targets: MNIST MLP 98%, ConvNet 99%
TTA_VARIANTS = ("torch-eager", "torch-eager-ftz", "jax-jit")
# What the full run measures: the MLP trains with Adam, whose tiny updates drive weights
# and moments subnormal, so eager PyTorch runs with and without flushing them.
TTA_DEFAULT_VARIANTS = {"mlp": TTA_VARIANTS, "convnet": ("torch-eager", "jax-jit")}

Step = Callable[[int, np.ndarray], None]  # (epoch, batch indices) -> trains one step
Evaluate = Callable[[], float]  # -> test accuracy


def _stats(name: str, data: ArrayDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The recipe's ``Normalize`` statistics; ``ToTensor`` alone is mean 0, std 1."""
    if RECIPES[name].normalize:
        return data.mean, data.std
    return (0.0,) * len(data.mean), (1.0,) * len(data.std)


def _jax_side(
    name: str, data: ArrayDataset, steps_per_epoch: int, seed: int
) -> tuple[Step, Evaluate, Callable[[], None]]:
    recipe, spec = RECIPES[name], MODELS[name]
    schedule = create_schedule(
        recipe.schedule,
        recipe.lr,
        steps_per_epoch=steps_per_epoch,
        epochs=recipe.epochs,
        step_size=recipe.step_size,
        gamma=recipe.gamma,
    )
    if recipe.optimizer in ("sgd", "rmsprop"):
        tx = create_optimizer(recipe.optimizer, schedule, momentum=recipe.momentum)
    else:
        tx = create_optimizer(recipe.optimizer, schedule)
    graphdef, state = create_train_state(create_model(name, seed=seed), tx, seed=seed)
    transform = make_image_transform(*_stats(name, data))
    train_step = make_train_step(graphdef, tx, loss_for_output(spec.output), transform=transform)
    predict = make_predict_fn(graphdef, transform=transform)
    test_images = jax.device_put(np.asarray(data.test_images))
    test_labels = np.asarray(data.test_labels)
    box = {"state": state}

    def step(_: int, idx: np.ndarray) -> None:
        batch = jax.device_put({"image": data.train_images[idx], "label": data.train_labels[idx]})
        box["state"], _metrics = train_step(box["state"], batch)

    def evaluate() -> float:
        chunks = [
            jnp.argmax(predict(box["state"], test_images[i : i + 1000]), -1)
            for i in range(0, len(test_labels) - len(test_labels) % 1000, 1000)
        ]
        predicted = np.concatenate([np.asarray(c) for c in chunks])
        return float(np.mean(predicted == test_labels[: len(predicted)]))

    return step, evaluate, lambda: jax.block_until_ready(box["state"])


def _torch_side(
    name: str, data: ArrayDataset, steps_per_epoch: int, seed: int, threads: int | None, flush_denormal: bool
) -> tuple[Step, Evaluate, Callable[[], None], Callable[[], None]]:
    torch = torch_models.import_torch()
    if threads:
        torch.set_num_threads(threads)
    recipe, spec = RECIPES[name], MODELS[name]
    model = torch_models.build_torch_model(name, to_torch_state_dict(create_model(name, seed=seed)))
    optimizer = torch_models.make_torch_optimizer(
        recipe.optimizer, model.parameters(), recipe.lr, momentum=recipe.momentum
    )
    schedulers = {  # torch.optim.lr_scheduler, stepped as jaxnet.optim.create_schedule assumes
        "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, recipe.step_size, recipe.gamma),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs * steps_per_epoch),
        "constant": lambda: None,
    }
    if recipe.schedule not in schedulers:
        raise ConfigError(f"time to accuracy has no PyTorch counterpart of the {recipe.schedule!r} schedule")
    scheduler = schedulers[recipe.schedule]()
    mean, std = _stats(name, data)
    functional = torch.nn.functional
    loss_fn = functional.nll_loss if spec.output == "log_probs" else functional.cross_entropy

    def to_tensor(images: np.ndarray) -> Any:  # ToTensor + Normalize, NHWC uint8 -> NCHW float32
        x = (np.asarray(images, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    train_x, test_x = to_tensor(data.train_images), to_tensor(data.test_images)
    train_y = torch.from_numpy(np.asarray(data.train_labels, np.int64))
    test_y = torch.from_numpy(np.asarray(data.test_labels, np.int64))
    epoch_box = {"epoch": 0}

    def step(epoch: int, idx: np.ndarray) -> None:
        if recipe.schedule == "step" and epoch > epoch_box["epoch"]:
            scheduler.step()  # StepLR steps once per epoch, as in the tutorials
            epoch_box["epoch"] = epoch
        index = torch.from_numpy(idx)
        optimizer.zero_grad()
        loss = loss_fn(model(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        if recipe.schedule == "cosine":
            scheduler.step()  # per step: T_max counts optimizer steps

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(test_x[i : i + 1000]).argmax(1) == test_y[i : i + 1000]).sum())
                for i in range(0, len(test_y), 1000)
            )
        model.train()
        return correct / len(test_y)

    def enter() -> None:
        torch.set_flush_denormal(flush_denormal)

    def leave() -> None:
        torch.set_flush_denormal(False)

    return step, evaluate, enter, leave


def _batches(num_train: int, batch_size: int, seed: int, max_epochs: int) -> Iterator[tuple[int, np.ndarray]]:
    for epoch in range(max_epochs):
        order = jdata.epoch_permutation(num_train, seed=seed, epoch=epoch, shuffle=True)
        for b in range(num_train // batch_size):
            yield epoch, order[b * batch_size : (b + 1) * batch_size]


def time_to_accuracy(
    name: str,
    data: ArrayDataset,
    variant: str,
    *,
    target: float | None = None,
    max_epochs: int | None = None,
    max_seconds: float = 300.0,
    eval_every: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Trains until the test accuracy reaches ``target``; returns when and the curve.

    Args:
        name: ``mlp`` or ``convnet`` (any classifier in ``jaxnet.recipes`` works).
        data: the data set, e.g. ``load_dataset("mnist", data_dir=...)``.
        variant: ``torch-eager``, ``torch-eager-ftz`` (flush denormals) or ``jax-jit``.
        target: test accuracy to reach (default :data:`TTA_TARGETS`).
        max_epochs: give up after this many epochs (default: the recipe's).
        max_seconds: give up once the training clock passes this.
        eval_every: steps between evaluations (default: a quarter epoch).
        seed: initial weights and shuffling.
        threads: ``torch.set_num_threads``.

    Returns:
        ``{"model", "variant", "target", "reached", "seconds", "steps",
        "final_accuracy", "curve", "stopped", "epochs", ...}``; ``curve`` lists
        ``[seconds, step, accuracy]``, ``final_accuracy`` is the best accuracy
        seen and ``stopped`` says why training ended.

    Raises:
        ConfigError: unknown variant, a model without a recipe, or bad limits.
    """
    if variant not in TTA_VARIANTS:
        raise ConfigError(f"time to accuracy runs {', '.join(TTA_VARIANTS)}, not {variant!r}")
    if name not in RECIPES or MODELS[name].output == "regression":
        raise ConfigError(f"time to accuracy needs a classifier with a recipe; got {name!r}")
    target = TTA_TARGETS.get(name, 0.98) if target is None else target
    max_epochs = RECIPES[name].epochs if max_epochs is None else max_epochs
    if not 0 < target <= 1 or max_epochs < 1 or max_seconds <= 0:
        raise ConfigError(
            f"need 0 < target <= 1, max_epochs >= 1, max_seconds > 0; got {target}, {max_epochs}, {max_seconds}"
        )
    batch_size = RECIPES[name].batch_size
    steps_per_epoch = data.num_train // batch_size
    eval_every = eval_every or max(1, steps_per_epoch // 4)
    if variant == "jax-jit":
        step, evaluate, sync = _jax_side(name, data, steps_per_epoch, seed)
        enter = leave = lambda: None  # noqa: E731
    else:
        step, evaluate, enter, leave = _torch_side(
            name, data, steps_per_epoch, seed, threads, variant == "torch-eager-ftz"
        )
        sync = lambda: None  # noqa: E731  (torch on CPU returns when the work is done)
    curve: list[list[float]] = []
    clock, steps, reached, stopped = 0.0, 0, None, f"{max_epochs} epochs done"
    enter()
    try:
        start = time.perf_counter()
        for epoch, idx in _batches(data.num_train, batch_size, seed, max_epochs):
            step(epoch, idx)
            steps += 1
            if steps % eval_every and steps % steps_per_epoch:
                continue
            sync()
            clock += time.perf_counter() - start
            accuracy = evaluate()
            curve.append([round(clock, 3), steps, accuracy])
            if accuracy >= target:
                reached, stopped = (clock, steps), "target reached"
                break
            if clock > max_seconds:
                stopped = f"time limit of {max_seconds:g} s"
                break
            start = time.perf_counter()
    finally:
        leave()
    return {
        "model": name,
        "variant": variant,
        "target": target,
        "reached": reached is not None,
        "seconds": reached[0] if reached else None,
        "steps": reached[1] if reached else None,
        "final_accuracy": max(c[2] for c in curve),
        "curve": curve,
        "stopped": stopped,
        "epochs": steps / steps_per_epoch,
        "batch_size": batch_size,
        "recipe": RECIPES[name].source,
    }
