"""``jaxnet train --model cifar_speed``: airbench94's recipe, run by :func:`jaxnet.speedrun.train_speedrun`.

The speedrun net trains with what ``fit`` does not do: its whitening layer
set from the training images, Nesterov SGD by parameter group on a
triangle schedule, lookahead every few steps, and test-time augmentation
(:class:`jaxnet.speedrun.SpeedrunRecipe`). So this command maps onto the
recipe the flags that mean the same there (``--epochs``, ``--batch-size``,
``--eval-batch-size``, ``--precision``, ``--seed``, ``--tta``, and
``--model-kwargs '{"widths": [...]}'``) and refuses, by name and with the
reason, every other flag that was given, rather than ignore it. A flag
counts as given when its value differs from the parser's default
(:func:`jaxnet.cli.train_args.train_defaults`), whether it came from the
command line or from a ``--config`` file.

``--workdir W`` keeps the trained model where ``jaxnet export --workdir W``
looks for a ``fit`` run's: ``W/config.json`` (the recipe, and the input
``mean``/``std`` an export rebuilds the preprocessing from), one
checkpoint of the final state, and ``W/model/``, the lowered forward
function. The run cannot be resumed, so ``W`` must not hold a run yet.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxnet.cli.train import load_data
from jaxnet.cli.train_args import flag_names, train_defaults
from jaxnet.errors import ConfigError, TrainingDiverged

if TYPE_CHECKING:  # jax and flax are imported when a run starts, not with the parser
    from jaxnet.data.dataset import ArrayDataset
    from jaxnet.speedrun import SpeedrunRecipe, SpeedrunResult

SPEEDRUN_MODEL = "cifar_speed"
INPUT_SHAPE = (32, 32, 3)  # CIFAR-10's images, uint8, channels last
BEST_METRIC = "test_accuracy"  # what W/config.json names for 'jaxnet export --step best'

# The flags the speedrun takes: mapped onto the recipe, or saying where the data is and how the run
# is shown and kept.
TAKEN_FLAGS = (
    "config",
    "model",
    "model_kwargs",
    "dataset",
    "data_dir",
    "no_download",
    "epochs",
    "batch_size",
    "eval_batch_size",
    "precision",
    "seed",
    "tta",
    "workdir",
    "json",
    "no_progress",
)
# Why each other flag does not apply: (reason, flags). A flag in none of these is refused too.
REFUSED_FLAGS = (
    (
        "the recipe fixes its optimizer and schedule (Nesterov SGD by parameter group on a triangle "
        "schedule, with lookahead)",
        (
            "optimizer",
            "momentum",
            "nesterov",
            "weight_decay",
            "schedule",
            "gamma",
            "step_size",
            "warmup_epochs",
            "clip_norm",
            "clip_value",
            "grad_accum",
        ),
    ),
    (
        "the recipe fixes its learning rate, SpeedrunRecipe.lr = 11.5 per 1024 examples, decoupled "
        "from the momentum (in PyTorch's units 0.0015 for most weights and 64x that for BatchNorm "
        "biases); change it from Python with SpeedrunRecipe(lr=...)",
        ("lr",),
    ),
    ("the recipe fixes its loss (label-smoothed cross entropy, summed over the batch)", ("loss",)),
    (
        "the recipe fixes its preprocessing (airbench's mean and std; alternating flips and 2-pixel "
        "translations, on the device)",
        ("normalize", "augment"),
    ),
    ("the recipe trains on the whole training split and reports the test split", ("val_split",)),
    ("the recipe runs its own loop of compiled steps, on one device", ("scan", "devices", "fsdp")),
    (
        "a cifar_speed run cannot be resumed (--workdir keeps one checkpoint, of the final state)",
        ("resume", "resume_or_start", "checkpoint_every", "keep_checkpoints"),
    ),
    (
        "the recipe's loop does not watch the loss step by step (a NaN fails the run at its end, nothing saved)",
        ("on_nan",),
    ),
)


def run_speedrun(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``jaxnet train --model cifar_speed``; returns the summary :func:`jaxnet.cli.train.print_summary` prints."""
    import jax

    from jaxnet.compilation import CompileCounter
    from jaxnet.speedrun import train_speedrun

    recipe = speedrun_recipe(args)
    if jax.process_count() > 1:
        raise ConfigError(f"--model {SPEEDRUN_MODEL} trains in one process on one device; run it without jaxnet launch")
    data = load_data(args, "cifar10", normalize=True)  # uint8: the recipe normalizes on the device
    with _fresh_workdir(args.workdir):
        with CompileCounter() as counter:
            result = train_speedrun(data, recipe=recipe, seed=args.seed, progress=not args.no_progress)
        _check_finite(result.losses)
        if args.workdir is not None:
            _save_run(args.workdir, run_config(args, recipe), result, recipe)
    return _summary(args, data, recipe, result, counter.compiles)


