"""Checkpoints of the whole training state, on Orbax, that resume a run exactly.

Counterpart of the tutorials' ``torch.save({"model": model.state_dict(),
"optimizer": optimizer.state_dict(), "epoch": epoch}, path)`` and
``load_state_dict``, with the guarantees a long run needs:

* the whole :class:`~jaxnet.state.TrainState` (parameters, optimizer state,
  model state, RNG key, step) is saved with a JSON record of everything else
  needed to resume (data position, run config, running metric sums);
* saves are asynchronous: :func:`save` returns once the arrays are copied to
  the host and the files are written in the background;
* the last ``max_to_keep`` checkpoints and the ``keep_best`` best ones by a
  chosen metric are kept (Orbax's ``LatestN`` and ``BestN`` policies);
* a save interrupted at any moment (``SIGKILL`` included) is invisible:
  Orbax writes into a ``<step>.orbax-checkpoint-tmp-*`` folder and renames it
  when complete, and only complete step folders are listed;
* a finished checkpoint whose bytes were later damaged is detected rather
  than restored as garbage. Each checkpoint records the SHA-256 of every array
  group (``state_sha256``, written atomically with the checkpoint) and, once
  the save is finished, of every file (``jaxnet_sha256.json``); restoring
  verifies both and raises :class:`CheckpointError` naming the step and the
  file. :func:`restore_latest_good` then falls back to the previous step;
* Orbax's INFO log lines stay out of the terminal.

Layout of a run's working directory (``--workdir W``)::

    W/config.json                    the run's config (check_workdir)
    W/checkpoints/<step>/state/      the TrainState arrays (Orbax, OCDBT)
    W/checkpoints/<step>/meta/       the JSON record (meta, metrics, digests)
    W/checkpoints/<step>/jaxnet_sha256.json   SHA-256 of every file
    W/checkpoints/corrupt/<step>/    damaged steps moved aside on fallback
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import pathlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxnet.errors import ConfigError, JaxnetError

logger = logging.getLogger("jaxnet.checkpoint")

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
CONFIG_FILE = "config.json"  # the run's config, under its workdir
MANIFEST_FILE = "jaxnet_sha256.json"  # per-file SHA-256, inside each finished step folder
QUARANTINE_DIR = "corrupt"  # damaged steps are moved here, under the checkpoint folder
DEFAULT_BEST_METRIC = "test_accuracy"  # what `jaxnet train` ranks checkpoints by
_RECORD_FORMAT = 1


class CheckpointError(JaxnetError):
    """A checkpoint is missing, unreadable, damaged or cannot be written.

    The message names the step and, where one is to blame, the file.
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint does not fit the state it is restored into.

    Raised when the arrays differ in number, shape or dtype, e.g. a different
    model or optimizer; never a reason to fall back to an older step.
    """


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """An Orbax ``CheckpointManager`` and the few facts jaxnet keeps beside it.

    Made by :func:`create_checkpoint_manager`; pass it to :func:`save`,
    :func:`restore`, :func:`latest`, :func:`best`, :func:`wait` and
    :func:`close`.

    Attributes:
        manager: the underlying ``orbax.checkpoint.CheckpointManager``.
        directory: the folder holding one sub-folder per step.
        best_metric: the metric that ranks checkpoints, or ``None``.
        best_mode: ``"max"`` or ``"min"``: which end of ``best_metric`` is best.
        async_save: whether saves finish in the background.
        unsealed: steps saved by this process whose file manifest is still to
            be written (written once the save is finished).
    """

    manager: ocp.CheckpointManager
    directory: pathlib.Path
    best_metric: str | None
    best_mode: str
    async_save: bool
    unsealed: set[int] = dataclasses.field(default_factory=set)


# ---------------------------------------------------------------------------
# Orbax's log noise
# ---------------------------------------------------------------------------


class _OrbaxNoiseFilter(logging.Filter):
    """Drops Orbax's INFO/DEBUG records (~60 per save) and one harmless warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        # Saves without the ranking metric (mid-epoch ones) are intended.
        return "did not provide metrics" not in record.getMessage()


_ORBAX_NOISE_FILTER = _OrbaxNoiseFilter()


def _quiet_orbax() -> None:
    # Orbax logs through absl, i.e. the "absl" logger; adding the same filter
    # twice is a no-op, and nothing else about logging is changed.
    logging.getLogger("absl").addFilter(_ORBAX_NOISE_FILTER)


# ---------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------


