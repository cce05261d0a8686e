"""The tutorials' models and layers as Flax NNX modules, and a registry by CLI name.

>>> model = create_model("mlp", seed=0)
>>> MODELS["mlp"].input_shape
(28, 28, 1)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.cifar_speed import CifarSpeedNet
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
    "CifarSpeedNet",
    "Conv2d",
    "ConvNet",
    "Dropout",
    "Dropout2d",
    "Linear",
    "LinearRegression",
    "ModelSpec",
    "build_model",
    "conv2d",
    "create_model",
    "flatten",
    "max_pool2d",
    "resolve_factory",
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
            "convnet",
            ConvNet,
            (28, 28, 1),
            10,
            "log_probs",
            "mnist",
            "conv32-conv64-maxpool-Dropout2d-fc128-Dropout-fc10, log_softmax",
        ),
        ModelSpec(
            "cifar_cnn",
            CifarCNN,
            (32, 32, 3),
            10,
            "logits",
            "cifar10",
            "conv16-pool-conv32-pool-fc128-fc10, no activations (as the tutorial)",
        ),
        ModelSpec(
            "cifar_speed",
            CifarSpeedNet,
            (32, 32, 3),
            10,
            "logits",
            "cifar10",
            "airbench94's net: 2x2 whitening, conv groups 64-256-256 with BatchNorm and GELU (jaxnet.speedrun)",
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
    build: Callable[..., nnx.Module] = spec.cls  # registered classes take rngs= (ModelSpec.cls)
    return build(rngs=rngs if rngs is not None else nnx.Rngs(params=seed))


# ---------------------------------------------------------------------------
# A model of your own: "package.module:factory"
# ---------------------------------------------------------------------------


def resolve_factory(spec: str, *, flag: str = "--model") -> Callable[..., Any]:
    """Imports ``package.module`` and returns its attribute ``factory``, as ``python -m`` finds code.

    The current directory is put on ``sys.path`` (where ``python -m`` puts
    it), so a ``nets.py`` beside the command is found as ``nets:build``.

    Args:
        spec: ``"package.module:attribute"``, e.g. ``"mypkg.nets:build_resnet"``.
        flag: the flag or config key that named it, for the messages.

    Returns:
        The attribute, a callable.

    Raises:
        ConfigError: no colon, a module that cannot be imported (the cause is
            named), a missing attribute (the module's callables are listed),
            or an attribute that is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        example = f"{module_name or 'mypkg.nets'}:{attr or 'build'}" if sep else f"{spec}:build"
        raise ConfigError(
            f"{flag} {spec} is neither a jaxnet name nor package.module:factory; write the module "
            f"and the function or class that builds it with a colon, e.g. {flag} {example}"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"{flag} {spec}: no module named {exc.name!r} in the current directory {os.getcwd()} or on "
                "sys.path; run from the folder that holds it, set PYTHONPATH, or pip install its package"
            ) from None
        raise ConfigError(f"{flag} {spec}: importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:  # a SyntaxError or any error raised by the module's own code
        raise ConfigError(f"{flag} {spec}: importing {module_name} raised {_first_line(exc)}") from None
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(
            f"{flag} {spec}: module {module_name} has no attribute {attr!r}; its callables are: "
            f"{', '.join(names[:20]) or 'none'}{', ...' if len(names) > 20 else ''}"
        )
    factory = getattr(module, attr)
    if not callable(factory):
        raise ConfigError(
            f"{flag} {spec} is a {type(factory).__name__}, not a function or class; name one that returns the model"
        )
    return factory


def build_model(spec: str, *, seed: int = 0, kwargs: Mapping[str, Any] | None = None) -> nnx.Module:
    """Builds a registered model (``"mlp"``) or a model of your own (``"mypkg.nets:build"``).

    A factory is called with ``rngs=nnx.Rngs(seed)`` if its signature takes
    ``rngs``, else ``seed=seed`` if it takes ``seed``, else with no
    arguments; ``kwargs`` are passed too. ``nnx.Rngs(seed)`` initializes
    parameters as ``nnx.Rngs(params=seed)`` does and also serves layers that
    keep a stream of their own, such as ``nnx.Dropout(rate, rngs=rngs)``.

    Args:
        spec: a key of :data:`MODELS`, or ``"package.module:factory"``.
        seed: seed of the parameter initialization.
        kwargs: keyword arguments of the factory (``[model_kwargs]`` in a
            ``--config`` file); registered models take none.

    Returns:
        The model.

    Raises:
        ConfigError: an unknown name, a factory that cannot be found (see
            :func:`resolve_factory`), one that raises, or one that returns
            something other than an ``nnx.Module``.

    >>> type(build_model("mlp128")).__name__
    'MLP128'
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        if kwargs:
            raise ConfigError(
                f"model_kwargs {sorted(kwargs)} apply to a package.module:factory model, not to {spec!r}; drop them"
            )
        if spec not in MODELS and "." in spec:
            resolve_factory(spec)  # raises: the colon is missing
        return create_model(spec, seed=seed)
    factory = resolve_factory(spec)
    params = _parameters(factory)
    for name in ("rngs", "seed"):
        if name in kwargs:
            raise ConfigError(f"model_kwargs must not set {name!r}: jaxnet passes it from --seed; drop it")
    if "rngs" in params:
        kwargs["rngs"] = nnx.Rngs(seed)
    elif "seed" in params:
        kwargs["seed"] = seed
    shown = ", ".join(f"{k}={f'nnx.Rngs({seed})' if k == 'rngs' else repr(v)}" for k, v in kwargs.items())
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: any error, reported in one line
        raise ConfigError(f"--model {spec}: calling {spec}({shown}) raised {_first_line(exc)}") from None
    if not isinstance(model, nnx.Module):
        hint = (
            "a flax.linen module; jaxnet trains flax.nnx modules (wrap it with nnx.bridge.ToNNX, or write it with nnx)"
            if type(model).__module__.startswith("flax.linen")
            else f"a {type(model).__module__}.{type(model).__qualname__}"
        )
        raise ConfigError(
            f"--model {spec}: {spec}({shown}) returned {hint}, not a flax.nnx.Module; return the "
            "model, e.g. `return Net(rngs=rngs)`"
        )
    return model


def _parameters(factory: Callable[..., Any]) -> set[str]:
    """The named parameters of a function, or of a class's ``__init__`` (nnx's metaclass hides it)."""
    target: Callable[..., Any] = factory
    if isinstance(factory, type):
        cls: type[object] = factory  # a class object, so its __init__ is the unbound function
        target = cls.__init__
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # a builtin: no signature to read
        return set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
