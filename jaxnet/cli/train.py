"""``jaxnet train``: its flags, the run they describe, and the summary it prints.

Trains a tutorial model or your own (``--model package.module:factory``) on
a named data set or your own (``--dataset package.module:function``). A
setting comes from the model's recipe, then a ``--config`` TOML file, then
the command line (:mod:`jaxnet.cli.runconfig`); the resolved settings,
:class:`~jaxnet.cli.runconfig.RunConfig`, are what ``fit`` records in the
workdir and what ``--resume`` checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from jaxnet.cli.converters import (
    add_command,
    fraction,
    json_object,
    model_spec,
    nonnegative_float,
    positive_float,
    positive_int,
    seed,
)
from jaxnet.cli.runconfig import RunConfig, read_config_file
from jaxnet.errors import ConfigError
from jaxnet.outputs import LOSS_OF_OUTPUT, LOSSES

# Flags that say where data comes from or how the run is watched and saved: not part of the
# recorded run config (W/config.json), so they may differ on --resume.
OPERATIONAL_FLAGS = (
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


def _flags(dests: Iterable[str]) -> str:
    """``--a-flag, --b`` for argparse destinations ``a_flag, b``."""
    return ", ".join("--" + d.replace("_", "-") for d in dests)


# ---------------------------------------------------------------------------
# The parser, and the --config file under it
# ---------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``jaxnet train`` to the ``jaxnet`` parser; its ``func`` is :func:`run_train`."""
    from jaxnet.checkpoint.workdir import RESUMABLE_KEYS

    p = add_command(
        subparsers,
        "train",
        help="train a tutorial model or your own, and report its test accuracy",
        description="Train a tutorial model, or your own flax.nnx model, with a jit-compiled step and "
        "evaluate it after every epoch. Hyper-parameters default to the model's tutorial "
        "recipe; a --config file overrides the recipe, and every flag overrides both.",
        epilog=_epilog(RESUMABLE_KEYS),
    )
    _add_model_and_data_args(p)
    _add_recipe_args(p)
    _add_run_args(p, RESUMABLE_KEYS)
    p.set_defaults(func=run_train)
    return p


def _epilog(resumable_keys: Sequence[str]) -> str:
    """The end of ``jaxnet train --help``: your own model, the config file, what the workdir records."""
    from jaxnet.recipes import USER_MODEL_RECIPE

    return (
        "Your own model: --model package.module:factory imports the module (the current directory "
        "is searched first) and calls factory(rngs=nnx.Rngs(seed)) if it takes rngs, else "
        "factory(seed=seed) if it takes seed, else factory(), with the keyword arguments of "
        "--model-kwargs or the config file's [model_kwargs] table; it must return an nnx.Module. "
        f"It needs --dataset, and trains with {USER_MODEL_RECIPE.source} unless flags say otherwise. "
        "--config run.toml holds any flags by name (lr = 0.01, batch_size = 128, val_split = 0.1, "
        'model = "mypkg.nets:build"). The workdir records every setting except '
        f"{_flags(OPERATIONAL_FLAGS)}; --resume refuses "
        f"any other change except {_flags(resumable_keys)}."
    )


def _add_model_and_data_args(p: argparse.ArgumentParser) -> None:
    """``--config``, the model and the data: what is trained on what."""
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
        help="tutorial model (mlp, mlp512, mlp128, convnet, cifar_cnn, linear) or your own as package.module:factory",
    )
    p.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="keyword arguments of a factory, e.g. '{\"width\": 128}' (or [model_kwargs] in --config)",
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