def params_sha256(params: Any) -> str:
    """SHA-256 of a pytree of arrays, to compare two runs' results from outside.

    Definition: the leaves of ``params`` are taken in ``jax.tree.leaves``
    order (for an ``nnx.State``: sorted by module path, then variable name);
    each is converted with ``np.asarray`` and contributes its raw bytes in C
    order and native byte order (``np.asarray(x).tobytes()``, little-endian
    on x86 and ARM); the digest is the hex SHA-256 of their concatenation.
    Shapes and dtypes are not hashed, only the bytes, so two runs agree
    exactly when every parameter is bit-identical.

    Args:
        params: any pytree of arrays, e.g. ``state.params``.

    Returns:
        64 lowercase hex digits.

    Example:
        >>> import numpy as np
        >>> params_sha256({"w": np.zeros(2, np.float32)})[:16]
        'af5570f5a1810b7a'
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def _fields(state: Any) -> dict[str, Any]:
    """A state's top-level parts, each digested on its own."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if isinstance(state, Mapping):
        return {str(k): v for k, v in state.items()}
    return {"state": state}


def _shapes(tree: Any) -> list[list[Any]]:
    return [[list(np.shape(x)), str(np.dtype(x.dtype))] for x in jax.tree.leaves(tree)]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------


def _metric_fn(name: str, mode: str):
    worst = -math.inf if mode == "max" else math.inf

    def metric(metrics: Any) -> float:
        # A missing or NaN metric ranks last instead of crashing the ranking.
        value = metrics.get(name) if isinstance(metrics, Mapping) else None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            return worst
        return float(value)

    return metric


def create_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    keep_best: int = 1,
    async_save: bool = True,
    read_only: bool = False,
) -> Checkpointer:
    """Opens (creating if needed) a folder of checkpoints.

    Counterpart of choosing where ``torch.save`` writes, plus the retention
    rules of Lightning's ``ModelCheckpoint(save_top_k=..., monitor=...)``.
    Leftovers of saves that were interrupted (``<step>.orbax-checkpoint-tmp-*``)
    are deleted when the folder is opened for writing.

    Args:
        directory: the checkpoint folder, e.g. ``W/checkpoints``.
        max_to_keep: the newest checkpoints to keep (>= 1).
        best_metric: metric name in :func:`save`'s ``metrics`` that ranks
            checkpoints, e.g. ``"test_accuracy"``; ``None`` keeps only the newest.
        best_mode: ``"max"`` or ``"min"``: which values of ``best_metric`` are best.
        keep_best: how many of the best checkpoints to keep besides the newest.
            Checkpoints saved without the metric are kept only while among
            the newest ``max_to_keep``.
        async_save: finish writing in a background thread.
        read_only: open an existing folder without ever writing or deleting.

    Returns:
        A :class:`Checkpointer`; :func:`close` it when done.

    Raises:
        ConfigError: bad retention settings.
        CheckpointError: the folder cannot be created, or does not exist in
            ``read_only`` mode.

    Example:
        >>> ckpt = create_checkpoint_manager("/tmp/run/checkpoints", best_metric="test_accuracy")
        >>> latest(ckpt) is None
        True
        >>> close(ckpt)
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ConfigError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ConfigError(f"keep_best must be an integer >= 0, got {keep_best!r}")
    if best_mode not in ("max", "min"):
        raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    path = pathlib.Path(directory).absolute()
    if read_only and not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    _quiet_orbax()
    policies: list[Any] = [ocp_policies.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
        best_fn = _metric_fn(best_metric, best_mode)
        policies.append(ocp_policies.BestN(
            get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
            keep_checkpoints_without_metrics=False,
        ))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    with _orbax_errors(f"opening the checkpoint folder {path}"):
        manager = ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))
    return Checkpointer(manager, path, best_metric, best_mode, async_save)


@contextlib.contextmanager
def _orbax_errors(action: str) -> Iterator[None]:
    """Turns Orbax's and the OS's exceptions into one-line CheckpointErrors."""
    try:
        yield
    except JaxnetError:
        raise
    except Exception as exc:  # Orbax/TensorStore raise bare Exception and ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{action} failed: {type(exc).__name__}: {first}") from exc


def _step_dir(ckpt: Checkpointer, step: int) -> pathlib.Path:
    return ckpt.directory / str(step)


def steps(ckpt: Checkpointer) -> list[int]:
    """Every finished checkpoint's step, ascending."""
    return sorted(ckpt.manager.all_steps())


