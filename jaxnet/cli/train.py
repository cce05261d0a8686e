"""``jaxnet train``: the parser, the run its flags describe, and the summary it prints.

Trains a tutorial model or your own (``--model package.module:factory``) on
a named data set or your own (``--dataset package.module:function``). A
setting comes from the model's recipe, then a ``--config`` TOML file, then
the command line (:mod:`jaxnet.cli.runconfig`); the resolved settings,
:class:`~jaxnet.cli.runconfig.RunConfig`, are what ``fit`` records in the
workdir and what ``--resume`` checks. The flags themselves are
:mod:`jaxnet.cli.train_args`; ``--model cifar_speed``, which trains with
its own loop rather than ``fit``, is :mod:`jaxnet.cli.speedrun`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from jaxnet.cli.converters import add_command
from jaxnet.cli.runconfig import RunConfig, read_config_file
from jaxnet.cli.train_args import OPERATIONAL_FLAGS, add_train_args, epilog
from jaxnet.errors import ConfigError
from jaxnet.outputs import LOSS_OF_OUTPUT, LOSSES

__all__ = ["OPERATIONAL_FLAGS", "parse_train_args", "print_summary", "register_cli", "run_train", "strict_json"]


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
        epilog=epilog(RESUMABLE_KEYS),
    )
    add_train_args(p, RESUMABLE_KEYS)
    p.set_defaults(func=run_train)
    return p


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` subcommand's parser inside :func:`jaxnet.cli.build_parser`'s."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    train_parser: argparse.ArgumentParser = sub.choices["train"]
    return train_parser


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


def load_data(args: argparse.Namespace, name: str, normalize: bool) -> Any:
    """The training data in a form fit takes: a jaxnet data set, or what a user function returned.

    A named data set is :func:`jaxnet.data.load_dataset`'s ``ArrayDataset``
    (uint8 images), its statistics zeroed for ``normalize=False`` (ToTensor only).
    """
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


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """The run the flags describe over the model's recipe, before anything is compiled."""

    model: Any  # the nnx.Module to train
    recipe: Any  # jaxnet.recipes.Recipe
    dataset: str  # the data set's name (or package.module:function)
    normalize: bool
    fit_data: Any  # jaxnet.data.inputs.FitData, the validation holdout taken once
    epochs: int
    batch_size: int


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``jaxnet train``; returns the summary."""
    from jaxnet.cli import speedrun

    if args.model == speedrun.SPEEDRUN_MODEL:  # its own loop, not fit's
        return speedrun.run_speedrun(args)
    if args.tta is not None:
        raise ConfigError(
            f"--tta applies to --model {speedrun.SPEEDRUN_MODEL} only (its recipe's test-time augmentation); drop it"
        )
    _check_run_flags(args)
    run = _resolve(args)
    plan = _plan(args, run)
    tx, opt = _create_optimizer(args, run.recipe, plan.steps_per_epoch, run.epochs)
    config = _run_config(args, run, plan, opt)
    result = _fit(args, run, plan, tx, config)
    summary = dict(result.summary)
    summary.update(
        model=args.model,
        dataset=run.dataset,
        loss=config.loss,
        normalize=run.normalize,
        seed=args.seed,
        **{k: opt[k] for k in ("optimizer", "lr", "schedule", "grad_accum")},
    )
    return summary


def _check_run_flags(args: argparse.Namespace) -> None:
    """The flags that need one another, and your own model's data set."""
    from jaxnet import models

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


def _resolve(args: argparse.Namespace) -> _Resolved:
    """The model, its recipe under the flags, and the data (loaded, its validation split held out)."""
    from jaxnet import models
    from jaxnet.data.inputs import as_fit_data
    from jaxnet.recipes import recipe_for

    model = models.build_model(args.model, seed=args.seed, kwargs=args.model_kwargs)
    recipe = recipe_for(args.model)
    normalize = recipe.normalize if args.normalize is None else args.normalize
    dataset = args.dataset or recipe.dataset
    data = load_data(args, dataset, normalize)
    fit_data = as_fit_data(data, validation_split=args.val_split, seed=args.seed)  # the holdout, once
    return _Resolved(
        model, recipe, dataset, normalize, fit_data, args.epochs or recipe.epochs, args.batch_size or recipe.batch_size
    )


def _plan(args: argparse.Namespace, run: _Resolved) -> Any:
    """fit's own checks, before anything is compiled: sizes, the model against the data, the loss."""
    from jaxnet import train

    return train.plan_fit(
        run.model,
        run.fit_data,
        epochs=run.epochs,
        batch_size=run.batch_size,
        output=LOSSES.get(args.loss),
        callbacks=(),
        augment=args.augment,
        scan=args.scan,
        devices=args.devices,
        grad_accum=args.grad_accum,
    )


def _run_config(args: argparse.Namespace, run: _Resolved, plan: Any, opt: dict[str, Any]) -> RunConfig:
    """Every setting of the run, as ``W/config.json`` records it and ``--resume`` compares it."""
    import jax

    sample = plan.sample_x  # (2, *input_shape)
    return RunConfig(
        model=args.model,
        model_kwargs=dict(args.model_kwargs or {}),
        loss=LOSS_OF_OUTPUT[plan.output],
        output=plan.output,
        dataset=run.dataset,
        input_shape=list(sample.shape[1:]),
        input_dtype=sample.dtype.name,
        normalize=run.normalize,
        mean=None if plan.data.mean is None else list(plan.data.mean),
        std=None if plan.data.std is None else list(plan.data.std),
        augment=bool(args.augment),
        val_split=args.val_split,
        **opt,
        batch_size=run.batch_size,
        epochs=run.epochs,
        seed=args.seed,
        precision=args.precision,
        devices=args.devices or (jax.device_count() if jax.process_count() > 1 else 1),
        fsdp=bool(args.fsdp),
        scan=bool(args.scan),
    )


def _fit(args: argparse.Namespace, run: _Resolved, plan: Any, tx: Any, config: RunConfig) -> Any:
    """:func:`jaxnet.train.fit` with the resolved run and the flags that watch and save it."""
    from jaxnet import train

    return train.fit(
        run.model,
        run.fit_data,
        tx,
        epochs=run.epochs,
        batch_size=run.batch_size,
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
    """Prints ``jaxnet train``'s summary: a few lines, or one strict JSON object (``--json``).

    A ``fit`` run's summary, or a ``--model cifar_speed`` one (which has
    ``tta_seconds`` and ``test_accuracy_no_tta`` in place of compilation counts).
    """
    if as_json:  # strict JSON: a NaN or infinite number is null
        print(json.dumps(strict_json(summary), default=str, allow_nan=False))
        return
    print(f"model {summary['model']} on {summary['dataset']} ({summary['dataset_source']})")
    print(_timing_line(summary))
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
    if summary.get("test_accuracy_no_tta") is not None:
        print(f"test accuracy without TTA: {100 * summary['test_accuracy_no_tta']:.2f}%")
    if not shown:
        print("no validation or test split was evaluated (pass --val-split, or return a test split from --dataset)")


def _timing_line(summary: dict[str, Any]) -> str:
    """``E epochs, S steps in T s (...)``: compilations for a fit run, the TTA evaluation for a speedrun."""
    head = f"{summary['epochs']} epochs, {summary['steps']} steps in {summary['train_seconds']:.1f} s"
    if "tta_seconds" in summary:
        return f"{head} (+ {summary['tta_seconds']:.1f} s for the TTA level {summary['tta_level']} evaluation)"
    return f"{head} ({summary['compilations']} compilations, {summary['steady_state_compilations']} after epoch 1)"