def _add_run_args(p: argparse.ArgumentParser, resumable_keys: Sequence[str]) -> None:
    """Preprocessing, devices, precision, the workdir and its checkpoints, and the output."""
    from jaxnet.precision import PRECISIONS

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
        f"{_flags(resumable_keys)} may change; "
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


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` subcommand's parser inside :func:`jaxnet.cli.build_parser`'s."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["train"]


def parse_train_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, args: argparse.Namespace
) -> argparse.Namespace:
    """``args`` with a ``--config`` file's values under the flags given on the command line.

    Raises:
        ConfigError: a bad file, an unknown key or a value of the wrong type.
    """
    if getattr(args, "config", None) is None:
        return args
    train_parser = _train_parser(parser)
    values = read_config_file(args.config, train_parser._actions, not_allowed=("config", "func"))
    saved = {dest: train_parser.get_default(dest) for dest in values}
    train_parser.set_defaults(**values)  # as defaults: any flag on the command line still wins
    try:
        return parser.parse_args(argv)
    finally:
        train_parser.set_defaults(**saved)  # the parser stays as built


# ---------------------------------------------------------------------------
# The run: data, model, optimizer, fit
# ---------------------------------------------------------------------------


def _user_data(spec: str) -> Any:
    """Calls ``--dataset package.module:function`` (no arguments)."""
    from jaxnet.models import resolve_factory

    fn = resolve_factory(spec, flag="--dataset")
    try:
        return fn()
    except Exception as exc:  # the user's code, in one line
        text = str(exc).strip().splitlines()
        first = f": {text[0]}" if text else ""
        raise ConfigError(f"--dataset {spec}: calling it raised {type(exc).__name__}{first}") from None


def _load_data(args: argparse.Namespace, name: str, normalize: bool) -> Any:
    """The training data in a form fit takes: a jaxnet data set, or what a user function returned."""
    from jaxnet import data
    from jaxnet.data.dataset import ArrayDataset
    from jaxnet.data.registry import TFDS_PREFIX

    if ":" in name and not name.startswith(TFDS_PREFIX):
        value = _user_data(name)
    else:
        value = data.load_dataset(name, data_dir=args.data_dir, download=not args.no_download)
    if isinstance(value, ArrayDataset) and not normalize and value.num_classes:  # ToTensor only: x / 255
        channels = len(value.mean)
        value = dataclasses.replace(value, mean=(0.0,) * channels, std=(1.0,) * channels)
    return value


def _create_optimizer(
    args: argparse.Namespace, recipe: Any, steps_per_epoch: int | None, epochs: int
) -> tuple[Any, dict[str, Any]]:
    """The optax transform of the flags over the recipe, and its settings for the run config."""
    from jaxnet import optim

    s = {
        "optimizer": args.optimizer or recipe.optimizer,
        "lr": recipe.lr if args.lr is None else args.lr,
        "schedule": args.schedule or recipe.schedule,
        "gamma": recipe.gamma if args.gamma is None else args.gamma,
        "step_size": args.step_size or recipe.step_size,
        "warmup_epochs": args.warmup_epochs,
        "momentum": recipe.momentum if args.momentum is None else args.momentum,
        "nesterov": bool(args.nesterov),
        "weight_decay": args.weight_decay,
        "clip_norm": args.clip_norm,
        "clip_value": args.clip_value,
        "grad_accum": args.grad_accum,
    }
    if steps_per_epoch is None and s["schedule"] != "constant":
        raise ConfigError(
            f"--schedule {s['schedule']} needs the steps per epoch, unknown for data given as "
            "batches; return arrays from --dataset, or use --schedule constant"
        )
    schedule = optim.create_schedule(
        s["schedule"],
        s["lr"],
        steps_per_epoch=steps_per_epoch or 1,
        epochs=epochs,
        step_size=s["step_size"],
        gamma=s["gamma"],
        warmup_epochs=s["warmup_epochs"],
    )
    opt_kwargs = {k: s[k] for k in ("weight_decay", "clip_norm", "clip_value") if s[k] is not None}
    if s["optimizer"] in ("sgd", "rmsprop"):
        opt_kwargs["momentum"] = s["momentum"]
    elif args.momentum is not None:
        raise ConfigError(f"--momentum applies to sgd and rmsprop, not {s['optimizer']}; drop it or pick one of those")
    if s["nesterov"]:
        opt_kwargs["nesterov"] = True
    tx = optim.create_optimizer(s["optimizer"], schedule, **opt_kwargs)
    if args.grad_accum > 1:
        from jaxnet.accumulation import with_grad_accumulation

        tx = with_grad_accumulation(tx, args.grad_accum)
    return tx, s


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``jaxnet train``; returns the summary."""
    import jax

    from jaxnet import models, train
    from jaxnet.data.inputs import as_fit_data
    from jaxnet.recipes import recipe_for

    if (args.checkpoint_every or args.resume or args.resume_or_start) and not args.workdir:
        raise ConfigError(
            "--checkpoint-every, --resume and --resume-or-start need --workdir W (where the checkpoints live)"
        )
    if args.resume and args.resume_or_start:
        raise ConfigError("give --resume or --resume-or-start, not both")
    if args.model not in models.MODELS:  # your own model
        if ":" not in args.model:
            models.resolve_factory(args.model)  # raises: the colon is missing
        if args.dataset is None:
            raise ConfigError(
                f"--model {args.model} is your own model, which has no tutorial data set: name its data "
                "with --dataset (mnist, cifar10, linear, tfds:NAME, or package.module:function)"
            )
    model = models.build_model(args.model, seed=args.seed, kwargs=args.model_kwargs)
    recipe = recipe_for(args.model)
    normalize = recipe.normalize if args.normalize is None else args.normalize
    dataset = args.dataset or recipe.dataset
    data = _load_data(args, dataset, normalize)
    epochs, batch_size = args.epochs or recipe.epochs, args.batch_size or recipe.batch_size
    # fit's own checks, before anything is compiled: sizes, the model against the data, the loss.
    fit_data = as_fit_data(data, validation_split=args.val_split, seed=args.seed)  # the holdout, once
    plan = train.plan_fit(
        model,
        fit_data,
        epochs=epochs,
        batch_size=batch_size,
        output=LOSSES.get(args.loss),
        callbacks=(),
        augment=args.augment,
        scan=args.scan,
        devices=args.devices,
        grad_accum=args.grad_accum,
    )
    tx, opt = _create_optimizer(args, recipe, plan.steps_per_epoch, epochs)
    sample = plan.sample_x  # (2, *input_shape)
    config = RunConfig(
        model=args.model,
        model_kwargs=dict(args.model_kwargs or {}),
        loss=LOSS_OF_OUTPUT[plan.output],
        output=plan.output,
        dataset=dataset,
        input_shape=list(sample.shape[1:]),
        input_dtype=sample.dtype.name,
        normalize=normalize,
        mean=None if plan.data.mean is None else list(plan.data.mean),
        std=None if plan.data.std is None else list(plan.data.std),
        augment=bool(args.augment),
        val_split=args.val_split,
        **opt,
        batch_size=batch_size,
        epochs=epochs,
        seed=args.seed,
        precision=args.precision,
        devices=args.devices or (jax.device_count() if jax.process_count() > 1 else 1),
        fsdp=bool(args.fsdp),
        scan=bool(args.scan),
    )
    result = train.fit(
        model,
        fit_data,
        tx,
        epochs=epochs,
        batch_size=batch_size,
        output=plan.output,
        seed=args.seed,
        augment=args.augment,
        scan=args.scan,
        eval_batch_size=args.eval_batch_size,
        workdir=args.workdir,
        checkpoint_every=args.checkpoint_every,
        resume="auto" if args.resume_or_start else args.resume,
        keep_checkpoints=args.keep_checkpoints,
        config=config.to_json(),
        devices=args.devices,
        fsdp=args.fsdp,
        precision=args.precision,
        progress=not args.no_progress,
        on_nan=args.on_nan,
    )
    summary = dict(result.summary)
    summary.update(
        model=args.model,
        dataset=dataset,
        loss=config.loss,
        normalize=normalize,
        seed=args.seed,
        **{k: opt[k] for k in ("optimizer", "lr", "schedule", "grad_accum")},
    )
    return summary


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """Prints ``jaxnet train``'s summary: a few lines, or one strict JSON object (``--json``)."""
    if as_json:  # strict JSON: a NaN or infinite number is null
        print(json.dumps(strict_json(summary), default=str, allow_nan=False))
        return
    print(f"model {summary['model']} on {summary['dataset']} ({summary['dataset_source']})")
    print(
        f"{summary['epochs']} epochs, {summary['steps']} steps in {summary['train_seconds']:.1f} s "
        f"({summary['compilations']} compilations, {summary['steady_state_compilations']} after epoch 1)"
    )
    if summary.get("checkpoint_seconds"):
        share = summary["checkpoint_seconds"] / max(summary["train_seconds"], 1e-9)
        print(
            f"checkpoints: the training loop waited {summary['checkpoint_seconds']:.2f} s for saves "
            f"({100 * share:.1f}% of its time)"
        )
    shown = False
    for split, name in (("val", "validation"), ("test", "test")):
        if summary.get(f"{split}_accuracy") is not None:
            print(f"{name} accuracy: {100 * summary[f'{split}_accuracy']:.2f}%")
        elif summary.get(f"{split}_loss") is not None:
            print(f"{name} loss ({summary.get('loss', 'mse')}): {summary[f'{split}_loss']:.6f}")
        else:
            continue
        shown = True
    if not shown:
        print("no validation or test split was evaluated (pass --val-split, or return a test split from --dataset)")
