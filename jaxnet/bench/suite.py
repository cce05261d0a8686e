"""The benchmark proper: for each workload, every variant, interleaved, with the same start.

Per workload, in order:

1. **Loss agreement**: every variant is built with dropout off from the same
   weights and runs the same first batches; their losses must agree.
2. **Warm-up**: every variant (dropout back on, when the model has any) runs
   ``steps``-long repeats, which compile what they compile: one, or up to
   four while they take less than half a second in all (caches and
   allocators settle).
3. **Timing**: ``repeats`` rounds; each round times one ``steps``-long repeat
   of every variant in turn (A B C D A B C D ...), so drift of the machine
   hits every variant alike. JAX compilations are counted in each timed
   repeat (steady state must be zero).
4. **First step and memory**, in fresh subprocesses (:mod:`jaxnet.bench.probe`).

FLOPs per step come from :func:`jaxnet.bench.variants.count_flops`.
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
from jaxnet.bench.variants import Runner, count_flops, has_dropout, initial_state_dict, make_runner
from jaxnet.bench.workload import JAX_VARIANTS, VARIANTS, Workload
from jaxnet.compilation import CompileCounter
from jaxnet.errors import ConfigError

__all__ = ["check_agreement", "run_suite", "run_workload"]

Log = Callable[[str], None]
AGREEMENT_RTOL = 1e-3  # relative difference of float32 losses tolerated after a few steps
AGREEMENT_ATOL = 1e-5
WARMUP_SECONDS = 0.5  # warm-up repeats continue until this much time has passed ...
WARMUP_REPEATS_MAX = 4  # ... or this many repeats ran


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_agreement(losses: dict[str, list[float]], reference: str) -> dict[str, dict[str, Any]]:
    """Compares every variant's first-step losses with the reference variant's.

    Returns:
        Per variant: ``loss_max_abs_diff``, ``losses_agree`` (every step
        within ``AGREEMENT_ATOL + AGREEMENT_RTOL * |reference loss|``) and
        the ``reference`` variant's name.
    """
    ref = losses[reference]
    out = {}
    for variant, values in losses.items():
        diffs = [abs(a - b) for a, b in zip(values, ref)]
        agree = len(values) == len(ref) and all(
            d <= AGREEMENT_ATOL + AGREEMENT_RTOL * abs(b) for d, b in zip(diffs, ref)
        )
        out[variant] = {
            "loss_max_abs_diff": max(diffs) if diffs else None,
            "losses_agree": agree,
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
    workload: Workload, variants: Sequence[str], state_dict: dict, threads: int, agree_steps: int, counted: _Counted
) -> tuple[dict[str, Runner], dict[str, list[float]]]:
    """Loss agreement (dropout off), then the timed runners (dropout as the model has it), warmed up."""
    dropout = has_dropout(workload.model)
    runners, losses = {}, {}
    for v in variants:
        build = functools.partial(make_runner, v, workload, state_dict=state_dict, threads=threads)
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
    workload: Workload, variant: str, seconds: list[float], flops: float | None, peak_gflops: float | None, repeats: int
) -> dict[str, Any]:
    rates = [workload.steps / s for s in seconds]
    median = statistics.median(rates)
    gflops = flops * median / 1e9 if flops else None
    return {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "variant": variant,
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
        "flush_denormal": variant == "torch-eager-ftz",
    }


def run_workload(
    workload: Workload,
    variants: Sequence[str],
    *,
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
        variants: which of ``VARIANTS`` to run, in this order within a round.
        repeats: timed rounds (the median, min and max are reported).
        threads: cores for PyTorch (``torch.set_num_threads``); default: the
            cores XLA uses.
        probes: measure first-step latency and memory in subprocesses.
        agreement_steps: steps compared for loss agreement.
        peak_gflops: the machine's peak, for ``peak_fraction``.
        log: progress messages.

    Returns:
        Rows as described in :mod:`jaxnet.bench.report`'s schema.

    Raises:
        ConfigError: unknown variants, or fewer than one repeat.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
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
        runners, losses = _prepare(workload, variants, state_dict, threads, agree_steps, counted)
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
    flops = count_flops(workload)
    agreement = check_agreement(losses, reference="torch-eager" if "torch-eager" in variants else variants[0])
    rows = []
    for v in variants:
        row = _row(workload, v, seconds[v], flops, peak_gflops, repeats)
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
            row.update(first_step_latency(workload, v, state_dict, threads=threads))
        rows.append(row)
    return rows


def run_suite(
    workloads: Sequence[Workload],
    variants: Sequence[str],
    *,
    repeats: int = 5,
    threads: int | None = None,
    probes: bool = True,
    fma_units: int = 2,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Runs :func:`run_workload` for every workload; returns the whole result.

    Returns:
        ``{"rows", "machine", "versions", "config"}`` (see :mod:`jaxnet.bench.report`).
    """
    import jax

    threads = threads or machine.usable_cores()
    device = jax.devices("cpu")[0]  # run_bench runs the JAX variants there (machine.on_the_cpu)
    info = machine.machine_info(
        cores=threads, fma_units=fma_units, device={"platform": device.platform, "kind": device.device_kind}
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        rows.extend(
            run_workload(
                workload,
                variants,
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
            "variants": list(variants),
            "probes": probes,
            "workloads": [w.to_dict() for w in workloads],
            "command": " ".join(sys.argv),
        },
    }
