"""What a fit reports: each epoch's record, and at the end the :class:`FitResult` and its summary.

An epoch's record (``train_*`` means, then ``val_*`` or the tutorials'
per-epoch ``test_*``) goes into the history, ``metrics.jsonl``, TensorBoard
and one line on stderr; :func:`finish` scores the final state, gives the
trained weights back to the user's model and writes the summary.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxnet.compilation import CompileCounter
from jaxnet.data.inputs import Split
from jaxnet.state import TrainState, copy_state, count_params
from jaxnet.step import Transform
from jaxnet.tracking import CURVES_FILE, plot_curves
from jaxnet.training.evaluation import evaluate
from jaxnet.training.loop import FitLoop
from jaxnet.training.plan import _Plan, model_name
from jaxnet.training.steps import FitSteps

# The preprocessing each model object was trained with, for jaxnet.predict(model, x).
_PREPROCESSING: weakref.WeakKeyDictionary[nnx.Module, Transform | None] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class FitResult:
    """What :func:`jaxnet.fit` returns.

    Attributes:
        graphdef: the model's static graph definition.
        state: the final :class:`~jaxnet.state.TrainState` (the best one with
            ``EarlyStopping(restore_best=True)``).
        history: one dict per epoch: ``train_*``, then ``val_*`` when there is
            a validation split, else ``test_*`` (the tutorials' per-epoch test
            evaluation), plus what callbacks logged.
        summary: the run's final numbers (test metrics, steps, seconds, ...).
        model: the model object passed to ``fit``, now holding ``state``'s weights.
        transform: the on-device preprocessing the run used (``None``: none).
        output: the output kind (``"logits"``, ``"binary"``, ``"regression"``, ...).
    """

    graphdef: nnx.GraphDef
    state: TrainState
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nnx.Module | None = None
    transform: Transform | None = None
    output: str = "logits"

    def predict(self, x: Any, *, batch_size: int = 256) -> np.ndarray:
        """The model's outputs on ``x``, with the run's preprocessing (see :func:`jaxnet.predict`)."""
        from jaxnet.inference import predict

        return predict(self, x, batch_size=batch_size)


def evaluate_split(steps: FitSteps, state: TrainState, split: Split, plan: _Plan, batch_size: int) -> dict[str, float]:
    """:func:`jaxnet.training.evaluation.evaluate` of one split with the run's eval step and classes."""
    return evaluate(
        steps.eval,
        state,
        split.x,
        split.y,
        batch_size=batch_size,
        num_classes=plan.num_classes,
        binary=plan.output == "binary",
    )


def epoch_record(
    loop: FitLoop, plan: _Plan, epoch: int, train: dict[str, float], t0: float, eval_batch_size: int
) -> dict[str, Any]:
    """The epoch's record: train_* means, then val_* (or the tutorials' per-epoch test_*)."""
    record: dict[str, Any] = {"epoch": epoch + 1, "step": loop.run.step}
    record.update({f"train_{k}": v for k, v in train.items()})
    split = _epoch_eval_split(plan)
    if split is not None:
        scores = evaluate_split(loop.steps, loop.run.state, split, plan, eval_batch_size)
        record.update({f"{plan.eval_split}_{k}": v for k, v in scores.items()})
    record.update(epoch_seconds=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb())
    return record


def _epoch_eval_split(plan: _Plan) -> Split | None:
    """The split each epoch evaluates: validation, else the tutorials' per-epoch test, else none."""
    if plan.eval_split == "val":
        return plan.data.validation
    if plan.eval_split == "test":
        return plan.data.test
    return None


def end_epoch(loop: FitLoop, epoch: int, record: dict[str, Any]) -> None:
    """An epoch's record into the history and the logs, its checkpoint, and its line on stderr."""
    run, files = loop.run, loop.files
    run.history.append(record)
    files.logger.log(run.step, "epoch", record)
    files.logger.histograms(run.step, _param_arrays(_on_host(run.state.params)))
    loop.sums = {}
    loop.save(epoch + 1, 0, _checkpoint_metrics(record))
    if files.main:
        (tqdm.write if loop.progress else print)(_epoch_line(record), file=sys.stderr)


