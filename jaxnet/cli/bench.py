"""``jaxnet bench``: the command line of the benchmark suite (:mod:`jaxnet.bench`).

``register_cli(subparsers)`` adds the ``bench`` subcommand to ``jaxnet``'s
parser; ``python -m jaxnet.bench bench ...`` runs the same command on its own
(:func:`main`). Also importable as ``jaxnet.bench.cli``, its place before the
CLI became a package. The harness is imported inside the functions, when the
command runs: ``jaxnet.bench`` re-exports names of this module, so importing
it here at the top would be circular.

On a machine where PyTorch and JAX both see a CUDA GPU, both frameworks run
there (``--device auto``, the default; ``--device cpu`` keeps them on the
processor, ``--device cuda`` insists on the GPU and says what is missing).

Examples::

    jaxnet bench                                   # tutorial models, each device's default variants
    jaxnet bench --model mlp --batch-size 64,512 --variants torch-eager,jax-jit --steps 50 --repeats 5
    jaxnet bench --quick --json                    # CI: one small model, few steps
    jaxnet bench --time-to-accuracy --data-dir DIR
    jaxnet bench --model cifar_speed --tta --data-dir DIR   # time to 94% for the CIFAR-10 speedrun, both sides
    jaxnet bench --full --out docs/                # the published run (docs/static_vs_dynamic.md)
    jaxnet bench --model cifar_speed --batch-size 512 --device cuda   # airbench94's step, GPU
    jaxnet bench --model mlp --variants torch-eager,torch-bf16,jax-jit,jax-jit-bf16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from jaxnet.cli.converters import add_command, name_list, positive_float, positive_int, positive_int_list
from jaxnet.errors import ConfigError, JaxnetError

__all__ = ["build_workloads", "main", "register_cli", "run_bench"]


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``bench`` to ``jaxnet``'s subcommands; its ``func`` is :func:`run_bench`.

    Args:
        subparsers: the result of ``parser.add_subparsers()``.

    Returns:
        The ``bench`` parser.
    """
    p = add_command(
        subparsers,
        "bench",
        help="measure PyTorch eager / torch.compile vs jaxnet jit / scan on the tutorial models, CPU or GPU",
        description=(
            "Train the same model from the same weights on the same batches with PyTorch eager "
            "(with and without flushing denormals), torch.compile (default and max-autotune), "
            "eager bf16 autocast, jaxnet's jit-compiled step (float32 and bf16) and its whole-epoch "
            "lax.scan; report steps/s (median, min, max of interleaved repeats), first-step latency "
            "with a cold and a warm compilation cache, GFLOP/s and share of the CPU's peak, peak "
            "memory, compile counts and whether the losses agree. Both frameworks run on one device: "
            "the CPU, or a CUDA GPU when PyTorch and JAX both see one (--device). On a GPU every "
            "timed PyTorch repeat ends with torch.cuda.synchronize(), the machine section names the "
            "GPU, GFLOP/s are reported without a share of peak, and the default variants are the "
            "GPU's (no flush-denormal variant: that is a CPU setting). --model cifar_speed times "
            "airbench94's net with its own recipe step in both frameworks."
        ),
    )
    _add_run_args(p)
    _add_tta_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_bench)
    return p


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What is measured: models, batch sizes, device, variants, steps, repeats, threads."""
    from jaxnet.bench.workload import CPU_VARIANTS, CUDA_VARIANTS, VARIANTS

    p.add_argument(
        "--model", type=name_list, default=None, help="comma-separated model names (default: every tutorial model)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int_list,
        default=None,
        help="comma-separated batch sizes (default: each model's tutorial batch size; for cifar_speed's "
        "--tta, the recipe's 1024, and a smaller batch runs the same per-example schedule in more steps)",
    )
    p.add_argument(
        "--variants",
        type=name_list,
        default=None,
        help=f"comma-separated variants, of {', '.join(VARIANTS)} (default on the CPU: "
        f"{', '.join(CPU_VARIANTS)}; on a GPU: {', '.join(CUDA_VARIANTS)}; cifar_speed has no jax-scan)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where both frameworks run: auto (default) is cuda when torch.cuda.is_available() and "
        "jax.devices('gpu') both find a GPU, else cpu; cuda refuses to run without both "
        '(JAX: pip install "jaxnet[cuda12]"; PyTorch: a CUDA build of torch==2.13.0)',
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="steps per timed repeat, also the jax-scan length (default: per model, ~1 s)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed, interleaved repeats per variant")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads on the CPU (default: the cores XLA uses; not applied on a GPU)",
    )
    p.add_argument(
        "--no-probe", action="store_true", help="skip the first-step and memory measurements (fresh subprocesses)"
    )
    p.add_argument("--quick", action="store_true", help="CI mode: mlp128, batch 32, 20 steps per repeat")
    p.add_argument(
        "--full", action="store_true", help="every model and batch size of the published run, plus time to accuracy"
    )


def _add_tta_args(p: argparse.ArgumentParser) -> None:
    """Time to accuracy: MNIST models against their targets, cifar_speed to 94% with TTA."""
    p.add_argument(
        "--time-to-accuracy",
        "--tta",
        dest="time_to_accuracy",
        action="store_true",
        help="only measure wall time to accuracy: 98%% (mlp) / 99%% (convnet) on MNIST, and for cifar_speed "
        "94%% on CIFAR-10 with test-time augmentation (its whole recipe, once per variant, on --device)",
    )
    p.add_argument(
        "--tta-models",
        type=name_list,
        default=None,
        help="models for time to accuracy (default: --model's if given, else mlp,convnet)",
    )
    p.add_argument(
        "--tta-variants",
        type=name_list,
        default=None,
        help="variants for time to accuracy (default: torch-eager, torch-eager-ftz and jax-jit "
        "for mlp; torch-eager and jax-jit for convnet and, on the CPU, cifar_speed; on a GPU cifar_speed "
        "runs jax-jit, jax-jit-bf16, torch-eager, torch-compile and torch-bf16)",
    )
    p.add_argument(
        "--tta-max-seconds",
        type=positive_float,
        default=150.0,
        help="give up on a time-to-accuracy run after this much training time (MNIST models; the "
        "speedrun's schedule needs its whole length)",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder holding mnist/ and cifar10/ (default: $JAXNET_DATA_DIR, cache)"
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Where the results go and how they are printed."""
    p.add_argument("--out", default=None, help="write bench.json, bench.md, PNG charts and static_vs_dynamic.md here")
    p.add_argument(
        "--render",
        default=None,
        metavar="BENCH_JSON",
        help="measure nothing: rewrite the table, charts and page of --out from an earlier bench.json",
    )
    p.add_argument("--fma-units", type=positive_int, default=2, help="FMA units per core, for the CPU's peak FLOP/s")
    p.add_argument("--json", action="store_true", help="end with the whole result as one JSON line")


