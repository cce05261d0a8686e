"""``jaxnet train``'s flags, in groups: what is trained on what, the recipe, and how the run is kept.

:func:`add_train_args` adds them all to the ``train`` parser
(:func:`jaxnet.cli.train.register_cli`); :func:`train_defaults` gives every
flag's default as the parser is built, which is how ``--model cifar_speed``
tells a flag that was given from one left alone (:mod:`jaxnet.cli.speedrun`).
Each flag's type is one of :mod:`jaxnet.cli.converters`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

from jaxnet.cli.converters import (
    fraction,
    json_object,
    model_spec,
    nonnegative_float,
    positive_float,
    positive_int,
    seed,
)
from jaxnet.outputs import LOSSES

# Flags that say where data comes from or how the run is watched and saved: not part of the
# recorded run config (W/config.json), so they may differ on --resume.
WATCH_AND_SAVE_FLAGS = (
    "config",
    "data_dir",
    "no_download",
    "workdir",
    "resume",
    "resume_or_start",
    "on_nan",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
    "json",
    "no_progress",
)
# Flags of --model cifar_speed alone: every other model refuses them, so fit's run config never
# holds them (the speedrun's own W/config.json records its whole recipe).
SPEEDRUN_FLAGS = ("tta",)
# Every flag that RunConfig does not record (tests check that each flag is one or the other).
OPERATIONAL_FLAGS = WATCH_AND_SAVE_FLAGS + SPEEDRUN_FLAGS


def flag_names(dests: Iterable[str]) -> str:
    """``--a-flag, --b`` for argparse destinations ``a_flag, b``."""
    return ", ".join("--" + d.replace("_", "-") for d in dests)


def add_train_args(p: argparse.ArgumentParser, resumable_keys: Sequence[str]) -> None:
    """Every ``jaxnet train`` flag, in the order ``--help`` lists them."""
    _add_model_and_data_args(p)
    _add_recipe_args(p)
    _add_preprocessing_args(p)
    _add_workdir_args(p, resumable_keys)
    _add_device_args(p)
    _add_output_args(p)
    _add_speedrun_args(p)


def train_defaults() -> dict[str, Any]:
    """``{dest: default}`` of every flag as built, whatever a ``--config`` file set while parsing."""
    from jaxnet.checkpoint.workdir import RESUMABLE_KEYS

    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p, RESUMABLE_KEYS)
    return vars(p.parse_args([]))


def epilog(resumable_keys: Sequence[str]) -> str:
    """The end of ``jaxnet train --help``: your own model, the config file, what the workdir records."""
    from jaxnet.recipes import USER_MODEL_RECIPE

    return (
        "Your own model: --model package.module:factory imports the module (the current directory "
        "is searched first) and calls factory(rngs=nnx.Rngs(seed)) if it takes rngs, else "
        "factory(seed=seed) if it takes seed, else factory(), with the keyword arguments of "
        "--model-kwargs or the config file's [model_kwargs] table; it must return an nnx.Module. "
        f"It needs --dataset, and trains with {USER_MODEL_RECIPE.source} unless flags say otherwise. "
        "--model cifar_speed trains airbench94's net with its own recipe (jaxnet.speedrun): it takes "
        "--epochs, --batch-size, --eval-batch-size, --precision fp32/bf16, --seed, --tta, --workdir and "
        "--model-kwargs '{\"widths\": [64, 256, 256]}', and refuses the flags of other recipes. "
        "--config run.toml holds any flags by name (lr = 0.01, batch_size = 128, val_split = 0.1, "
        'model = "mypkg.nets:build"). The workdir records every setting except '
        f"{flag_names(WATCH_AND_SAVE_FLAGS)}; --resume refuses "
        f"any other change except {flag_names(resumable_keys)}."
    )


def _add_model_and_data_args(p: argparse.ArgumentParser) -> None:
    """``--config``, the model and the data: what is trained on what."""
    from jaxnet.models import MODELS

    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="TOML file of flag values (keys are flag names); flags given here override it",
    )
    p.add_argument(
        "--model",
        default="mlp",
        type=model_spec,
        help=f"a jaxnet model ({', '.join(MODELS)}) or your own as package.module:factory",
    )
    p.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="keyword arguments of a factory, e.g. '{\"width\": 128}' (or [model_kwargs] in --config); "
        "cifar_speed takes '{\"widths\": [64, 256, 256]}'",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="mnist, cifar10, linear, tfds:NAME, or package.module:function, called with no "
        "arguments, returning an "
        "ArrayDataset, an (x, y) tuple or a dict of arrays (default: the model's data set; "
        "required for your own model)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding mnist/ and cifar10/ in the official formats "
        "(default: $JAXNET_DATA_DIR, then the user cache, then download)",
    )
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument(
        "--loss",
        default=None,
        choices=tuple(LOSSES),
        help="training loss (default: the model's: cross_entropy for logits, nll for "
        "log-probabilities, mse for regression; your own model: mse for float labels, "
        "binary for one output, else cross_entropy)",
    )
    p.add_argument(
        "--val-split",
        type=fraction,
        default=None,
        metavar="FRACTION",
        help="hold out this fraction of the training split for validation",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The tutorial recipe's settings: epochs, batch size, optimizer, schedule, clipping."""
    from jaxnet.optim import OPTIMIZERS, SCHEDULES

    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training data")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per step")
    p.add_argument("--eval-batch-size", type=positive_int, default=1000, help="examples per evaluation call")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="optimizer (PyTorch's rules)")
    p.add_argument("--lr", type=nonnegative_float, default=None, help="learning rate")
    p.add_argument("--momentum", type=nonnegative_float, default=None, help="SGD/RMSprop momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum (SGD)")
    p.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=None,
        help="weight decay (L2 added to the gradient; decoupled for adamw); default: PyTorch's (0, or 0.01 for adamw)",
    )
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="learning-rate schedule")
    p.add_argument(
        "--gamma", type=nonnegative_float, default=None, help="decay factor per epoch (step/exponential schedules)"
    )
    p.add_argument("--step-size", type=positive_int, default=None, help="epochs between decays (step schedule)")
    p.add_argument(
        "--warmup-epochs",
        type=nonnegative_float,
        default=None,
        metavar="E",
        help="linear warm-up of --schedule warmup_cosine, in epochs (fractions allowed; default: 5%% of the run)",
    )
    p.add_argument("--clip-norm", type=positive_float, default=None, help="clip gradients to this global norm")
    p.add_argument("--clip-value", type=positive_float, default=None, help="clip each gradient to [-v, v]")


