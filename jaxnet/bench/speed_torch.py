"""The PyTorch twin of the CIFAR-10 speedrun (:mod:`jaxnet.speedrun`): same net, same recipe, same weights.

The net is airbench94's ``nn.Module`` layout (NCHW; attribute names of
:class:`jaxnet.models.cifar_speed.CifarSpeedNet`), built holding a jaxnet
model's weights through :func:`jaxnet.interop.to_torch_state_dict`, so the
two frameworks are timed on identical work. The recipe pieces are airbench's
in torch's own terms: ``requires_grad = False`` for the frozen tensors,
``torch.optim.SGD`` parameter groups with Nesterov momentum and a
``LambdaLR`` triangle, the summed label-smoothed cross entropy, lookahead over
the float entries of the ``state_dict``, and the augmentations with explicit
offsets and flip bits (so tests can feed both sides the same draws).
torch is imported inside the functions: it is an optional (dev) dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxnet.bench.torch_models import import_torch
from jaxnet.errors import ConfigError
from jaxnet.interop import to_torch_state_dict
from jaxnet.models.cifar_speed import CifarSpeedNet
from jaxnet.speedrun import SpeedrunRecipe, speedrun_groups, triangle_schedule

__all__ = [
    "TorchLookahead",
    "build_torch_speed_net",
    "make_torch_speedrun_optimizer",
    "torch_alternating_flip",
    "torch_speed_net_like",
    "torch_train_step",
    "torch_translate",
    "torch_tta_accuracy",
    "torch_tta_logits",
    "train_torch_speedrun",
]


def _speed_net_class() -> type:
    """Defines the twin (needs torch, hence inside a function)."""
    torch = import_torch()  # first: its ImportError says how to install torch
    from torch import nn
    from torch.nn import functional as F

    class ConvGroup(nn.Module):
        def __init__(self, cin: int, cout: int, momentum: float, eps: float):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
            self.norm1 = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False)
            self.norm2 = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
            self.activ = nn.GELU()
            for norm in (self.norm1, self.norm2):
                norm.weight.requires_grad = False  # fixed at 1, as in airbench

        def forward(self, x):
            x = self.activ(self.norm1(F.max_pool2d(self.conv1(x), 2)))
            return self.activ(self.norm2(self.conv2(x)))

    class SpeedNet(nn.Module):
        def __init__(self, widths: tuple[int, ...], momentum: float, eps: float, logit_scale: float):
            super().__init__()
            self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
            self.whiten.weight.requires_grad = False
            channels = (24, *widths)
            self.groups = nn.ModuleList([ConvGroup(a, b, momentum, eps) for a, b in zip(channels[:-1], channels[1:])])
            self.head = nn.Linear(widths[-1], 10, bias=False)
            self.logit_scale = logit_scale

        def forward(self, x):
            x = F.gelu(self.whiten(x))
            for group in self.groups:
                x = group(x)
            return self.head(torch.flatten(F.max_pool2d(x, 3), 1)) * self.logit_scale

    return SpeedNet


def build_torch_speed_net(
    state_dict: dict[str, Any],
    *,
    widths: Sequence[int],
    batchnorm_momentum: float = 0.4,
    eps: float = 1e-12,
    logit_scale: float = 1 / 9,
) -> Any:
    """The PyTorch speedrun net holding ``state_dict`` (PyTorch layout), in training mode.

    Args:
        state_dict: e.g. ``jaxnet.interop.to_torch_state_dict(jax_model)`` (arrays or tensors).
        widths: channels of the three conv groups.
        batchnorm_momentum: torch's convention (airbench's 0.6 is 0.4 here).
        eps: BatchNorm epsilon.
        logit_scale: the factor on the logits.

    Returns:
        The ``torch.nn.Module`` (NCHW input), weights loaded strictly.

    Raises:
        ImportError: without torch.
    """
    torch = import_torch()
    module = _speed_net_class()(tuple(widths), batchnorm_momentum, eps, logit_scale)
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()
    }
    module.load_state_dict(tensors, strict=True)
    return module.train()


def torch_speed_net_like(model: CifarSpeedNet) -> Any:
    """The PyTorch twin of a jaxnet :class:`CifarSpeedNet`, with its weights and BatchNorm statistics.

    >>> twin = torch_speed_net_like(speedrun_model(SpeedrunRecipe(widths=(8, 16, 16))))  # doctest: +SKIP
    """
    if not isinstance(model, CifarSpeedNet):
        raise ConfigError(f"torch_speed_net_like takes a CifarSpeedNet, got a {type(model).__name__}")
    norm = model.groups[0].norm1
    widths = tuple(group.conv2.out_channels for group in model.groups)
    return build_torch_speed_net(
        to_torch_state_dict(model),
        widths=widths,
        batchnorm_momentum=norm.momentum,
        eps=norm.eps,
        logit_scale=model.logit_scale,
    )


def make_torch_speedrun_optimizer(
    module: Any, recipe: SpeedrunRecipe, *, steps_per_epoch: int, total_steps: int
) -> tuple[Any, Any]:
    """airbench's ``torch.optim.SGD`` parameter groups and ``LambdaLR`` triangle for ``module``.

    BatchNorm biases (``"norm"`` in the name) get ``lr * bias_scaler``; every
    other trainable tensor the base rate; each group's ``weight_decay`` is
    ``wd / group_lr`` (the numbers of :func:`jaxnet.speedrun.speedrun_groups`).
    Freeze the whitening bias with :func:`torch_train_step`'s argument.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    torch = import_torch()
    groups = speedrun_groups(recipe, steps_per_epoch)
    bias, default = groups["norm_bias"], groups["default"]
    if bias is None or default is None:
        raise ConfigError("the speedrun's norm_bias and default groups must be trained, not FROZEN")
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    configs = [
        {"params": [p for k, p in named if "norm" in k], "lr": bias.lr, "weight_decay": bias.weight_decay},
        {"params": [p for k, p in named if "norm" not in k], "lr": default.lr, "weight_decay": default.weight_decay},
    ]
    optimizer = torch.optim.SGD(configs, momentum=recipe.momentum, nesterov=True)
    schedule = triangle_schedule(total_steps, start=recipe.start_lr, end=recipe.end_lr, warmup=recipe.warmup)
    factors = np.asarray(schedule(np.arange(total_steps + 1)), np.float64)  # one table, no jax call per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: float(factors[min(i, total_steps)]))
    return optimizer, scheduler