def latest(ckpt: Checkpointer) -> int | None:
    """The newest finished checkpoint's step, or ``None``; interrupted saves never count."""
    return ckpt.manager.latest_step()


def best(ckpt: Checkpointer) -> int | None:
    """The step of the best checkpoint by ``best_metric``, or ``None``.

    ``None`` when no metric was chosen or no kept checkpoint was saved with it.
    """
    if ckpt.best_metric is None:
        return None
    # Orbax ranks only checkpoints saved with metrics, and save() passes the
    # metric only when it is a finite number.
    return ckpt.manager.best_step()


def _seal(ckpt: Checkpointer) -> None:
    """Writes the file manifest of every finished step this process saved."""
    for step in sorted(ckpt.unsealed):
        folder = _step_dir(ckpt, step)
        ckpt.unsealed.discard(step)
        if not folder.is_dir():  # already deleted by the retention policy
            continue
        files = {
            str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_sha256(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_FILE, f".{MANIFEST_FILE}.tmp")
        }
        tmp = folder / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
        os.replace(tmp, folder / MANIFEST_FILE)  # atomic: a manifest is whole or absent


def wait(ckpt: Checkpointer) -> None:
    """Blocks until every pending save is finished and verified-to-be-written.

    Raises:
        CheckpointError: a background save failed (disk full, permissions...).
    """
    with _orbax_errors(f"writing checkpoints to {ckpt.directory}"):
        ckpt.manager.wait_until_finished()
        _seal(ckpt)


def close(ckpt: Checkpointer) -> None:
    """Finishes pending saves (:func:`wait`) and releases the manager."""
    try:
        wait(ckpt)
    finally:
        ckpt.manager.close()


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------