def speedrun_recipe(args: argparse.Namespace) -> SpeedrunRecipe:
    """The :class:`~jaxnet.speedrun.SpeedrunRecipe` of the flags, after refusing those that do not apply.

    Raises:
        ConfigError: a flag of another recipe, a data set other than
            CIFAR-10, ``--precision fp16``, or ``--model-kwargs`` other than ``widths``.
    """
    from jaxnet.speedrun import SpeedrunRecipe

    _refuse_other_flags(args)
    if args.dataset not in (None, "cifar10"):
        raise ConfigError(
            f"--model {SPEEDRUN_MODEL} trains on CIFAR-10 (its whitening and statistics are CIFAR-10's), "
            f"not --dataset {args.dataset}; drop --dataset or pass --dataset cifar10"
        )
    if args.precision not in ("fp32", "bf16"):
        raise ConfigError(
            f"--precision {args.precision} does not apply to --model {SPEEDRUN_MODEL}: its recipe computes "
            "in fp32 or bf16 (it has no loss scaling for fp16); pass one of those"
        )
    default = SpeedrunRecipe()
    return dataclasses.replace(
        default,
        epochs=default.epochs if args.epochs is None else float(args.epochs),
        batch_size=args.batch_size or default.batch_size,
        eval_batch_size=args.eval_batch_size,
        precision=args.precision,
        tta_level=default.tta_level if args.tta is None else args.tta,
        widths=_widths(args.model_kwargs, default.widths),
    )


def _refuse_other_flags(args: argparse.Namespace) -> None:
    """One line naming every given flag the recipe has no use for, grouped by why."""
    defaults = train_defaults()
    given = [d for d in defaults if d not in TAKEN_FLAGS and getattr(args, d, defaults[d]) != defaults[d]]
    if not given:
        return
    reasons = [(why, [d for d in given if d in dests]) for why, dests in REFUSED_FLAGS]
    known = {d for _, dests in REFUSED_FLAGS for d in dests}
    reasons.append(("the recipe has no such setting", [d for d in given if d not in known]))
    raise ConfigError(
        f"--model {SPEEDRUN_MODEL} trains with its own recipe (jaxnet.speedrun.SpeedrunRecipe): "
        + "; ".join(f"{why}, so drop {flag_names(dests)}" for why, dests in reasons if dests)
    )


def _widths(model_kwargs: dict[str, Any] | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """``SpeedrunRecipe.widths`` from ``--model-kwargs '{"widths": [64, 256, 256]}'``, checked."""
    if not model_kwargs:
        return default
    other = sorted(set(model_kwargs) - {"widths"})
    if other:
        raise ConfigError(
            f"--model-kwargs of --model {SPEEDRUN_MODEL} takes only widths (the channels of its three conv "
            f'groups, e.g. {{"widths": [64, 256, 256]}}); drop {", ".join(other)}'
        )
    widths = model_kwargs["widths"]
    if not (
        isinstance(widths, list)
        and len(widths) == 3
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
    ):
        raise ConfigError(f"--model-kwargs widths must be three positive integers, e.g. [64, 256, 256]; got {widths!r}")
    return (widths[0], widths[1], widths[2])


def _check_finite(losses: list[float]) -> None:
    """A NaN or infinite loss fails the run, as ``--on-nan stop`` does for ``fit``; nothing is saved."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses, np.float64)))
    if bad.size:
        raise TrainingDiverged(int(bad[0]) + 1, float(losses[bad[0]]), None)


# ---------------------------------------------------------------------------
# The workdir: config.json, the final state's checkpoint, the model for jaxnet export
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_workdir(workdir: str | None) -> Iterator[None]:
    """Holds ``workdir``'s lock for the run, after checking that it holds no run yet (nothing to do without one)."""
    if workdir is None:
        yield
        return
    from jaxnet import checkpoint
    from jaxnet.checkpoint import workdir as workdir_lib
    from jaxnet.checkpoint.lock import WorkdirLock

    with WorkdirLock(workdir):
        if os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG_FILE)) or workdir_lib.has_checkpoint(workdir):
            raise ConfigError(
                f"the workdir {workdir} already holds a run, and a {SPEEDRUN_MODEL} run cannot continue one; "
                "choose another --workdir"
            )
        checkpoint.probe_writable(workdir_lib.checkpoint_directory(workdir))  # before hours of training
        yield