def torch_train_step(
    module: Any,
    optimizer: Any,
    scheduler: Any,
    images: Any,
    labels: Any,
    *,
    label_smoothing: float = 0.2,
    whiten_bias_trainable: bool = True,
    autocast_dtype: Any = None,
) -> Any:
    """One airbench step: summed label-smoothed cross entropy, ``backward``, ``step``, ``scheduler.step``.

    Args:
        module: the twin, in training mode.
        optimizer, scheduler: from :func:`make_torch_speedrun_optimizer`.
        images: ``(B, 3, 32, 32)`` normalized float tensor.
        labels: ``(B,)`` int64 tensor.
        label_smoothing: of the cross entropy.
        whiten_bias_trainable: airbench's ``whiten.bias.requires_grad = epoch < 3``.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under ``torch.autocast``.

    Returns:
        The summed loss, a detached scalar tensor (not synchronized).
    """
    torch = import_torch()
    module.whiten.bias.requires_grad = whiten_bias_trainable
    with torch.autocast(
        "cpu" if images.device.type == "cpu" else images.device.type,
        dtype=autocast_dtype or torch.bfloat16,
        enabled=autocast_dtype is not None,
    ):
        logits = module(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


class TorchLookahead:
    """airbench's ``LookaheadState``: an EMA of every float ``state_dict`` entry, copied back at each sync."""

    def __init__(self, module: Any):
        self.average = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self, module: Any, decay: float) -> None:
        """``average.lerp_(current, 1 - decay)``; ``current.copy_(average)``, for float entries."""
        torch = import_torch()
        with torch.no_grad():
            for average, current in zip(self.average.values(), module.state_dict().values()):
                if current.dtype in (torch.float16, torch.bfloat16, torch.float32):
                    average.lerp_(current, 1 - decay)
                    current.copy_(average)


