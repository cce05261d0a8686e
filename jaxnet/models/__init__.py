"""The tutorials' models and layers as Flax NNX modules, and a registry by CLI name.

>>> model = create_model("mlp", seed=0)
>>> MODELS["mlp"].input_shape
(28, 28, 1)
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Dropout2d,
    Linear,
    conv2d,
    flatten,
    max_pool2d,
    torch_uniform_init,
)
from jaxnet.models.tutorial import MLP, MLP128, MLP512, CifarCNN, ConvNet, LinearRegression

__all__ = [
    "MLP",
    "MLP128",
    "MLP512",
    "MODELS",
    "BatchNorm1d",
    "BatchNorm2d",
    "CifarCNN",
    "Conv2d",
    "ConvNet",
    "Dropout",
    "Dropout2d",
    "Linear",
    "LinearRegression",
    "ModelSpec",
    "conv2d",
    "create_model",
    "flatten",
    "max_pool2d",
    "torch_uniform_init",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the rest of jaxnet needs to know about a model to train it."""

    name: str  # CLI name, the key in MODELS
    cls: type[nnx.Module]  # built as cls(rngs=nnx.Rngs(seed))
    input_shape: tuple[int, ...]  # one example, NHWC for images: (28, 28, 1)
    num_classes: int  # width of the output; 0 for regression
    output: str  # "logits", "log_probs" or "regression"
    default_dataset: str  # "mnist", "cifar10" or "linear"
    description: str  # one line for --help


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp", MLP, (28, 28, 1), 10, "logits", "mnist", "MLP 784-512-256-10, ReLU, Dropout(0.2)"),
        ModelSpec("mlp512", MLP512, (28, 28, 1), 10, "logits", "mnist", "MLP 784-512-10, ReLU"),
        ModelSpec("mlp128", MLP128, (28, 28, 1), 10, "logits", "mnist", "MLP Flatten-784-128-ReLU-10"),
        ModelSpec(
            "convnet", ConvNet, (28, 28, 1), 10, "log_probs", "mnist",
            "conv32-conv64-maxpool-Dropout2d-fc128-Dropout-fc10, log_softmax",
        ),
        ModelSpec(
            "cifar_cnn", CifarCNN, (32, 32, 3), 10, "logits", "cifar10",
            "conv16-pool-conv32-pool-fc128-fc10, no activations (as the tutorial)",
        ),
        ModelSpec("linear", LinearRegression, (1,), 0, "regression", "linear", "linear regression nn.Linear(1, 1)"),
    )
}


def create_model(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Builds a registered model with freshly initialized parameters.

    Args:
        name: a key of ``MODELS`` (``"mlp"``, ``"convnet"``, ...).
        seed: seed of the parameter initialization, used when ``rngs`` is None.
        rngs: random streams to initialize with; overrides ``seed``.

    Returns:
        The model, in training mode (as a new PyTorch module).

    Raises:
        ConfigError: if ``name`` is not registered; the message lists the valid names.

    >>> create_model("linear")(jnp.ones((3, 1))).shape
    (3, 1)
    """
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; valid names are: {', '.join(sorted(MODELS))}")
    return spec.cls(rngs=rngs if rngs is not None else nnx.Rngs(params=seed))
