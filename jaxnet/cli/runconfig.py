"""``jaxnet train``'s settings: the ``--config`` file, and the resolved run config it records.

Three layers decide a setting, each overriding the one before: the model's
recipe (:mod:`jaxnet.recipes`), a TOML file given with ``--config`` (keys
are the flags' names, ``lr = 0.01``, ``model = "mypkg.nets:build"``,
``val_split = 0.1``, and a ``[model_kwargs]`` table for a factory), and the
command line. :class:`RunConfig` is the result, every setting that shapes the
run; it is what ``W/config.json`` records and what ``--resume`` compares.
A file's values are checked by the flags' own converters
(:mod:`jaxnet.cli.converters`).

Also importable as ``jaxnet.runconfig``, its place before the CLI became a package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable
from typing import Any

from jaxnet.cli.converters import fraction, json_object, nonnegative_float, positive_float, positive_int, seed
from jaxnet.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

# The other names jaxnet.runconfig held before the CLI became a package (its
# flag types are the converters imported above); the output lists live in jaxnet.outputs.
from jaxnet.cli.converters import SEED_MAX, HelpFormatter  # noqa: E402,F401
from jaxnet.outputs import CLASSIFIER_KINDS as CLASSIFIER_OUTPUTS  # noqa: E402,F401
from jaxnet.outputs import LOSS_OF_OUTPUT, LOSSES  # noqa: E402,F401
from jaxnet.outputs import VALUE_KINDS as VALUE_OUTPUTS  # noqa: E402,F401

# ---------------------------------------------------------------------------
# The --config file
# ---------------------------------------------------------------------------


# What a --config value of each flag type must be in TOML (bool is an int in Python: refused apart).
_TOML_TYPES: dict[Any, tuple[type, ...]] = {
    positive_int: (int,),
    int: (int,),
    seed: (int,),
    nonnegative_float: (int, float),
    positive_float: (int, float),
    fraction: (int, float),
    float: (int, float),
    json_object: (dict,),
    None: (str,),
    str: (str,),
}
_TYPE_NAMES = {int: "an integer", float: "a number", dict: "a table", str: "a string", bool: "true or false"}


def _kind(action: argparse.Action) -> tuple[type, ...]:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # store_true & co
        return (bool,)
    if callable(action.type) and action.type not in _TOML_TYPES:
        return (str,)  # a converter of text (e.g. --model's name check)
    return _TOML_TYPES[action.type]


def read_config_file(
    path: str | pathlib.Path, actions: Iterable[argparse.Action], *, not_allowed: Iterable[str] = ()
) -> dict[str, Any]:
    """Reads a ``--config`` TOML file into flag values, checked like the command line checks them.

    Keys are the flags' names without the dashes, with ``-`` or ``_``
    (``batch-size`` or ``batch_size``); a ``[model_kwargs]`` table holds a
    factory's keyword arguments.

    Args:
        path: the TOML file.
        actions: the parser's arguments (their ``dest``, ``type`` and ``choices``).
        not_allowed: flag destinations a file may not set (``config`` itself).

    Returns:
        ``{dest: value}``, ready for ``parser.set_defaults``.

    Raises:
        ConfigError: a missing or invalid file, an unknown key (the valid
            ones are listed), or a value of the wrong type or range (the key
            is named).
    """
    path = pathlib.Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    by_dest = {a.dest: a for a in actions if a.dest not in (argparse.SUPPRESS, "help", *not_allowed)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        action = by_dest.get(dest)
        if action is None:
            raise ConfigError(f"--config {path}: unknown key {key!r}; valid keys are: {', '.join(sorted(by_dest))}")
        values[dest] = _check_value(path, key, value, action)
    return values


def _check_value(path: pathlib.Path, key: str, value: Any, action: argparse.Action) -> Any:
    kinds = _kind(action)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ConfigError(
            f"--config {path}: {key} = {value!r} is {_toml_type(value)}, expected {_TYPE_NAMES[kinds[-1]]}"
            + (f" (one of {', '.join(map(str, action.choices))})" if action.choices else "")
        )
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"--config {path}: {key} = {value!r}; expected one of {', '.join(map(str, action.choices))}")
    if kinds == (dict,):
        try:
            return json.loads(json.dumps(value))  # recorded in config.json: JSON values only
        except (TypeError, ValueError):
            raise ConfigError(
                f"--config {path}: {key} holds a value JSON cannot record (a date?); "
                "use numbers, strings, lists and tables"
            ) from None
    if callable(action.type) and not isinstance(value, bool):
        try:
            return action.type(str(value))  # the flag's own range check
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--config {path}: {key} = {value!r}: {exc}") from None
    return value


def _toml_type(value: Any) -> str:
    for kind in (bool, int, float, str, dict):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------
# The resolved run config
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting that shapes a ``jaxnet train`` run, after recipe, ``--config`` and flags.

    Recorded as ``W/config.json`` (``fit(config=...)``); ``--resume`` refuses
    any difference but in :data:`jaxnet.checkpoint.workdir.RESUMABLE_KEYS`, and
    ``jaxnet export`` rebuilds the model from ``model``, ``model_kwargs`` and
    ``seed``. Where the data is read from (``--data-dir``) and how the run is
    watched or saved (``--workdir``, ``--checkpoint-every``,
    ``--keep-checkpoints``, ``--eval-batch-size``, ``--json``, progress) are
    not part of it.
    """

    model: str  # a key of jaxnet.models.MODELS, or package.module:factory
    model_kwargs: dict[str, Any]  # keyword arguments of a factory ({} for registered models)
    loss: str  # a key of LOSSES
    output: str  # fit's output kind, LOSSES[loss]
    dataset: str  # mnist, cifar10, linear, tfds:NAME or package.module:function
    input_shape: list[int]  # one example, e.g. [28, 28, 1]
    input_dtype: str  # dtype of the stored examples: "uint8" pixels, or "float32" features
    normalize: bool  # Normalize(mean, std) after ToTensor; False: ToTensor only
    mean: list[float] | None  # per-channel mean in units of pixel/255 (None: the data gave none)
    std: list[float] | None  # per-channel std in units of pixel/255
    augment: bool  # random crop + horizontal flip of training batches
    val_split: float | None  # fraction of the training split held out for validation
    optimizer: str  # a name of jaxnet.optim.OPTIMIZERS
    lr: float  # base learning rate
    momentum: float  # SGD / RMSprop momentum (recorded for every optimizer)
    nesterov: bool  # Nesterov momentum (SGD)
    weight_decay: float | None  # None: PyTorch's default (0, or 0.01 for adamw)
    schedule: str  # a name of jaxnet.optim.SCHEDULES
    gamma: float  # decay factor per epoch (step / exponential schedules)
    step_size: int  # epochs between decays (step schedule)
    warmup_epochs: float | None  # warm-up of warmup_cosine (None: 5% of the run)
    clip_norm: float | None  # global gradient-norm clipping threshold
    clip_value: float | None  # per-element gradient clipping threshold
    grad_accum: int  # batches accumulated per optimizer step
    batch_size: int  # examples per step, over all devices
    epochs: int  # passes over the training data (may grow on --resume)
    seed: int  # seed of init, shuffling, dropout and augmentation
    precision: str  # fp32, bf16 or fp16 compute
    devices: int  # devices the batch is split over
    fsdp: bool  # parameters and optimizer state sharded over the devices
    scan: bool  # each epoch as one compiled lax.scan

    def to_json(self) -> dict[str, Any]:
        """The config as ``W/config.json`` holds it."""
        return dataclasses.asdict(self)