def torch_translate(images: Any, offsets: Any, pad: int) -> Any:
    """Image ``i`` of an NCHW batch becomes the window at ``offsets[i]`` (row, col) of its reflect-padded self.

    One masked copy per possible offset, ``(2 * pad + 1) ** 2`` in all, instead of one per image (a
    kernel launch each on a GPU).
    """
    torch = import_torch()
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    h, w = images.shape[-2:]
    offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.long, device=images.device)  # (N, 2)
    out = torch.empty_like(images)
    for r in range(2 * pad + 1):
        for c in range(2 * pad + 1):
            chosen = (offsets[:, 0] == r) & (offsets[:, 1] == c)
            out[chosen] = padded[chosen, :, r : r + h, c : c + w]
    return out


def torch_alternating_flip(images: Any, bits: Any, epoch: int) -> Any:
    """Mirrors image ``i`` of an NCHW batch iff ``bits[i] XOR (epoch odd)``."""
    torch = import_torch()
    mask = torch.from_numpy(np.array(bits, bool)).to(images.device) ^ bool(epoch % 2)  # a copy: jax's are read-only
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def torch_tta_logits(module: Any, images: Any, level: int = 2) -> Any:
    """airbench's TTA in PyTorch: the views of :func:`jaxnet.tta.tta_views` on an NCHW batch, eval mode.

    Level 0 is ``module(x)``; 1 the mean with the mirror; 2 half that plus a
    quarter each of the mirrored means of the 1-pixel translations (reflect
    pad 1, crops at (0, 0) and (2, 2)). Returns float32 ``(B, K)`` logits.
    """
    torch = import_torch()
    if level not in (0, 1, 2):
        raise ConfigError(f"tta level must be 0, 1 or 2 (none, mirror, mirror + translate); got {level!r}")

    def mirrored(x: Any) -> Any:
        return 0.5 * (module(x).float() + module(x.flip(-1)).float())

    if level == 0:
        return module(images).float()
    if level == 1:
        return mirrored(images)
    padded = torch.nn.functional.pad(images, (1,) * 4, mode="reflect")
    h, w = images.shape[-2:]
    shifted = (padded[..., 0:h, 0:w], padded[..., 2 : 2 + h, 2 : 2 + w])
    return 0.5 * mirrored(images) + 0.25 * (mirrored(shifted[0]) + mirrored(shifted[1]))


def torch_tta_accuracy(module: Any, images: Any, labels: Any, *, level: int = 2, batch_size: int = 2000) -> float:
    """Test accuracy of :func:`torch_tta_logits` over NCHW ``images`` (no grad, eval mode, then train mode)."""
    torch = import_torch()
    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = torch_tta_logits(module, images[start : start + batch_size], level)
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    module.train()
    return correct / len(labels)


def _wait(torch: Any, device: str) -> None:
    """Returns when the device's queued work is done (a CUDA launch returns at once)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _torch_inputs(torch: Any, images: Any, recipe: SpeedrunRecipe, device: str) -> Any:
    """uint8 NHWC images as the recipe's normalized float32 NCHW tensor on ``device`` (channels-last on CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if device == "cpu" else x.contiguous()