def build_workloads(args: argparse.Namespace) -> list[Any]:
    """The workloads selected by ``--quick``/``--full``/``--model``/``--batch-size``/``--steps``.

    Raises:
        ConfigError: unknown model names.
    """
    from jaxnet.bench.workload import DEFAULT_PLAN, FULL_PLAN, QUICK_PLAN, default_steps, make_workload, model_info
    from jaxnet.recipes import RECIPES

    if args.model:
        for name in args.model:
            model_info(name)  # raises on unknown names
        pairs = [(m, b) for m in args.model for b in (args.batch_size or [RECIPES[m].batch_size])]
    else:
        base = QUICK_PLAN if args.quick else FULL_PLAN if args.full else DEFAULT_PLAN
        if args.batch_size:  # --batch-size alone: each model of the plan once per given size
            base = tuple(dict.fromkeys((m, b) for m, _ in base for b in args.batch_size))
        pairs = list(base)
    return [make_workload(m, b, args.steps or default_steps(m, b)) for m, b in pairs]


def _command() -> str:
    """The command line that started this run, as a user would type it."""
    script = sys.argv[0].replace(os.sep, "/")
    rest = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if script.endswith("benchmarks/run.py"):
        return f"python -m benchmarks.run {rest}".strip()
    if script.endswith("jaxnet/bench/__main__.py"):
        return f"python -m jaxnet.bench {rest}"
    if script.endswith("/jaxnet") or script.endswith("jaxnet/__main__.py"):
        return f"jaxnet {rest}"
    return " ".join(shlex.quote(a) for a in sys.argv)


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" + uncommitted changes" if dirty else "")


