"""The benchmark proper: for each workload, every variant, interleaved, with the same start.

Per workload, in order:

1. **Loss agreement**: every variant is built with dropout off from the same
   weights and runs the same first batches; their losses must agree with the
   reference variant's (``torch-eager`` when it runs): float32 variants to
   float32's tolerance, bf16 ones (and any pair with a bf16 side) to the
   looser :data:`BF16_RTOL` / :data:`BF16_ATOL`.
2. **Warm-up**: every variant (dropout back on, when the model has any) runs
   ``steps``-long repeats, which compile what they compile: one, or up to
   four while they take less than half a second in all (caches and
   allocators settle).
3. **Timing**: ``repeats`` rounds; each round times one ``steps``-long repeat
   of every variant in turn (A B C D A B C D ...), so drift of the machine
   hits every variant alike. JAX compilations are counted in each timed
   repeat (steady state must be zero).
4. **First step and memory**, in fresh subprocesses (:mod:`jaxnet.bench.probe`).

FLOPs per step come from :func:`jaxnet.bench.variants.count_flops`. Every
variant runs on one ``device`` (``cpu`` or ``cuda``); the caller puts JAX's
work there (:func:`jaxnet.bench.machine.on_device`). Which variants run is
given, or each workload's default for the device
(:func:`jaxnet.bench.workload.default_variants`).
"""

from __future__ import annotations

import datetime
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxnet.bench import machine
from jaxnet.bench.probe import first_step_latency
from jaxnet.bench.variants import Runner, count_flops, has_dropout, initial_state_dict, make_runner, precision_of
from jaxnet.bench.workload import BF16_VARIANTS, JAX_VARIANTS, Workload, check_variants, default_variants
from jaxnet.compilation import CompileCounter
from jaxnet.errors import ConfigError

__all__ = ["agreement_reference", "check_agreement", "run_suite", "run_workload", "tolerance"]

Log = Callable[[str], None]
AGREEMENT_RTOL = 1e-3  # relative difference of float32 losses tolerated after a few steps
AGREEMENT_ATOL = 1e-5
# bfloat16 keeps 8 significant bits (a relative step of 2**-8 = 0.4%), and the two frameworks cast
# different operations (torch.autocast keeps log_softmax in float32, jaxnet's policy computes a
# model's own log_softmax in bf16): a few steps of training, with the tutorials' large first
# updates, move bf16 losses by up to a few percent from float32's and from each other.
BF16_RTOL = 5e-2
BF16_ATOL = 1e-3
WARMUP_SECONDS = 0.5  # warm-up repeats continue until this much time has passed ...
WARMUP_REPEATS_MAX = 4  # ... or this many repeats ran


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def agreement_reference(variants: Sequence[str]) -> str:
    """The variant whose losses the others are compared with: ``torch-eager``, else the first float32 one."""
    if "torch-eager" in variants:
        return "torch-eager"
    return next((v for v in variants if v not in BF16_VARIANTS), variants[0])


def tolerance(variant: str, reference: str) -> tuple[float, float]:
    """``(rtol, atol)`` of a variant's losses against the reference's: bf16's if either side is bf16."""
    if variant in BF16_VARIANTS or reference in BF16_VARIANTS:
        return BF16_RTOL, BF16_ATOL
    return AGREEMENT_RTOL, AGREEMENT_ATOL


def check_agreement(losses: dict[str, list[float]], reference: str) -> dict[str, dict[str, Any]]:
    """Compares every variant's first-step losses with the reference variant's.

    Returns:
        Per variant: ``loss_max_abs_diff``, ``losses_agree`` (every step
        within ``atol + rtol * |reference loss|``, with :func:`tolerance`'s
        ``rtol`` and ``atol``, also returned as ``loss_rtol`` and
        ``loss_atol``) and the ``reference`` variant's name.
    """
    ref = losses[reference]
    out = {}
    for variant, values in losses.items():
        rtol, atol = tolerance(variant, reference)
        diffs = [abs(a - b) for a, b in zip(values, ref)]
        agree = len(values) == len(ref) and all(d <= atol + rtol * abs(b) for d, b in zip(diffs, ref))
        out[variant] = {
            "loss_max_abs_diff": max(diffs) if diffs else None,
            "losses_agree": agree,
            "loss_rtol": rtol,
            "loss_atol": atol,
            "reference": reference,
        }
    return out


