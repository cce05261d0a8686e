"""Renders ``static_vs_dynamic.md``, the "Static vs dynamic, measured" page, from one result.

Every number on the page comes from the result it is rendered from; the
prose around them explains the method and is the same for every run. The
findings are computed (ratios between variants of the same row), so they
cannot drift from the tables.
"""

from __future__ import annotations

import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnet.bench.report import markdown_tables

__all__ = ["findings", "render_page", "write_page"]

PAGE = "static_vs_dynamic.md"

_METHOD = """\
## How it is measured

- **Same start, same data, same update rule.** Each row's variants start from the
  same weights (jaxnet's initialization, copied into the PyTorch module with
  `jaxnet.interop.to_torch_state_dict`), train on the same pool of 8 synthetic
  batches in the same order, with the model's tutorial optimizer
  (`jaxnet.recipes`) at a constant learning rate. The PyTorch models are the
  tutorials' own modules (`jaxnet/bench/torch_models.py`). `cifar_speed`
  (airbench94's net, `jaxnet bench --model cifar_speed`) trains with its own
  recipe step instead: `jaxnet.speedrun.make_speedrun_step` and its PyTorch
  twin's `torch_train_step` (`jaxnet/bench/speed_torch.py`), on uint8 pixels
  that jaxnet normalizes on the device and PyTorch gets normalized, channels-last.
- **Variants.** `torch-eager`: the tutorials' loop (`zero_grad`, forward, loss,
  `backward`, `step`). `torch-eager-ftz`: the same after
  `torch.set_flush_denormal(True)` (PyTorch's CPU kernels slow down on subnormal
  floats, which Adam training produces; XLA flushes them). `torch-compile`:
  `torch.compile(model)` (Inductor compiles forward and backward; the optimizer
  step stays eager). `jax-jit`: `jaxnet.step.make_train_step`, forward, backward
  and update as one XLA executable per step. `jax-scan`:
  `jaxnet.step.make_scan_epoch`, the steps of a repeat as one `lax.scan` call.
  Opt-in on a CPU (`--variants`), defaults on a GPU: `torch-compile-max`
  (`torch.compile(model, mode="max-autotune")`), `torch-bf16` (eager under
  `torch.autocast(dtype=torch.bfloat16)`, the loss in float32) and
  `jax-jit-bf16` (`jax-jit` with jaxnet's bf16 policy: bfloat16 compute,
  float32 parameters). On a CPU, PyTorch runs with `torch.set_num_threads`
  equal to the cores XLA uses.
- **Device.** `--device auto` (the default) runs both frameworks on a CUDA GPU
  when PyTorch and JAX both see one, else on the CPU; the probes' subprocesses
  get `JAX_PLATFORMS` to match. On a GPU every PyTorch repeat ends with
  `torch.cuda.synchronize()` and every JAX one with `block_until_ready`; JAX
  allocates GPU memory on demand there, so the frameworks share the GPU.
- **Steady-state speed.** After a warm-up repeat, each variant runs `repeats`
  timed repeats of `steps` steps, interleaved (A B C D A B C D ...), so machine
  drift hits all variants alike; the tables give the median with min and max.
  `epoch (s)` is the steps of one epoch of the real data set (60,000 MNIST or
  50,000 CIFAR-10 images) divided by the median rate: compute only, no data
  loading.
- **FLOPs** per step are XLA's HLO cost analysis of the jax train step
  (`jit(step).lower(state, batch).cost_analysis()["flops"]`: forward, backward
  and update, only the work the math needs); the same count is used for every
  variant (bf16 ones included). **Peak** is cores x clock x FLOP/cycle, with
  FLOP/cycle = vector lanes (from `/proc/cpuinfo`'s flags) x 2 (fused
  multiply-add) x FMA units per core (2, an assumption that `/proc/cpuinfo`
  cannot confirm): the CPU's fp32 peak. On a GPU no peak is given; the rows
  report the achieved GFLOP/s.
- **First step** is measured in fresh subprocesses: the wall time of the first
  training step once model, optimizer and batches exist (tracing and compiling
  included), first with an empty compilation cache (cold: JAX's persistent
  cache `jax_compilation_cache_dir`, Inductor's `TORCHINDUCTOR_CACHE_DIR`, both
  in a fresh temporary folder), then again with the cache the first run filled
  (warm). Eager PyTorch has nothing to cache and is measured once
  (`torch-eager-ftz` not at all: its first step is eager's). For
  `jax-scan` the first call runs a whole repeat, so a second call's time for
  the other steps is subtracted.
- **Peak memory** is the rise of the subprocess's resident memory (peak
  `VmHWM`, reset just before the first step, minus the resident memory after
  imports and batch creation) over the first step and one repeat. On a GPU,
  `peak_device_mb` in `bench.json` is the most GPU memory the framework held
  in use in that subprocess.
- **Loss agreement**: every variant runs the first steps again with dropout
  off (rates set to 0); their losses must match PyTorch eager's within
  1e-5 + 1e-3 x |loss|; the bf16 variants' within 1e-3 + 5e-2 x |loss|
  (bfloat16 keeps 8 significant bits, and the two frameworks cast different
  operations to it).
- **load** in the table is the machine's 1-minute load average right after a
  row's timed repeats (`os.getloadavg`); above the number of cores, other
  processes were competing for the CPU.
- **Compilations** are counted with `jaxnet.CompileCounter` (JAX's monitoring
  events): during the warm-up, and during the timed repeats, where a static
  graph must not compile again (the `steady` count).
- **Time to accuracy** trains on the real MNIST with each model's tutorial
  recipe (same initial weights, same shuffled order on both sides) and
  evaluates on the 10,000 test images every quarter epoch; the clock includes
  JAX's compilation and stops during evaluation. Each is a single run (not
  repeated), so a burst of other work on the machine shows up in it directly:
  look for a flat stretch in the curves.
"""