def _record(state: Any, meta: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON saved with the arrays: meta, metrics and the state's digests."""
    if not isinstance(meta, Mapping):
        raise ConfigError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    body = {
        "format": _RECORD_FORMAT,
        "meta": dict(meta),
        "metrics": None if metrics is None else dict(metrics),
        "state_sha256": {k: params_sha256(v) for k, v in _fields(state).items()},
        "state_shapes": {k: _shapes(v) for k, v in _fields(state).items()},
    }
    try:
        body["record_sha256"] = hashlib.sha256(_canonical(body).encode()).hexdigest()
    except TypeError as exc:
        raise ConfigError(
            f"checkpoint meta and metrics must be JSON (dicts, lists, str, int, float, bool, None): "
            f"{exc}; convert arrays with float(x) or x.tolist()"
        ) from None
    return body


def save(
    ckpt: Checkpointer,
    step: int,
    state: Any,
    *,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Saves ``state`` as checkpoint ``step``, asynchronously.

    Counterpart of ``torch.save({"model": ..., "optimizer": ..., ...}, path)``.
    Returns once the arrays are copied off the device (the caller may then
    donate or delete ``state``); the files are written in the background and
    the checkpoint appears in :func:`latest` only when complete. Older
    checkpoints are deleted according to the retention rules once this one is
    complete, never before.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        step: the checkpoint's number, normally ``int(state.step)``; at most
            one save per step.
        state: a pytree of arrays, normally a :class:`~jaxnet.state.TrainState`.
        meta: JSON-serializable dict with everything else needed to resume,
            e.g. ``{"epoch": 1, "batch_in_epoch": 7, "seed": 0, "config":
            {...}, "train_sums": {"loss": 12.5}}`` (floats round-trip exactly).
        metrics: numbers describing this checkpoint, e.g. ``{"test_accuracy":
            0.97}`` at an epoch end; the ``best_metric`` among them ranks it.

    Raises:
        ConfigError: ``meta``/``metrics`` are not JSON, or a negative step.
        CheckpointError: ``step`` is already saved, or writing failed.
    """
    if isinstance(step, bool) or int(step) != step or int(step) < 0:
        raise ConfigError(f"checkpoint step must be an integer >= 0, got {step!r}")
    step = int(step)
    record = _record(state, meta, metrics)  # waits for the state's values (a host copy)
    tracked = None
    if ckpt.best_metric is not None and metrics is not None:
        if math.isfinite(_metric_fn(ckpt.best_metric, ckpt.best_mode)(metrics)):
            tracked = {ckpt.best_metric: float(metrics[ckpt.best_metric])}
    wait(ckpt)  # Orbax would wait for the previous save anyway; seal it first
    if step in ckpt.manager.all_steps():
        raise CheckpointError(
            f"checkpoint step {step} already exists in {ckpt.directory}; save each step once "
            "(an epoch-end save replaces the periodic save of the same step)"
        )
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record))
    with _orbax_errors(f"saving checkpoint step {step} to {ckpt.directory}"):
        ckpt.manager.save(step, args=args, metrics=tracked, force=True)
    ckpt.unsealed.add(step)
    if not ckpt.async_save:
        wait(ckpt)


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


def _resolve(ckpt: Checkpointer, step: int | str | None) -> int:
    available = steps(ckpt)
    if step is None or step == "latest":
        if not available:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        return available[-1]
    if step == "best":
        found = best(ckpt)
        if found is None:
            metric = ckpt.best_metric or "(no best_metric chosen)"
            raise CheckpointError(
                f"no checkpoint in {ckpt.directory} is ranked by {metric}; "
                f"use 'latest' or one of the steps {available}"
            )
        return found
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in available:
        raise CheckpointError(
            f"no checkpoint step {step!r} in {ckpt.directory}; available: {available or 'none'}"
        )
    return int(step)


def verify_files(ckpt: Checkpointer, step: int) -> None:
    """Checks every file of a finished step against its recorded size and SHA-256.

    A step finished but never sealed (the process died just after the save)
    has no manifest; it is then checked by the array digests alone.

    Raises:
        CheckpointError: naming the step and the first missing, truncated or
            altered file.
    """
    folder = _step_dir(ckpt, step)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint step {step} is damaged: {manifest_path} is unreadable ({exc})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint step {step} is damaged: {path} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"checkpoint step {step} is damaged: {path} has {size} bytes, "
                f"{expected['size']} were written (truncated or overwritten)"
            )
        if _file_sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint step {step} is damaged: the bytes of {path} changed after "
                "it was written (SHA-256 mismatch)"
            )


def _read_record(ckpt: Checkpointer, step: int) -> dict[str, Any]:
    with _orbax_errors(f"reading checkpoint step {step} ({_step_dir(ckpt, step) / 'meta'})"):
        record = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
        raise CheckpointError(
            f"checkpoint step {step} has no jaxnet record in {_step_dir(ckpt, step) / 'meta'}; "
            "it was not written by jaxnet.checkpoint.save"
        )
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    if hashlib.sha256(_canonical(body).encode()).hexdigest() != record.get("record_sha256"):
        raise CheckpointError(
            f"checkpoint step {step} is damaged: {_step_dir(ckpt, step) / 'meta'} does not "
            "match its recorded SHA-256"
        )
    return record


def _check_shapes(record: dict[str, Any], target: Any, step: int, names: Collection[str]) -> None:
    fields = _fields(target)
    for name in names:
        saved, wanted = record["state_shapes"].get(name), _shapes(fields[name])
        if saved != wanted:
            raise CheckpointMismatchError(
                f"checkpoint step {step} does not fit: its {name} holds {len(saved or [])} arrays "
                f"{_brief(saved)}, the state to restore into has {len(wanted)} arrays "
                f"{_brief(wanted)}; restore with the model and optimizer of the saved run"
            )


def _brief(shapes: list[list[Any]] | None) -> str:
    shapes = shapes or []
    text = ", ".join(f"{tuple(s)} {d}" for s, d in shapes[:4])
    return f"[{text}{', ...' if len(shapes) > 4 else ''}]"


def _check_digests(record: dict[str, Any], restored: Any, step: int, names: Collection[str], where: pathlib.Path) -> None:
    fields = _fields(restored)
    for name in names:
        if params_sha256(fields[name]) != record["state_sha256"].get(name):
            raise CheckpointError(
                f"checkpoint step {step} is damaged: the {name} arrays read from {where} "
                "differ from the ones saved (SHA-256 mismatch)"
            )


def restore(
    ckpt: Checkpointer, abstract_state: Any, *, step: int | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure of ``abstract_state``.

    Counterpart of ``model.load_state_dict(ckpt["model"])`` plus
    ``optimizer.load_state_dict(ckpt["optimizer"])``. The restore always has a
    target, so optax's NamedTuple states come back as NamedTuples and arrays
    land on the target's devices. The files and the arrays are verified
    against the SHA-256 digests recorded at save time.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        abstract_state: a state of the right structure: a live one (e.g. a
            fresh ``create_train_state``), ``jax.eval_shape`` of one, or
            ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``.
        step: ``None`` or ``"latest"``, ``"best"``, or a step number.

    Returns:
        ``(state, meta)``: the restored state and the ``meta`` dict given to
        :func:`save`.

    Raises:
        CheckpointMismatchError: the checkpoint holds other shapes or dtypes.
        CheckpointError: no such checkpoint, or it is damaged (the message
            names the step and the file).
    """
    step = _resolve(ckpt, step)
    wait(ckpt)
    verify_files(ckpt, step)
    record = _read_record(ckpt, step)
    names = list(_fields(abstract_state))
    _check_shapes(record, abstract_state, step, names)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    where = _step_dir(ckpt, step) / "state"
    with _orbax_errors(f"restoring checkpoint step {step} from {where}"):
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    _check_digests(record, state, step, names, where)
    return state, record["meta"]


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _fill(abstract: Any, raw: Any, step: int, what: str) -> Any:
    """Puts the arrays of a target-less restore into ``abstract``'s structure."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, ref in leaves_with_paths:
        node = raw
        for key in path:
            name = _key_name(key)
            if isinstance(node, Mapping):
                node = node.get(name, node.get(str(name)))
            elif isinstance(node, (list, tuple)) and isinstance(name, int) and name < len(node):
                node = node[name]
            else:
                node = None
            if node is None:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} has no {what} array {jax.tree_util.keystr(path)}; "
                    "restore with the model of the saved run"
                )
        leaves.append(np.asarray(node))
    return jax.tree.unflatten(treedef, leaves)


def restore_variables(
    ckpt: Checkpointer, abstract_params: Any, abstract_model_state: Any, *, step: int | str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only a checkpoint's model variables, without its optimizer state.

    For deployment (``jaxnet export``): no optimizer has to be rebuilt, since
    the optimizer state is read without a target and dropped. The parameters
    and model state are verified like :func:`restore`'s.

    Args:
        ckpt: from :func:`create_checkpoint_manager` (``read_only=True`` is fine).
        abstract_params, abstract_model_state: ``nnx.split(model, nnx.Param, ...)``
            of the model the run trained, or their ``jax.eval_shape``.
        step: ``None``/``"latest"``, ``"best"`` or a step number.

    Returns:
        ``(params, model_state, meta)`` with numpy arrays as leaves.

    Raises:
        CheckpointMismatchError, CheckpointError: as :func:`restore`.
    """
    step = _resolve(ckpt, step)
    wait(ckpt)
    verify_files(ckpt, step)
    record = _read_record(ckpt, step)
    wanted = {"params": abstract_params, "model_state": abstract_model_state}
    _check_shapes(record, wanted, step, list(wanted))
    where = _step_dir(ckpt, step) / "state"
    with _orbax_errors(f"restoring checkpoint step {step} from {where}"):
        raw = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    restored = {name: _fill(tree, raw.get(name, {}), step, name) for name, tree in wanted.items()}
    _check_digests(record, restored, step, list(wanted), where)
    return restored["params"], restored["model_state"], record["meta"]


def _quarantine(ckpt: Checkpointer, bad_steps: list[int]) -> pathlib.Path:
    """Moves damaged step folders aside so that the resumed run can save those steps again."""
    target_dir = ckpt.directory / QUARANTINE_DIR
    target_dir.mkdir(exist_ok=True)
    for step in bad_steps:
        target, n = target_dir / str(step), 0
        while target.exists():
            n += 1
            target = target_dir / f"{step}.{n}"
        os.replace(_step_dir(ckpt, step), target)
    ckpt.manager.reload()
    return target_dir


def restore_latest_good(ckpt: Checkpointer, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that is sound, skipping damaged ones.

    What ``--resume`` calls. Each skipped step is logged (logger
    ``jaxnet.checkpoint``, WARNING) with the reason; once an older step
    restores, the skipped folders are moved to ``<directory>/corrupt/<step>``
    (nothing is deleted) so the resumed run can write those steps anew.

    Args:
        ckpt: from :func:`create_checkpoint_manager`.
        abstract_state: as for :func:`restore`.

    Returns:
        ``(state, meta)``, or ``None`` when there is no checkpoint at all (a
        run killed before its first save starts from scratch).

    Raises:
        CheckpointMismatchError: the checkpoints belong to another model.
        CheckpointError: every checkpoint is damaged (each one is named).
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(steps(ckpt)):
        try:
            state, meta = restore(ckpt, abstract_state, step=step)
        except CheckpointMismatchError:
            raise
        except CheckpointError as exc:
            logger.warning("skipping checkpoint step %d: %s", step, exc)
            skipped.append((step, str(exc)))
            continue
        if skipped:
            where = _quarantine(ckpt, [s for s, _ in skipped])
            logger.warning(
                "resuming from checkpoint step %d; the damaged step(s) %s were moved to %s",
                step, ", ".join(str(s) for s, _ in skipped), where,
            )
        return state, meta
    if skipped:
        raise CheckpointError(
            f"no sound checkpoint in {ckpt.directory}: "
            + "; ".join(reason for _, reason in skipped)
            + ". Start a fresh run with another --workdir"
        )
    return None


# ---------------------------------------------------------------------------
# The run's working directory
# ---------------------------------------------------------------------------


def checkpoint_directory(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run's checkpoints live: ``workdir/checkpoints``."""
    return pathlib.Path(workdir) / CHECKPOINT_DIR


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The config a run wrote to ``workdir/config.json``.

    Raises:
        ConfigError: no such file (not a jaxnet run's workdir).
        CheckpointError: the file is not a JSON object.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{pathlib.Path(workdir)} holds no jaxnet run ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is damaged: expected a JSON object")
    return config


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Collection[str]) -> list[str]:
    missing = object()
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [
        f"{k}: {saved.get(k, '(unset)')!r} in the saved run, {current.get(k, '(unset)')!r} now"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def _write_config(path: pathlib.Path, config: dict[str, Any]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path / CONFIG_FILE)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the workdir {path}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}; choose a writable --workdir"
        ) from None


def check_workdir(
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    resume: bool,
    mutable_keys: Collection[str] = (),
) -> pathlib.Path:
    """Validates a run's working directory and records the run's config in it.

    A fresh run (``resume=False``) needs a new or empty-of-runs workdir; a
    resumed one needs the workdir of a run with the same config. Nothing in
    an existing workdir is changed when the check fails.

    Args:
        workdir: the ``--workdir`` folder.
        config: JSON-serializable description of the run, at least what makes
            runs incompatible: ``model``, ``dataset``, hyper-parameters, seed,
            and for ``jaxnet export`` the input ``mean``/``std``.
        resume: whether this run continues the one in ``workdir``.
        mutable_keys: config keys that may change on resume (e.g.
            ``("epochs",)`` to extend a run); the new values are recorded.

    Returns:
        The workdir's path.

    Raises:
        ConfigError: the workdir is a file, cannot be written, holds another
            run (the differing keys are named), already holds this run and
            ``resume`` is False, or does not exist and ``resume`` is True.
    """
    path = pathlib.Path(workdir)
    try:
        current = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the run config must be JSON: {exc}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a folder; choose another --workdir")
    has_run = (path / CONFIG_FILE).is_file()
    if resume:
        if not path.is_dir():
            raise ConfigError(
                f"cannot resume: the workdir {path} does not exist; start the run without "
                "--resume, or pass the --workdir of an earlier run"
            )
        if not has_run:
            raise ConfigError(
                f"cannot resume: {path} holds no jaxnet run ({CONFIG_FILE} is missing); start "
                "the run without --resume"
            )
        diff = _differences(read_config(path), current, mutable_keys)
        if diff:
            raise ConfigError(
                f"cannot resume the run in {path} with other settings ({'; '.join(diff)}); "
                "rerun with the saved run's flags, or use another --workdir"
            )
    elif has_run:
        diff = _differences(read_config(path), current, ())
        if diff:
            raise ConfigError(
                f"the workdir {path} holds another run ({'; '.join(diff)}); use another "
                "--workdir, or --resume with that run's flags to continue it"
            )
        raise ConfigError(
            f"the workdir {path} already holds this run; pass --resume to continue it, or use "
            "another --workdir to start afresh"
        )
    elif checkpoint_directory(path).is_dir() and any(checkpoint_directory(path).iterdir()):
        raise ConfigError(
            f"the workdir {path} holds checkpoints but no {CONFIG_FILE}; use another --workdir"
        )
    _write_config(path, current)
    return path


def rewind_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drops the records after ``step`` from a JSON-lines log, for a resumed run.

    The resumed run writes those records again, so the log ends up equal to
    an uninterrupted run's. A last line cut short by a kill is dropped too.
    The file is rewritten atomically.

    Args:
        path: e.g. ``workdir/metrics.jsonl``; a missing file is fine.
        step: the restored checkpoint's step; records with ``"step" <= step``
            (or without a step) are kept.

    Returns:
        The number of lines dropped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