class _Counted:
    """Attributes JAX compilations to variants: a CompileCounter read around each call."""

    def __init__(self, counter: CompileCounter, variants: Sequence[str]):
        self.counter = counter
        self.warmup = dict.fromkeys(variants, 0)
        self.steady = dict.fromkeys(variants, 0)

    def __call__(self, tally: dict[str, int], variant: str, fn: Callable[[], Any]) -> Any:
        before = self.counter.snapshot()[1]
        result = fn()
        tally[variant] += self.counter.snapshot()[1] - before
        return result


def _prepare(
    workload: Workload,
    variants: Sequence[str],
    state_dict: dict,
    threads: int,
    agree_steps: int,
    counted: _Counted,
    device: str,
) -> tuple[dict[str, Runner], dict[str, list[float]]]:
    """Loss agreement (dropout off), then the timed runners (dropout as the model has it), warmed up."""
    dropout = has_dropout(workload.model)
    runners, losses = {}, {}
    for v in variants:
        build = functools.partial(make_runner, v, workload, state_dict=state_dict, threads=threads, device=device)
        runner = counted(counted.warmup, v, functools.partial(build, dropout=False))
        losses[v] = counted(counted.warmup, v, functools.partial(runner.run, agree_steps, record=True))
        if dropout:  # the timed model keeps its dropout
            runner = counted(counted.warmup, v, build)
        start = time.perf_counter()
        for _ in range(WARMUP_REPEATS_MAX):  # at least one repeat; more while they are quick
            counted(counted.warmup, v, functools.partial(runner.run, workload.steps))
            if time.perf_counter() - start > WARMUP_SECONDS:
                break
        runners[v] = runner
    return runners, losses


def _row(
    workload: Workload,
    variant: str,
    seconds: list[float],
    flops: float | None,
    peak_gflops: float | None,
    repeats: int,
    device: str,
) -> dict[str, Any]:
    rates = [workload.steps / s for s in seconds]
    median = statistics.median(rates)
    gflops = flops * median / 1e9 if flops else None
    return {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "variant": variant,
        "device": device,
        "precision": precision_of(variant),
        "steps": workload.steps,
        "repeats": repeats,
        "optimizer": workload.optimizer,
        "steps_per_sec": median,
        "steps_per_sec_min": min(rates),
        "steps_per_sec_max": max(rates),
        "epoch_seconds": workload.steps_per_epoch / median,
        "flops_per_step": flops,
        "gflops_per_sec": gflops,
        "peak_fraction": gflops / peak_gflops if gflops and peak_gflops else None,
        "first_step_seconds": None,
        "first_step_seconds_warm": None,
        "peak_rss_mb": None,
        "peak_rss_mb_cold": None,
        "peak_device_mb": None,
        "flush_denormal": variant == "torch-eager-ftz",
    }