def _check_variants(variants: Sequence[str] | None, what: str) -> None:
    """Refuses unknown names, and PyTorch variants without torch (None: the defaults, which have them)."""
    from jaxnet.bench.workload import TORCH_VARIANTS, VARIANTS

    unknown = [v for v in variants or () if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; choose from {', '.join(VARIANTS)}")
    if variants is None or any(v in TORCH_VARIANTS for v in variants):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the PyTorch variants need torch: pip install 'jaxnet[torch]' (torch==2.13.0), "
                "or pass --variants jax-jit,jax-scan"
            ) from None


def _select_device(args: argparse.Namespace, workloads: Sequence[Any]) -> str:
    """``--device`` resolved (:func:`jaxnet.bench.machine.select_device`), every workload's variants checked on it.

    PyTorch is asked about CUDA only where a PyTorch variant runs. Before
    JAX's backend starts, JAX is told to allocate GPU memory on demand, so
    that both frameworks fit on one GPU.

    Raises:
        ConfigError: ``--device cuda`` where a side has no GPU, or variants
            that a workload's model or the device cannot run.
    """
    from jaxnet.bench import machine
    from jaxnet.bench.workload import TORCH_VARIANTS, check_variants, default_variants

    if args.device != "cpu":
        machine.share_gpu_memory()
    torch_side = args.variants is None or any(v in TORCH_VARIANTS for v in args.variants)
    device = machine.select_device(args.device, torch_side=torch_side)
    for w in workloads:
        check_variants(args.variants or default_variants(w.model, device), w.model, device)
    return device


def run_bench(args: argparse.Namespace) -> None:
    """Runs ``jaxnet bench``; prints the Markdown table (and the JSON line with ``--json``)."""
    from jaxnet.bench import machine
    from jaxnet.bench.suite import run_suite

    log = logging.getLogger("jaxnet.bench")
    if args.render:
        _render(args, log)
        return
    start = time.perf_counter()
    _check_variants(args.variants, "variants")
    tta_only = args.time_to_accuracy and not args.full
    workloads = [] if tta_only else build_workloads(args)
    speedrun_tta = (args.time_to_accuracy or args.full) and SPEEDRUN_MODEL in _tta_models(args)
    # time to accuracy alone runs on the CPU, but for the speedrun, which runs where --device says
    device = _select_device(args, workloads) if workloads or speedrun_tta else "cpu"
    log.info("device: %s (--device %s)", device, args.device)
    threads = args.threads or machine.usable_cores()
    with machine.on_device(device):
        result = run_suite(
            workloads,
            args.variants,
            device=device,
            repeats=args.repeats,
            threads=threads,
            probes=not args.no_probe,
            fma_units=args.fma_units,
            log=log.info,
        )
    if args.time_to_accuracy or args.full:
        models = _tta_models(args)
        mnist_models = [m for m in models if m != SPEEDRUN_MODEL]
        if device != "cpu" and mnist_models:
            log.info(
                "time to accuracy for %s runs on the CPU (jaxnet.bench.accuracy trains PyTorch on the CPU)",
                mnist_models,
            )
        with machine.on_the_cpu():
            result["time_to_accuracy"] = _run_tta(args, mnist_models, threads, log) if mnist_models else []
        if SPEEDRUN_MODEL in models:
            with machine.on_device(device):
                result["time_to_accuracy"] += _run_speedrun_tta(args, device, threads, log)
    result["config"]["suite_seconds"] = result["config"].pop("wall_seconds")
    result["config"]["wall_seconds"] = round(time.perf_counter() - start, 1)  # suite + time to accuracy
    result["config"]["command"] = _command()
    result["config"]["commit"] = _git_commit()
    result["machine"]["load_average_end"] = machine.load_average()
    _publish(result, args, log)


def _publish(result: dict[str, Any], args: argparse.Namespace, log: logging.Logger) -> None:
    """Validates ``result``; writes the outputs to ``--out``; prints the table (and JSON line)."""
    from jaxnet.bench import report
    from jaxnet.bench.page import write_page

    errors = report.validate(result)
    if errors:
        raise JaxnetError("the benchmark result does not match its schema: " + "; ".join(errors[:5]))
    if args.out:
        written = report.write_outputs(result, args.out)
        written.append(write_page(result, args.out, [p.name for p in written if p.suffix == ".png"]))
        log.info("wrote %s", ", ".join(str(p) for p in written))
    print(report.markdown_tables(result), end="")
    if args.json:
        print(json.dumps(result))