_LESSONS = """\
## The lessons behind the numbers

The tutorials' dynamic-graph habits, each with its static-graph answer and the
measured cost of both, are runnable examples (each run by `tests/e2e/test_lessons.py`):

- `examples/01_tensors.py`: tensors, side by side with the PyTorch lines they replace.
- `examples/02_autograd.py`: gradients as return values, no `.grad`, no `zero_grad`.
- `examples/03_dynamic_vs_static.py`: a Python `if` on a tensor under `jit`
  (the error, then `lax.cond` / `jnp.where`); a loop of random depth (one
  compile per depth vs one `lax.scan` over stacked weights); variable-length
  sentences with a GRU classifier (PyTorch one sentence at a time vs padding,
  masking and length buckets); printing intermediates (`jax.debug.print`,
  `jax.disable_jit`); XLA fusion and `jax.export` for deployment.
"""


def _rows(result: Mapping[str, Any], variant: str) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["model"], r["batch_size"]): r for r in result["rows"] if r["variant"] == variant}


def _ratio_line(result: Mapping[str, Any], a: str, b: str, what: str) -> str | None:
    ra, rb = _rows(result, a), _rows(result, b)
    ratios = {k: ra[k]["steps_per_sec"] / rb[k]["steps_per_sec"] for k in ra if k in rb}
    if not ratios:
        return None
    parts = ", ".join(f"{m}/{bs} {x:.2f}x" for (m, bs), x in ratios.items())
    return f"- {what} (`{a}` steps/s over `{b}`): {parts}."