def run_workload(
    workload: Workload,
    variants: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 5,
    threads: int | None = None,
    probes: bool = True,
    agreement_steps: int = 3,
    peak_gflops: float | None = None,
    log: Log = _stderr,
) -> list[dict[str, Any]]:
    """Measures every variant on one workload; returns one row per variant.

    Args:
        workload: model, batch size, steps per repeat, optimizer.
        variants: which of ``VARIANTS`` to run, in this order within a round
            (default: :func:`jaxnet.bench.workload.default_variants` for the
            model and the device).
        device: ``cpu`` or ``cuda``, where both frameworks run (JAX's work
            is put there by the caller, :func:`jaxnet.bench.machine.on_device`).
        repeats: timed rounds (the median, min and max are reported).
        threads: cores for PyTorch on the CPU (``torch.set_num_threads``);
            default: the cores XLA uses.
        probes: measure first-step latency and memory in subprocesses.
        agreement_steps: steps compared for loss agreement.
        peak_gflops: the machine's peak, for ``peak_fraction`` (None: no share).
        log: progress messages.

    Returns:
        Rows as described in :mod:`jaxnet.bench.report`'s schema.

    Raises:
        ConfigError: unknown variants, variants the model or the device cannot
            run (:func:`jaxnet.bench.workload.check_variants`), or fewer than one repeat.
    """
    variants = list(variants) if variants else list(default_variants(workload.model, device))
    check_variants(variants, workload.model, device)
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    threads = threads or machine.usable_cores()
    label = f"{workload.model}/{workload.batch_size}"
    state_dict = initial_state_dict(workload)
    agree_steps = min(agreement_steps, workload.steps)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    with CompileCounter() as counter:
        counted = _Counted(counter, variants)
        log(f"[{label}] loss agreement over {agree_steps} steps, dropout off; then warm-up")
        runners, losses = _prepare(workload, variants, state_dict, threads, agree_steps, counted, device)
        for r in range(repeats):  # interleaved: A B C A B C ...
            for v in variants:
                start = time.perf_counter()
                counted(counted.steady, v, functools.partial(runners[v].run, workload.steps))
                seconds[v].append(time.perf_counter() - start)
            log(
                f"[{label}] round {r + 1}/{repeats}: "
                + ", ".join(f"{v} {workload.steps / seconds[v][-1]:.1f}/s" for v in variants)
            )
    del runners
    load = machine.load_average()  # the machine's load while this workload was timed
    flops = count_flops(workload, device=device)
    agreement = check_agreement(losses, reference=agreement_reference(variants))
    rows = []
    for v in variants:
        row = _row(workload, v, seconds[v], flops, peak_gflops, repeats, device)
        jax_variant = v in JAX_VARIANTS
        row.update(
            warmup_compiles=counted.warmup[v] if jax_variant else None,
            steady_state_compiles=counted.steady[v] if jax_variant else None,
            first_losses=losses[v],
            loss_reference=agreement[v].pop("reference"),
            **agreement[v],
            load_average_1min=load[0] if load else None,
        )
        if probes and v != "torch-eager-ftz":  # ftz: the same first step as torch-eager
            log(f"[{label}] first step of {v}: cold and warm cache, in subprocesses")
            row.update(first_step_latency(workload, v, state_dict, threads=threads, device=device))
        rows.append(row)
    return rows


def run_suite(
    workloads: Sequence[Workload],
    variants: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 5,
    threads: int | None = None,
    probes: bool = True,
    fma_units: int = 2,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Runs :func:`run_workload` for every workload, on ``device``; returns the whole result.

    ``variants`` None runs each workload's default variants for the device.
    JAX's work must be on ``device`` already (run_bench runs this inside
    :func:`jaxnet.bench.machine.on_device`).

    Returns:
        ``{"rows", "machine", "versions", "config"}`` (see :mod:`jaxnet.bench.report`).
    """
    threads = threads or machine.usable_cores()
    info = machine.machine_info(cores=threads, fma_units=fma_units, device=machine.describe_device(device))
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        rows.extend(
            run_workload(
                workload,
                variants,
                device=device,
                repeats=repeats,
                threads=threads,
                probes=probes,
                peak_gflops=info["peak_gflops"],
                log=log,
            )
        )
    info["load_average_end"] = machine.load_average()
    return {
        "rows": rows,
        "machine": info,
        "versions": machine.versions(),
        "config": {
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "repeats": repeats,
            "threads": threads,
            "device": device,
            # as given; else each workload's defaults, in the order they ran
            "variants": list(variants) if variants else list(dict.fromkeys(r["variant"] for r in rows)),
            "probes": probes,
            "workloads": [w.to_dict() for w in workloads],
            "command": " ".join(sys.argv),
        },
    }