def _render(args: argparse.Namespace, log: logging.Logger) -> None:
    """``--render FILE``: the outputs of an earlier run, from its ``bench.json``, without measuring."""
    try:
        with open(args.render, encoding="utf-8") as f:
            result = json.load(f)
    except json.JSONDecodeError as exc:
        raise JaxnetError(f"{args.render} is not a bench.json written by `jaxnet bench --out`: {exc}") from None
    _publish(result, args, log)


SPEEDRUN_MODEL = "cifar_speed"  # its time to accuracy is jaxnet.bench.speedrun_accuracy's


def _tta_models(args: argparse.Namespace) -> list[str]:
    """``--tta-models``, else ``--model``'s models with ``--tta`` alone, else mlp and convnet."""
    if args.tta_models:
        return list(args.tta_models)
    if args.model and args.time_to_accuracy and not args.full:
        return list(args.model)
    return ["mlp", "convnet"]


def _log_tta(log: logging.Logger, res: dict[str, Any]) -> None:
    log.info(
        "  %s",
        f"reached {100 * res['target']:.0f}% after {res['seconds']:.1f} s"
        if res["reached"]
        else f"best {100 * res['final_accuracy']:.2f}% (not reached)",
    )


def _run_speedrun_tta(args: argparse.Namespace, device: str, threads: int, log: logging.Logger) -> list[dict[str, Any]]:
    """Time to 94% for cifar_speed: its whole recipe once per variant, on ``device``."""
    from jaxnet.bench.speedrun_accuracy import SPEEDRUN_VARIANTS, speedrun_time_to_accuracy
    from jaxnet.data import load_dataset
    from jaxnet.speedrun import SpeedrunRecipe

    default = (
        ("jax-jit", "torch-eager")
        if device == "cpu"
        else ("jax-jit", "jax-jit-bf16", "torch-eager", "torch-compile", "torch-bf16")
    )
    variants = args.tta_variants or default
    bad = [v for v in variants if v not in SPEEDRUN_VARIANTS]
    if bad:
        raise ConfigError(f"time to accuracy for cifar_speed runs {', '.join(SPEEDRUN_VARIANTS)}; not {bad}")
    _check_variants(variants, "time-to-accuracy variants")
    data = load_dataset("cifar10", data_dir=args.data_dir, download=False)
    if data.num_train < 50000:
        log.warning("time to accuracy on %s: not the full CIFAR-10; pass --data-dir", data.source)
    out = []
    for batch_size in args.batch_size or [SpeedrunRecipe.batch_size]:  # the recipe's rates are per example
        recipe = SpeedrunRecipe(batch_size=batch_size)
        for variant in variants:
            log.info(
                "time to accuracy: cifar_speed, %s, batch %d, on %s (the whole recipe)", variant, batch_size, device
            )
            res = speedrun_time_to_accuracy(data, variant, recipe=recipe, device=device, threads=threads)
            _log_tta(log, res)
            out.append(res)
    return out


def _run_tta(
    args: argparse.Namespace, models: Sequence[str], threads: int, log: logging.Logger
) -> list[dict[str, Any]]:
    from jaxnet.bench.accuracy import TTA_DEFAULT_VARIANTS, TTA_VARIANTS, time_to_accuracy
    from jaxnet.data import load_dataset

    plan = {name: args.tta_variants or TTA_DEFAULT_VARIANTS.get(name, TTA_VARIANTS) for name in models}
    bad = sorted({v for vs in plan.values() for v in vs if v not in TTA_VARIANTS})
    if bad:
        raise ConfigError(f"time to accuracy runs {', '.join(TTA_VARIANTS)}; not {bad}")
    _check_variants([v for vs in plan.values() for v in vs], "time-to-accuracy variants")
    data = load_dataset("mnist", data_dir=args.data_dir, download=False)
    if data.num_train < 60000:
        log.warning("time to accuracy on %s: not the full MNIST; pass --data-dir", data.source)
    out = []
    for name, variants in plan.items():
        for variant in variants:
            log.info("time to accuracy: %s, %s", name, variant)
            res = time_to_accuracy(name, data, variant, max_seconds=args.tta_max_seconds, threads=threads)
            res["dataset_source"] = data.source
            _log_tta(log, res)
            out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxnet.bench bench ...``: the subcommand on its own; returns the exit status."""
    from jaxnet.cli import main as cli_main

    return cli_main(argv, commands=("bench",))
