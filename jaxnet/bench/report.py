"""The benchmark's outputs: a JSON schema (with a small validator), Markdown tables and PNG charts.

``jaxnet bench --json`` ends with one JSON line, an object shaped like
:data:`RESULT_SCHEMA`: ``rows`` (one per model, batch size and variant),
``machine``, ``versions``, ``config`` and, with ``--time-to-accuracy``,
``time_to_accuracy``. The schema is a subset of JSON Schema (``type``,
``required``, ``properties``, ``items``, ``enum``, ``minimum``) that
:func:`validate` checks without any extra dependency. Keys added since the
first published results (a row's ``device``, ``precision``, ``loss_rtol``,
``peak_device_mb``) are optional, so that ``--render`` still reads those.
On a GPU the machine's ``peak_gflops`` and the rows' ``peak_fraction`` are
null: only the CPU's peak is computed.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnet.bench.workload import DEVICES, VARIANTS
from jaxnet.errors import JaxnetError

__all__ = ["RESULT_SCHEMA", "markdown_tables", "plot_charts", "validate", "write_outputs"]

_NUM, _OPT_NUM, _OPT_INT = {"type": "number"}, {"type": ["number", "null"]}, {"type": ["integer", "null"]}

ROW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "model",
        "batch_size",
        "variant",
        "steps_per_sec",
        "steps_per_sec_min",
        "steps_per_sec_max",
        "first_step_seconds",
        "gflops_per_sec",
        "first_step_seconds_warm",
        "epoch_seconds",
        "steps",
        "repeats",
        "steady_state_compiles",
        "losses_agree",
        "peak_rss_mb",
    ],
    "properties": {
        "model": {"type": "string"},
        "batch_size": {"type": "integer", "minimum": 1},
        "variant": {"type": "string", "enum": list(VARIANTS)},
        "device": {"type": "string", "enum": list(DEVICES)},  # where both frameworks ran
        "precision": {"type": "string", "enum": ["fp32", "bf16"]},  # compute dtype (parameters stay float32)
        "steps": {"type": "integer", "minimum": 1},  # steps per timed repeat
        "repeats": {"type": "integer", "minimum": 1},
        "steps_per_sec": {"type": "number", "minimum": 0},  # median over repeats
        "steps_per_sec_min": {"type": "number", "minimum": 0},
        "steps_per_sec_max": {"type": "number", "minimum": 0},
        "epoch_seconds": _NUM,  # steps of one real-data epoch / median steps per second
        "first_step_seconds": _OPT_NUM,  # cold compilation cache; null if not probed
        "first_step_seconds_warm": _OPT_NUM,  # warm cache; null for eager variants
        "flops_per_step": _OPT_NUM,
        "gflops_per_sec": _OPT_NUM,
        "peak_fraction": _OPT_NUM,  # gflops_per_sec / machine.peak_gflops; null on a GPU
        "peak_rss_mb": _OPT_NUM,
        "peak_rss_mb_cold": _OPT_NUM,
        "peak_device_mb": _OPT_NUM,  # GPU memory in use at most (probe); null on the CPU
        "warmup_compiles": _OPT_INT,  # JAX compilations before timing (null for torch)
        "steady_state_compiles": _OPT_INT,  # JAX compilations while timed: must be 0
        "first_losses": {"type": "array", "items": _NUM},
        "loss_max_abs_diff": _OPT_NUM,
        "losses_agree": {"type": "boolean"},  # within loss_atol + loss_rtol * |reference loss|
        "loss_reference": {"type": "string", "enum": list(VARIANTS)},
        "loss_rtol": _NUM,
        "loss_atol": _NUM,
        "flush_denormal": {"type": "boolean"},
        "load_average_1min": _OPT_NUM,  # the machine's load right after the timed repeats
    },
}

TTA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model", "variant", "target", "reached", "seconds", "final_accuracy", "curve"],
    "properties": {
        "model": {"type": "string"},
        "variant": {"type": "string", "enum": list(VARIANTS)},
        "target": {"type": "number", "minimum": 0},
        "reached": {"type": "boolean"},
        "seconds": _OPT_NUM,  # training wall seconds (compile included) when the target was first met
        "steps": _OPT_INT,
        "final_accuracy": _NUM,
        "curve": {"type": "array", "items": {"type": "array", "items": _NUM}},  # [seconds, step, accuracy]
        "stopped": {"type": "string"},  # why training ended: target, time limit or epochs
    },
}

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["rows", "machine", "versions"],
    "properties": {
        "rows": {"type": "array", "items": ROW_SCHEMA},
        "machine": {
            "type": "object",
            "required": ["cpu", "cores", "mhz", "peak_gflops", "load_average"],
            "properties": {
                "cpu": {"type": "string"},
                "cores": {"type": "integer", "minimum": 1},
                "peak_gflops": _OPT_NUM,  # the CPU's fp32 peak; null when the run was on a GPU
                "load_average": {"type": ["array", "null"]},
                "device": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": list(DEVICES)},
                        "platform": {"type": "string"},  # JAX's: cpu, gpu
                        "kind": {"type": "string"},  # JAX's device_kind
                        "gpu": {"type": ["string", "null"]},  # torch.cuda.get_device_name()
                    },
                },
            },
        },
        "versions": {
            "type": "object",
            "required": ["python", "jax", "jaxlib", "flax", "optax", "torch"],
            "properties": {"python": {"type": "string"}, "jax": {"type": "string"}},
        },
        "config": {"type": "object"},
        "time_to_accuracy": {"type": "array", "items": TTA_SCHEMA},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value: Any, schema: Mapping[str, Any] = RESULT_SCHEMA, path: str = "$") -> list[str]:
    """Checks ``value`` against a JSON-Schema subset; returns the problems found (empty if valid).

    >>> validate({"rows": []}, {"type": "object", "required": ["rows", "machine"]})
    ["$: missing required key 'machine'"]
    """
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_is(value, k) for k in kinds):
        return [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__} {value!r:.60}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required key {k!r}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += validate(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _fmt(value: Any, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _speedup(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    base = [
        r
        for r in rows
        if r["variant"] == "torch-eager" and r["model"] == row["model"] and r["batch_size"] == row["batch_size"]
    ]
    return f"{row['steps_per_sec'] / base[0]['steps_per_sec']:.2f}x" if base else "–"


def markdown_tables(result: Mapping[str, Any]) -> str:
    """The result as Markdown: one table of the rows, one of time to accuracy (if any)."""
    rows = result["rows"]
    lines = []
    if rows:
        lines += [
            "| model | batch | variant | steps/s median (min–max) | vs torch-eager | first step cold / warm (s) "
            "| epoch (s) | GFLOP/s | % of peak | peak RSS (MB) | compiles warm-up / steady "
            "| losses agree (max abs diff) | load |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in rows:
            peak = None if r.get("peak_fraction") is None else 100 * r["peak_fraction"]
            compiles = (
                "–"
                if r.get("steady_state_compiles") is None
                else f"{r.get('warmup_compiles')} / {r['steady_state_compiles']}"
            )
            agree = f"{'yes' if r['losses_agree'] else 'NO'} ({_fmt(r.get('loss_max_abs_diff'), '.1e')})"
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['variant']} | {r['steps_per_sec']:,.1f} "
                f"({r['steps_per_sec_min']:,.1f}–{r['steps_per_sec_max']:,.1f}) | {_speedup(r, rows)} "
                f"| {_fmt(r['first_step_seconds'], '.2f')} / {_fmt(r['first_step_seconds_warm'], '.2f')} "
                f"| {_fmt(r['epoch_seconds'], '.3g')} | {_fmt(r.get('gflops_per_sec'), '.3g')} | {_fmt(peak, '.2g')} "
                f"| {_fmt(r.get('peak_rss_mb'), '.0f')} | {compiles} | {agree} | {_fmt(r.get('load_average_1min'))} |"
            )
    tta = result.get("time_to_accuracy") or []
    if tta:
        lines += [
            "",
            "| model | variant | target | reached after (s, compile included) | steps | best test accuracy |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for t in tta:
            reached = (
                f"{t['seconds']:.1f}"
                if t["reached"]
                else f"not reached ({t.get('stopped', 'stopped')}, {t['curve'][-1][0]:.0f} s)"
            )
            lines.append(
                f"| {t['model']} | {t['variant']} | {100 * t['target']:.0f}% | {reached} "
                f"| {_fmt(t.get('steps'), 'd')} | {100 * t['final_accuracy']:.2f}% |"
            )
    return "\n".join(lines) + "\n"


def _bar_chart(plt: Any, rows: Sequence[Mapping[str, Any]], key: str, ylabel: str, path: pathlib.Path) -> None:
    """Grouped bars of ``key`` per (model, batch) and variant, log scale.

    For steps/s the error bars span min..max; for the first step, black ticks
    mark the warm-cache latency on each (cold-cache) bar.
    """
    groups = list(dict.fromkeys((r["model"], r["batch_size"]) for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    warm_label: str | None = "warm cache"  # None after the first: one legend entry
    for i, v in enumerate(variants):
        found = [
            (g, r)
            for g, group in enumerate(groups)
            for r in rows
            if r["variant"] == v and (r["model"], r["batch_size"]) == group and r.get(key) is not None
        ]
        xs = [g + (i - (len(variants) - 1) / 2) * width for g, _ in found]
        ys = [r[key] for _, r in found]
        spread = None
        if key == "steps_per_sec":
            spread = [
                [r[key] - r["steps_per_sec_min"] for _, r in found],
                [r["steps_per_sec_max"] - r[key] for _, r in found],
            ]
        ax.bar(xs, ys, width, label=v, yerr=spread, capsize=2)
        warm = [(x, r["first_step_seconds_warm"]) for x, (_, r) in zip(xs, found) if r.get("first_step_seconds_warm")]
        if key == "first_step_seconds" and warm:
            ax.scatter(*zip(*warm), marker="_", s=200, color="black", zorder=3, label=warm_label)
            warm_label = None
    ax.set_xticks(range(len(groups)), [f"{m}\nbatch {b}" for m, b in groups])
    ax.set_ylabel(ylabel + " (log scale)")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy_chart(plt: Any, tta: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    """Test accuracy against training seconds, one panel per model, the target dashed."""
    models = list(dict.fromkeys(t["model"] for t in tta))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = [t for t in tta if t["model"] == model]
        for t in runs:
            ax.plot([c[0] for c in t["curve"]], [100 * c[2] for c in t["curve"]], marker=".", label=t["variant"])
        target = 100 * runs[0]["target"]
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{model}: test accuracy vs training time")
        ax.set_xlabel("wall seconds, compile included")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(80.0, target - 8), 100)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_charts(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Writes ``bench_steps_per_sec.png``, ``bench_first_step.png`` and ``bench_time_to_accuracy.png``.

    Returns:
        The paths written (a chart without data is skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = result["rows"]
    for name, key, ylabel in (
        ("bench_steps_per_sec.png", "steps_per_sec", "training steps per second"),
        ("bench_first_step.png", "first_step_seconds", "first step (s), cold cache"),
    ):
        if any(r.get(key) is not None for r in rows):
            _bar_chart(plt, rows, key, ylabel, out / name)
            written.append(out / name)
    if result.get("time_to_accuracy"):
        _accuracy_chart(plt, result["time_to_accuracy"], out / "bench_time_to_accuracy.png")
        written.append(out / "bench_time_to_accuracy.png")
    return written


def write_outputs(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Writes ``bench.json``, ``bench.md`` and the charts into ``out_dir``.

    Raises:
        JaxnetError: if the result does not match :data:`RESULT_SCHEMA` (nothing is written).
    """
    errors = validate(result)
    if errors:
        raise JaxnetError("the benchmark result does not match its schema: " + "; ".join(errors[:5]))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown_tables(result), encoding="utf-8")
    return [out / "bench.json", out / "bench.md", *plot_charts(result, out)]