def findings(result: Mapping[str, Any]) -> list[str]:
    """Bullet points computed from the result: speed ratios, compiles, agreement, first steps."""
    lines = [
        line
        for line in (
            _ratio_line(result, "jax-jit", "torch-eager", "Static graph, one call per step, vs dynamic"),
            _ratio_line(result, "jax-jit", "torch-eager-ftz", "The same against eager PyTorch with denormals flushed"),
            _ratio_line(result, "jax-scan", "jax-jit", "Whole-repeat `lax.scan` vs one call per step"),
            _ratio_line(result, "torch-compile", "torch-eager", "`torch.compile` vs eager"),
            _ratio_line(result, "torch-eager-ftz", "torch-eager", "Flushing denormals in eager PyTorch"),
            _ratio_line(result, "torch-compile-max", "torch-compile", "`max-autotune` vs the default `torch.compile`"),
            _ratio_line(result, "torch-bf16", "torch-eager", "bfloat16 autocast vs float32, eager PyTorch"),
            _ratio_line(result, "jax-jit-bf16", "jax-jit", "jaxnet's bf16 policy vs float32"),
            _ratio_line(result, "jax-jit-bf16", "torch-bf16", "bf16 static graph vs bf16 dynamic"),
        )
        if line
    ]
    rows = result["rows"]
    jax_rows = [r for r in rows if r.get("steady_state_compiles") is not None]
    if jax_rows:
        bad = [f"{r['model']}/{r['batch_size']} {r['variant']}" for r in jax_rows if r["steady_state_compiles"]]
        lines.append(
            "- Compilations during the timed repeats of the jax variants: "
            + ("none in every row." if not bad else f"not zero in {', '.join(bad)}.")
        )
    if rows:
        disagree = [f"{r['model']}/{r['batch_size']} {r['variant']}" for r in rows if not r["losses_agree"]]
        worst = max((r.get("loss_max_abs_diff") or 0.0) for r in rows)
        reference = (
            "PyTorch eager"
            if all(r.get("loss_reference", "torch-eager") == "torch-eager" for r in rows)
            else "its row's reference variant (`loss_reference` in bench.json)"
        )
        bf16 = " (bf16 variants to bf16's tolerance)" if any(r.get("precision") == "bf16" for r in rows) else ""
        lines.append(
            "- Losses over the first steps (dropout off): "
            + (
                f"every variant agrees with {reference}{bf16} (largest difference {worst:.1e})."
                if not disagree
                else f"disagree in {', '.join(disagree)}."
            )
        )
    for variant in ("torch-compile", "jax-jit"):
        cold = [r["first_step_seconds"] for r in rows if r["variant"] == variant and r.get("first_step_seconds")]
        warm = [
            r["first_step_seconds_warm"] for r in rows if r["variant"] == variant and r.get("first_step_seconds_warm")
        ]
        if cold:
            text = f"- First step of `{variant}`: median {statistics.median(cold):.2f} s with a cold cache"
            lines.append(text + (f", {statistics.median(warm):.2f} s warm." if warm else "."))
    for t in result.get("time_to_accuracy") or []:
        state = f"{t['seconds']:.1f} s ({t['steps']} steps)" if t["reached"] else "not reached"
        lines.append(
            f"- Time to {100 * t['target']:.0f}% on MNIST, {t['model']}, `{t['variant']}`: {state}; "
            f"best {100 * t['final_accuracy']:.2f}%{_stall(t['curve'])}."
        )
    return lines


def _stall(curve: Sequence[Sequence[float]]) -> str:
    """Names the slowest stretch of a time-to-accuracy curve if it ran 3x slower than the median stretch."""
    rates = [((b[0] - a[0]) / (b[1] - a[1]), a, b) for a, b in zip(curve, curve[1:]) if b[1] - a[1] >= 10]
    if len(rates) < 3:
        return ""
    typical = statistics.median(r for r, _, _ in rates)
    worst, a, b = max(rates)
    if worst <= 3 * typical:
        return ""
    return (
        f" (steps {a[1]:.0f}-{b[1]:.0f} took {b[0] - a[0]:.1f} s, {worst / typical:.0f}x the run's "
        "median pace: other work on the machine, most likely)"
    )