def finish(
    model: nnx.Module,
    loop: FitLoop,
    plan: _Plan,
    counter: CompileCounter,
    *,
    replaced: bool,
    precision: str,
    eval_batch_size: int,
) -> FitResult:
    """After the loop: the curves plot, the final scores, the user's model updated, the summary."""
    run, files, steps = loop.run, loop.files, loop.steps
    seconds = time.perf_counter() - loop.started  # saves included: the last one was waited for
    if files.workdir is not None and files.main:
        plot_curves(run.history, os.path.join(files.workdir, CURVES_FILE))
    val, test = _final_scores(loop, plan, eval_batch_size, replaced=replaced)
    _give_back(model, run.state, plan.transform)
    first = loop.compiles_after_first_epoch
    summary = {
        "model": model_name(model),
        "dataset": plan.data.name,
        "dataset_source": plan.data.source,
        "epochs": run.epochs,
        "epochs_run": len(run.history),
        "steps": run.step,
        "batch_size": loop.batch_size,
        "output": plan.output,
        "params": count_params(run.state.params),
        "params_sha256": _params_sha256(_on_host(run.state.params)),
        "train_seconds": round(seconds, 3),
        "checkpoint_seconds": round(files.blocked, 3),
        "num_devices": 1 if steps.mesh is None else int(steps.mesh.size),
        "num_processes": jax.process_count(),
        "precision": precision,
        "mode": "scan" if steps.scan is not None else "step",
        "resumed_from_step": files.resumed_from,
        "stopped_early": bool(run.stop_training),
        "compilations": counter.compiles,
        "steady_state_compilations": counter.compiles - (first if first is not None else counter.compiles),
        **{f"val_{k}": v for k, v in val.items()},
        "test_accuracy": None,
        **{f"test_{k}": v for k, v in test.items()},
    }
    return FitResult(
        graphdef=steps.graphdef,
        state=run.state,
        history=run.history,
        summary=summary,
        model=model,
        transform=plan.transform,
        output=plan.output,
    )


def _checkpoint_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    skip = ("epoch", "step", "epoch_seconds", "peak_rss_mb")
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))}


def _last_with_prefix(history: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    if not history:
        return {}
    return {k[len(prefix) :]: v for k, v in history[-1].items() if k.startswith(prefix)}


def _final_scores(
    loop: FitLoop, plan: _Plan, eval_batch_size: int, *, replaced: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary's validation and test metrics, of the final state.

    The last epoch's record when it evaluated the final state; evaluated
    anew when a callback replaced the state (``restore_best``). The test
    split is evaluated once, here, when epochs evaluated validation.
    """
    val = {} if replaced else _last_with_prefix(loop.run.history, "val_")
    if replaced and plan.data.validation is not None:
        val = evaluate_split(loop.steps, loop.run.state, plan.data.validation, plan, eval_batch_size)
    if plan.data.test is None:
        return val, {}
    if plan.eval_split == "test" and not replaced and loop.run.history:
        return val, _last_with_prefix(loop.run.history, "test_")
    return val, evaluate_split(loop.steps, loop.run.state, plan.data.test, plan, eval_batch_size)


def _give_back(model: nnx.Module, state: TrainState, transform: Transform | None) -> None:
    """The user's model object gets the trained weights (buffers of its own: later donation spares it)."""
    nnx.update(model, copy_state(state.params), copy_state(state.model_state))
    model.eval()
    _PREPROCESSING[model] = transform


def _params_sha256(params: Any) -> str:
    from jaxnet.checkpoint import integrity

    return integrity.params_sha256(params)


def _on_host(tree: Any) -> Any:
    """The whole of ``tree`` readable in this process; a collective when several processes run."""
    if jax.process_count() == 1:
        return tree
    from jaxnet.parallel.multiprocess import gather_to_host

    return gather_to_host(tree)


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _param_arrays(params: nnx.State) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(params)
    return {
        "/".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v) for path, v in flat
    }


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return "  ".join(parts)