def run_config(args: argparse.Namespace, recipe: SpeedrunRecipe) -> dict[str, Any]:
    """``W/config.json``: the recipe, and what ``jaxnet export`` reads (model, input, output, statistics)."""
    return {
        "model": SPEEDRUN_MODEL,
        "model_kwargs": dict(args.model_kwargs or {}),
        "trainer": "jaxnet.speedrun.train_speedrun",
        "recipe": dataclasses.asdict(recipe),
        "dataset": "cifar10",
        "loss": "cross_entropy",
        "output": "logits",
        "input_shape": list(INPUT_SHAPE),
        "input_dtype": "uint8",
        "mean": list(recipe.mean),
        "std": list(recipe.std),
        "seed": args.seed,
        "best_metric": BEST_METRIC,
        "best_mode": "max",
    }


def _save_run(workdir: str, config: dict[str, Any], result: SpeedrunResult, recipe: SpeedrunRecipe) -> None:
    """Records the run in ``workdir``: its config, a checkpoint of the final state, and ``W/model/``."""
    from jaxnet import checkpoint
    from jaxnet.checkpoint import workdir as workdir_lib
    from jaxnet.data.transforms import make_image_transform
    from jaxnet.export import write_workdir_model

    workdir_lib.check_workdir(workdir, config, resume=False)
    ckpt = checkpoint.create_checkpoint_manager(
        workdir_lib.checkpoint_directory(workdir), max_to_keep=1, best_metric=BEST_METRIC
    )
    try:
        metrics = {BEST_METRIC: result.tta_accuracy, "test_accuracy_no_tta": result.accuracy}
        checkpoint.save(ckpt, result.steps, result.state, meta={"config": config}, metrics=metrics)
    finally:
        checkpoint.close(ckpt)  # waits for the save
    write_workdir_model(
        workdir,
        result.graphdef,
        result.state.params,
        result.state.model_state,
        input_shape=INPUT_SHAPE,
        input_dtype="uint8",
        transform=make_image_transform(recipe.mean, recipe.std),
        output="logits",
    )


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------


def _summary(
    args: argparse.Namespace, data: ArrayDataset, recipe: SpeedrunRecipe, result: SpeedrunResult, compilations: int
) -> dict[str, Any]:
    """The run's numbers, with the keys a ``fit`` summary shares (``test_accuracy`` is the TTA one, the recipe's)."""
    from jaxnet.checkpoint import params_sha256
    from jaxnet.state import count_params

    steps_per_epoch = data.num_train // recipe.batch_size
    epoch_losses = [
        float(np.mean(result.losses[i : i + steps_per_epoch])) for i in range(0, len(result.losses), steps_per_epoch)
    ]
    return {
        "model": SPEEDRUN_MODEL,
        "trainer": "jaxnet.speedrun.train_speedrun",
        "dataset": "cifar10",
        "dataset_source": data.source,
        "epochs": recipe.epochs,
        "steps": result.steps,
        "batch_size": recipe.batch_size,
        "widths": list(recipe.widths),
        "output": "logits",
        "params": count_params(result.state.params),
        "params_sha256": params_sha256(result.state.params),
        "train_seconds": round(result.train_seconds, 3),
        "tta_seconds": round(result.tta_seconds, 3),
        "num_devices": 1,
        "precision": recipe.precision,
        "compilations": compilations,
        "seed": args.seed,
        "tta_level": recipe.tta_level,
        "test_accuracy": result.tta_accuracy,
        "test_accuracy_no_tta": result.accuracy,
        "epoch_losses": epoch_losses,  # mean loss per example over each epoch's steps
        "final_loss": epoch_losses[-1],
    }