def _device_lines(m: Mapping[str, Any]) -> list[str]:
    """The machine and device lines: the CPU and its peak, or the GPU both frameworks ran on."""
    device = m.get("device") or {}
    cpu = f"{m['cpu']}, {m['cores']} cores used ({m.get('logical_cpus')} logical CPUs), {m['mhz']:.0f} MHz, "
    if device.get("platform", "cpu") == "cpu":
        return [
            f"- **Machine**: {cpu}{m.get('vector')}; fp32 peak {m['peak_gflops']} GFLOP/s = {m.get('peak_formula')}.",
            f"- **Device**: JAX on {device.get('platform', '?')}; PyTorch on CPU.",
        ]
    gpu = device.get("gpu") or device.get("kind", "?")
    return [
        f"- **Machine**: {cpu}{m.get('vector')} (the host; no peak is given for the GPU).",
        f"- **Device**: JAX and PyTorch on the GPU: {gpu} (JAX's device kind {device.get('kind', '?')}, "
        f"PyTorch built for CUDA {device.get('torch_cuda') or '?'}).",
    ]


def _where(result: Mapping[str, Any]) -> list[str]:
    m, v, c = result["machine"], result["versions"], result.get("config", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    loads = (m.get("load_average") or [])[:1] + (m.get("load_average_end") or [])[:1]
    busy = (
        []
        if not loads or max(loads) <= m["cores"]
        else [
            f"- **Caution**: the 1-minute load average reached {max(loads)} on {m['cores']} cores, so other "
            "processes competed for the CPU during this run. Multi-threaded PyTorch suffers most from that "
            "(its threads wait for each other at every operation); compare variants within a row, and "
            "rerun on an idle machine before quoting absolute numbers."
        ]
    )
    return [
        f"- **When**: {c.get('started_utc', '?')} (UTC); "
        + (
            f"{c['wall_seconds']} s of wall time ({c['suite_seconds']} s for the measurements table, "
            "the rest for time to accuracy)."
            if "suite_seconds" in c
            else f"{c.get('wall_seconds', '?')} s of wall time for the measurements table."
        ),
        *_device_lines(m),
        f"- **Load** (`uptime`'s 1/5/15-minute averages): {m.get('load_average')} at the start, "
        f"{m.get('load_average_end')} at the end. Other work on the machine slows every variant; the "
        "interleaving keeps the comparison fair, not the absolute numbers.",
        f"- **Versions**: {versions}.",
        f"- **Code**: commit {c.get('commit') or 'unknown'}.",
        f"- **Command**: `{c.get('command', '?')}` ({c.get('repeats')} repeats, {c.get('threads')} threads).",
        *busy,
    ]


def render_page(result: Mapping[str, Any], charts: Sequence[str] = ()) -> str:
    """The Markdown page for ``result``; ``charts`` are PNG file names to embed."""
    parts = [
        "# Static vs dynamic, measured",
        "",
        "The PyTorch tutorials say that dynamic graphs are flexible but lose performance, and that "
        "static graphs can be optimized globally. This page measures both claims on the tutorials' "
        "own models: the same training, from the same weights, on the same batches, on one machine.",
        "",
        "Regenerate everything on this page (tables, charts, numbers) with `python -m benchmarks.run` "
        "(or `jaxnet bench --full --out docs/ --data-dir DIR`, DIR holding mnist/ and cifar10/).",
        "",
        "## Where and when this ran",
        "",
        *_where(result),
        "",
        "## What the numbers say",
        "",
        *findings(result),
        "",
        "## The measurements",
        "",
        markdown_tables(result).rstrip(),
        "",
    ]
    captions = {
        "bench_steps_per_sec.png": "Steps per second by variant and batch size (median; bars: min-max).",
        "bench_first_step.png": "First step: bars with a cold compilation cache, black ticks warm.",
        "bench_time_to_accuracy.png": "Test accuracy against training time on MNIST.",
    }
    for chart in charts:
        parts += [f"![{captions.get(chart, chart)}]({chart})", "", f"*{captions.get(chart, chart)}*", ""]
    parts += [_METHOD, _LESSONS]
    return "\n".join(parts)


def write_page(result: Mapping[str, Any], out_dir: str | os.PathLike, charts: Sequence[str] = ()) -> pathlib.Path:
    """Writes ``static_vs_dynamic.md`` into ``out_dir``, embedding ``charts`` (file names there)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PAGE
    path.write_text(render_page(result, charts), encoding="utf-8")
    return path
