"""The tutorials' models in PyTorch, layer for layer, for side-by-side measurements.

Each class is the PyTorch tutorial's own ``nn.Module`` (NCHW images, the
tutorials' attribute names), so ``jaxnet.interop.to_torch_state_dict`` of the
matching jaxnet model loads into it strictly: both frameworks start from the
same weights. torch is imported lazily by :func:`build_torch_model`, because it
is an optional (dev) dependency of jaxnet.

The one deliberate difference from the ConvNet tutorial is the one jaxnet's
``ConvNet`` makes too: plain ``Dropout(0.5)`` after fc1 instead of the
deprecated ``Dropout2d`` on a 2-D input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxnet.errors import ConfigError

__all__ = ["TORCH_MODELS", "build_torch_model", "import_torch", "make_torch_optimizer", "set_dropout"]

TORCH_MODELS = ("mlp", "mlp512", "mlp128", "convnet", "cifar_cnn", "linear")


def import_torch() -> Any:
    """Imports torch, or raises an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "the PyTorch side of the benchmark needs torch; install it with "
            "`pip install 'jaxnet[torch]'` (torch==2.13.0), or pass --variants jax-jit,jax-scan"
        ) from exc
    return torch


def _classes() -> dict[str, type]:
    """Defines the tutorial modules (needs torch, hence inside a function)."""
    torch = import_torch()  # first: its ImportError says how to install torch
    from torch import nn
    from torch.nn import functional as F

    class MLP(nn.Module):  # 784-512-256-10, ReLU, Dropout(0.2)
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 256), nn.Linear(256, 10)
            self.dropout1, self.dropout2 = nn.Dropout(0.2), nn.Dropout(0.2)

        def forward(self, x):
            x = x.view(-1, 784)
            x = self.dropout1(F.relu(self.fc1(x)))
            x = self.dropout2(F.relu(self.fc2(x)))
            return self.fc3(x)

    class MLP512(nn.Module):  # 784-512-10
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(784, 512), nn.Linear(512, 10)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x.view(-1, 28 * 28))))

    class MLP128(nn.Module):  # Flatten-784-128-ReLU-10
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(28 * 28, 128), nn.Linear(128, 10)

        def forward(self, x):
            return self.linear2(F.relu(self.linear1(torch.flatten(x, 1))))

    class ConvNet(nn.Module):  # conv32-conv64-maxpool-Dropout2d-fc128-Dropout-fc10, log_softmax
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.dropout1, self.dropout2 = nn.Dropout2d(0.25), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = torch.flatten(self.dropout1(x), 1)
            x = self.dropout2(F.relu(self.fc1(x)))
            return F.log_softmax(self.fc2(x), dim=1)

    class CifarCNN(nn.Module):  # conv16-pool-conv32-pool-fc128-fc10, no activations (as the tutorial)
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 1, 1)
            self.fc1, self.fc2 = nn.Linear(32 * 8 * 8, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(self.conv1(x), 2, 2)
            x = F.max_pool2d(self.conv2(x), 2, 2)
            return self.fc2(self.fc1(torch.flatten(x, 1)))

    class LinearRegression(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x):
            return self.linear(x)

    return {
        "mlp": MLP,
        "mlp512": MLP512,
        "mlp128": MLP128,
        "convnet": ConvNet,
        "cifar_cnn": CifarCNN,
        "linear": LinearRegression,
    }


def build_torch_model(name: str, state_dict: Mapping[str, Any]) -> Any:
    """Builds the PyTorch tutorial model ``name`` holding the given weights.

    Args:
        name: a jaxnet model name with a PyTorch twin (see :data:`TORCH_MODELS`).
        state_dict: PyTorch-layout weights, e.g.
            ``jaxnet.interop.to_torch_state_dict(jax_model)`` (numpy arrays or tensors).

    Returns:
        The ``torch.nn.Module`` in training mode, weights loaded strictly.

    Raises:
        ConfigError: for a model without a PyTorch twin.
        ImportError: if torch is not installed.

    >>> sd = to_torch_state_dict(create_model("mlp"))  # doctest: +SKIP
    >>> build_torch_model("mlp", sd)(torch.zeros(2, 1, 28, 28)).shape  # doctest: +SKIP
    torch.Size([2, 10])
    """
    if name not in TORCH_MODELS:
        raise ConfigError(
            f"model {name!r} has no PyTorch twin for the benchmark; choose one of {', '.join(TORCH_MODELS)} "
            "or run only the jax variants (--variants jax-jit,jax-scan)"
        )
    torch = import_torch()
    module = _classes()[name]()
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()
    }
    module.load_state_dict(tensors, strict=True)
    module.train()
    return module


def set_dropout(module: Any, rate: float) -> None:
    """Sets every dropout layer's ``p`` (0 turns dropout off while staying in train mode)."""
    torch = import_torch()
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Dropout, torch.nn.Dropout2d)):
            layer.p = float(rate)


def make_torch_optimizer(name: str, params: Iterable[Any], lr: float, *, momentum: float = 0.0) -> Any:
    """The ``torch.optim`` optimizer that ``jaxnet.optim.create_optimizer(name, lr, ...)`` reproduces.

    Args:
        name: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad`` or ``adadelta``.
        params: the module's parameters.
        lr: learning rate.
        momentum: SGD / RMSprop momentum.

    Returns:
        A ``torch.optim.Optimizer`` with torch's defaults otherwise.

    Raises:
        ConfigError: for an unknown name.
    """
    torch = import_torch()
    optimizers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr, momentum=momentum),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr),
        "adadelta": lambda p: torch.optim.Adadelta(p, lr=lr),
    }
    if name not in optimizers:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(optimizers)}")
    return optimizers[name](params)
