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
    """Image ``i`` of an NCHW batch becomes the window at ``offsets[i]`` (row, col) of its reflect-padded self."""
    torch = import_torch()
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    h, w = images.shape[-2:]
    return torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(np.asarray(offsets).tolist())])


def torch_alternating_flip(images: Any, bits: Any, epoch: int) -> Any:
    """Mirrors image ``i`` of an NCHW batch iff ``bits[i] XOR (epoch odd)``."""
    torch = import_torch()
    mask = torch.from_numpy(np.array(bits, bool)) ^ bool(epoch % 2)  # a copy: jax's arrays are read-only
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)
