"""Where a run's numbers go: a JSONL log, TensorBoard event files and PNG curves.

Counterpart of the tutorials' ``SummaryWriter.add_scalar`` /
``add_histogram``, plus a plain JSON-lines file that any tool can read and a
chart for people who would rather look than read.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxnet.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


def _plain(value: Any) -> Any:
    """Converts numpy / jax scalars to JSON-friendly Python values."""
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


HISTOGRAM_BINS = 64  # buckets per parameter histogram


def _float_values(value: Any) -> np.ndarray:
    """``value`` flattened to float32 (bf16, ints, bools alike), or float64 where it already is."""
    x = np.asarray(value)
    dtype = np.float64 if x.dtype == np.float64 else np.float32  # casting 1e300 to float32 would overflow
    return x.astype(dtype, copy=False).ravel()


def _histogram(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(x, bins)`` of finite ``x``, also where numpy cannot make finite-sized bins.

    Numpy raises or overflows where ``max - min`` exceeds the dtype's range
    (float32 values beyond ~1.7e38) or is too small for ``bins`` distinct
    edges (a bias at 1.0 and one float32 step above it; all values 1e20).
    Those arrays are binned in float64: a (nearly) constant range widened by
    numpy's +-0.5 (or 2**-20 of the value where that vanishes), one beyond
    even the float64 range halved first (exact). Returns counts and edges.
    """
    lo, hi = float(x.min()), float(x.max())
    if _has_room(lo, hi, x.dtype, bins):
        return np.histogram(x, bins=bins, range=(lo, hi))  # the usual case, in the array's own precision
    x, big = x.astype(np.float64, copy=False), float(np.finfo(np.float64).max)
    if not _has_room(lo, hi, np.float64, bins) and hi - lo < big:
        pad = max(0.5, max(abs(lo), abs(hi)) * 2.0**-20)
        lo, hi = max(lo - pad, -big), min(hi + pad, big)
    scale = 1.0 if hi - lo < big else 2.0
    counts, edges = np.histogram(x / scale, bins=bins, range=(lo / scale, hi / scale))
    return counts, edges * scale


def _has_room(lo: float, hi: float, dtype: Any, bins: int) -> bool:
    """Whether ``bins`` equal buckets from ``lo`` to ``hi`` have distinct, finite edges in ``dtype``."""
    info = np.finfo(dtype)
    ulp = float(info.eps) * max(abs(lo), abs(hi))  # >= the float spacing there
    return 4 * bins * ulp < hi - lo < float(info.max)


def _sums(x: np.ndarray) -> tuple[float, float]:
    """The sum and the sum of squares of finite ``x``; float32 squares past 3.4e38 redone in float64."""
    with np.errstate(over="ignore"):  # only float64 sums past 1.8e308 stay inf, which they are
        total, squares = float(x.sum(dtype=np.float64)), float(np.dot(x, x))
        if not math.isfinite(squares) and x.dtype != np.float64:
            x = x.astype(np.float64)
            squares = float(np.dot(x, x))
    return total, squares


class MetricsLogger:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

    Each record is one JSON object per line: ``{"step": ..., "split": ...,
    <metric>: <value>}``. TensorBoard gets the same scalars under
    ``<split>/<metric>`` and, on request, parameter histograms.

    Args:
        workdir: folder of the run; created if missing. ``None`` logs nowhere
            (the logger then only keeps records in memory).
        tensorboard: whether to write TensorBoard event files.
        purge_step: for a resumed run, the step from which TensorBoard should
            discard previously written points (avoids duplicates).
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None,
        *,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.records: list[dict[str, Any]] = []
        self.workdir = pathlib.Path(workdir) if workdir is not None else None
        self._file = None
        self._writer = None
        if self.workdir is None:
            return
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(
                f"cannot write to the workdir {self.workdir}: {exc.strerror or exc}; "
                "choose a writable folder with --workdir"
            ) from None
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only when used

            self._writer = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=30)

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Records scalar ``metrics`` of ``split`` ("train", "test", ...) at ``step``."""
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{split}/{name}", value, int(step))
        return record

    def histograms(self, step: int, arrays: Mapping[str, Any], *, bins: int = HISTOGRAM_BINS) -> dict[str, int]:
        """Writes one TensorBoard histogram per array (``add_histogram``), over its finite values.

        ``bins`` equal-width buckets between the finite minimum and maximum
        (``np.histogram``: far less CPU than tensorboardX's default of ~1500
        exponential buckets, which matters once per epoch in a fast loop;
        ``benchmarks/CHECKPOINTS.md`` has the cost of both).
        NaN and infinite values (a diverged run trained on with
        ``on_nan="continue"``) are left out and counted; values near the
        float32 limit are binned in float64, so nothing overflows or warns.
        Arrays with no finite value are skipped.

        Returns:
            ``{name: number of non-finite values left out}`` for the arrays
            that had any (empty without TensorBoard).
        """
        nonfinite: dict[str, int] = {}
        if self._writer is None:
            return nonfinite
        for name, value in arrays.items():
            x = _float_values(value)
            finite = np.isfinite(x)
            if not finite.all():
                nonfinite[name] = int(x.size - np.count_nonzero(finite))
                x = x[finite]
            if x.size == 0:
                continue
            counts, edges = _histogram(x, bins)
            total, squares = _sums(x)
            self._writer.add_histogram_raw(
                name,
                min=float(edges[0]),
                max=float(edges[-1]),
                num=int(x.size),
                sum=total,
                sum_squares=squares,
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=int(step),
            )
        return nonfinite

    def flush(self) -> None:
        """Writes buffered TensorBoard events to disk (before a checkpoint, so a crash loses none)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the files; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path | None:
    """Draws loss and accuracy per epoch (train, and validation or test) into a PNG file.

    Args:
        history: per-epoch records as returned in ``FitResult.history``.
        path: where to write the PNG.

    Returns:
        The path written, or ``None`` when matplotlib is not installed or the
        history is empty.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    splits = ("train", "val", "test")
    panels = [("loss", tuple(f"{s}_loss" for s in splits)), ("accuracy", tuple(f"{s}_accuracy" for s in splits))]
    panels = [(t, keys) for t, keys in panels if any(k in history[0] for k in keys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if key in history[0]:
                label = {"val": "validation"}.get(key.split("_")[0], key.split("_")[0])
                ax.plot(epochs, [h.get(key) for h in history], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