def _add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    """How the images are prepared and the step is run, and the seed of it all."""
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Normalize(mean, std) after scaling to [0, 1]; --no-normalize: ToTensor only "
        "(default: the model's tutorial; yes for your own model)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="random crop + horizontal flip (on device)",
    )
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run each epoch as one compiled lax.scan over device-resident data",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed for init, shuffling and dropout")


def _add_workdir_args(p: argparse.ArgumentParser, resumable_keys: Sequence[str]) -> None:
    """The workdir, its checkpoints, and resuming the run it holds."""
    p.add_argument(
        "--workdir",
        default=None,
        help="folder for config.json, metrics.jsonl, TensorBoard events, curves.png, the model "
        "for 'jaxnet export' and checkpoints (one per epoch end; default: write nothing)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="N",
        help="also checkpoint every N steps (needs --workdir)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its latest sound checkpoint, exactly; only "
        f"{flag_names(resumable_keys)} may change; "
        "an error when there is no checkpoint to continue from",
    )
    p.add_argument(
        "--resume-or-start",
        action="store_true",
        help="--resume if --workdir holds a checkpoint of this run, else start it (a run that "
        "stopped before its first checkpoint starts over, its logs cleared)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=3,
        help="newest checkpoints to keep, besides the best by validation accuracy (validation "
        "loss for regression) when there is a validation split",
    )


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """Devices, sharding, compute precision and gradient accumulation."""
    from jaxnet.precision import PRECISIONS

    p.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="data parallel over N local devices (default: 1; all of them under 'jaxnet launch')",
    )
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="shard parameters and optimizer state over the devices",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="compute dtype (parameters stay fp32; fp16 adds dynamic loss scaling)",
    )
    p.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        metavar="K",
        help="accumulate gradients over K batches per optimizer step",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """What is printed, and what a NaN does to the run."""
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on the last line of stdout"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--on-nan",
        choices=("stop", "continue"),
        default="stop",
        help="a NaN or infinite loss: stop the run (exit status 1, naming the step and the last "
        "finite checkpoint) or train on; no checkpoint is ever written from a non-finite state",
    )


def _add_speedrun_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``--model cifar_speed`` alone (:data:`SPEEDRUN_FLAGS`)."""
    p.add_argument(
        "--tta",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="--model cifar_speed only: test-time augmentation of the reported test accuracy, "
        "0 none, 1 mirror, 2 mirror + translate (default: 2, the recipe's)",
    )