def train_torch_speedrun(
    dataset: Any,
    *,
    recipe: SpeedrunRecipe | None = None,
    seed: int = 0,
    device: str = "cpu",
    compile_mode: str | None = None,
    threads: int | None = None,
    curve: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole speedrun in PyTorch, from the weights :func:`jaxnet.speedrun.train_speedrun` starts from.

    The twin of ``train_speedrun``: the whitened jaxnet net of the same seed
    copied in, then per epoch the alternating flip, the 2-pixel reflect
    translation and a random order (drawn with numpy from ``seed``: the same
    distributions, other draws), ``torch_train_step`` per batch with the
    whitening bias frozen after ``recipe.whiten_bias_epochs``, the lookahead
    syncs of :func:`jaxnet.averaging.sync_decay`, and the TTA evaluation.
    The clock covers what ``train_speedrun``'s does (model build and whitening,
    compilation, every step); ``recipe.precision == "bf16"`` runs the forward
    under ``torch.autocast``.

    Args:
        dataset: CIFAR-10 as uint8 NHWC arrays (``jaxnet.data.load_dataset("cifar10")``).
        recipe: the hyper-parameters (default: airbench94's ``SpeedrunRecipe()``).
        seed: the initial weights (jaxnet's init) and the data order.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        compile_mode: ``None`` for eager, else ``torch.compile``'s mode
            (``"default"``, ``"max-autotune"``).
        threads: ``torch.set_num_threads`` (CPU).
        curve: measure the test accuracy (no TTA) after each epoch, clock stopped.
        progress: a tqdm bar over the steps.

    Returns:
        ``{"accuracy", "tta_accuracy", "train_seconds", "tta_seconds", "steps",
        "losses", "curve"}`` as in :class:`jaxnet.speedrun.SpeedrunResult`.
    """
    import math
    import time

    from tqdm.auto import tqdm

    from jaxnet.averaging import sync_decay
    from jaxnet.speedrun import speedrun_model

    torch = import_torch()
    recipe = SpeedrunRecipe() if recipe is None else recipe
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    start = time.perf_counter()
    twin = torch_speed_net_like(
        speedrun_model(recipe, seed=seed, whiten_from=dataset.train_images[: recipe.whiten_images])
    ).to(device)
    if device == "cpu":
        twin = twin.to(memory_format=torch.channels_last)
    forward = twin if compile_mode is None else torch.compile(twin, mode=compile_mode)
    steps_per_epoch = dataset.num_train // recipe.batch_size
    total_steps = math.ceil(steps_per_epoch * recipe.epochs)
    optimizer, scheduler = make_torch_speedrun_optimizer(
        twin, recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    lookahead = TorchLookahead(twin)
    images = _torch_inputs(torch, dataset.train_images, recipe, device)
    labels = torch.from_numpy(np.asarray(dataset.train_labels, np.int64)).to(device)
    test_images = _torch_inputs(torch, dataset.test_images, recipe, device)
    test_labels = torch.from_numpy(np.asarray(dataset.test_labels, np.int64)).to(device)
    rng = np.random.default_rng(seed)
    bits = rng.random(dataset.num_train) < 0.5
    autocast = torch.bfloat16 if recipe.precision == "bf16" else None
    losses: list[Any] = []
    points: list[tuple[float, int, float]] = []
    clock = 0.0
    with tqdm(total=total_steps, desc="speedrun (torch)", disable=not progress) as bar:
        for epoch in range(math.ceil(recipe.epochs)):
            epoch_images = torch_alternating_flip(images, bits, epoch) if recipe.flip else images
            if recipe.translate:
                offsets = rng.integers(0, 2 * recipe.translate + 1, size=(dataset.num_train, 2))
                epoch_images = torch_translate(epoch_images, offsets, recipe.translate)
            order = torch.from_numpy(rng.permutation(dataset.num_train)).to(device)
            for i in range(min(steps_per_epoch, total_steps - len(losses))):
                idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
                loss = torch_train_step(
                    forward,  # the twin or its compiled form (same parameters)
                    optimizer,
                    scheduler,
                    epoch_images[idx],
                    labels[idx],
                    label_smoothing=recipe.label_smoothing,
                    whiten_bias_trainable=epoch < recipe.whiten_bias_epochs,
                    autocast_dtype=autocast,
                )
                losses.append(loss)
                decay = sync_decay(len(losses), total_steps, every=recipe.sync_every)
                if decay is not None:
                    lookahead.update(twin, decay)
                bar.update()
            if curve:  # off the clock
                _wait(torch, device)
                clock += time.perf_counter() - start
                points.append((clock, len(losses), torch_tta_accuracy(forward, test_images, test_labels, level=0)))
                start = time.perf_counter()
    _wait(torch, device)
    train_seconds = clock + time.perf_counter() - start
    start = time.perf_counter()
    tta = torch_tta_accuracy(forward, test_images, test_labels, level=recipe.tta_level)
    tta_seconds = time.perf_counter() - start
    plain = points[-1][2] if points else torch_tta_accuracy(forward, test_images, test_labels, level=0)
    return {
        "accuracy": plain,
        "tta_accuracy": tta,
        "train_seconds": train_seconds,
        "tta_seconds": tta_seconds,
        "steps": len(losses),
        "losses": [float(loss) / recipe.batch_size for loss in losses],
        "curve": points,
    }
