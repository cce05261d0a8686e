"""Restoring: choose the step, verify its files and record, read its arrays into the target, check digests.

Every restore verifies before it trusts: the files against the SHA-256
manifest written at save (:func:`verify_files`), the JSON record against its
own digest, the target's shapes and dtypes against the recorded ones (a
different model is a :class:`CheckpointMismatchError`, not damage), and the
arrays read back against the recorded digest of each part of the state.
Either array format is read, whatever the folder writes: Orbax's own (with
the target's shapes, dtypes and shardings) or ``arrays.npz`` (read on the
host and placed like the target).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxnet.checkpoint import arrays, integrity
from jaxnet.checkpoint.errors import CheckpointError, CheckpointMismatchError
from jaxnet.checkpoint.folder import CheckpointFolder, best, metric_fn, step_dir, steps
from jaxnet.checkpoint.orbax_glue import orbax_errors
from jaxnet.checkpoint.saving import nonfinite_leaf, wait

logger = logging.getLogger("jaxnet.checkpoint")

STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's JSON of each step (item handlers, time stamps)


def resolve_step(ckpt: CheckpointFolder, step: int | str | None) -> int:
    """The step number that ``step`` (``None``/``"latest"``, ``"best"`` or a number) names.

    ``"latest"`` and ``"best"`` name the newest (best ranked) checkpoint
    whose state is finite, passing over one that holds NaN/inf with a
    warning. The ``finite`` flag recorded at save makes that a read of the
    JSON record; a checkpoint saved without the flag (before it existed, or
    by a multi-process run) has its arrays read and checked. A step given
    by number is returned as it is.

    Raises:
        CheckpointError: no checkpoint at all, none ranked (for ``"best"``),
            none finite, or no such step (the available ones are listed).
    """
    available = steps(ckpt)
    if step is None or step == "latest":
        if not available:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        return _first_finite(ckpt, available[::-1], "latest")
    if step == "best":
        found = best(ckpt)
        if found is None:
            metric = ckpt.best_metric or "(no best_metric chosen)"
            raise CheckpointError(
                f"no checkpoint in {ckpt.directory} is ranked by {metric}; use 'latest' or one of the steps {available}"
            )
        if _nonfinite_problem(ckpt, found) is None:
            return found
        return _first_finite(ckpt, _ranked(ckpt, available), "best")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in available:
        raise CheckpointError(f"no checkpoint step {step!r} in {ckpt.directory}; available: {available or 'none'}")
    return int(step)


def _ranked(ckpt: CheckpointFolder, available: list[int]) -> list[int]:
    """The steps ranked by ``best_metric``, best first (ties: the newest first), as Orbax ranks them."""
    if ckpt.best_metric is None:
        return []
    score = metric_fn(ckpt.best_metric, ckpt.best_mode)
    sign = 1 if ckpt.best_mode == "max" else -1
    ranked = []
    for step in available:
        value = score(ckpt.manager.metrics(step) or {})
        if math.isfinite(value):
            ranked.append((sign * value, step))
    return [step for _, step in sorted(ranked, reverse=True)]


def _first_finite(ckpt: CheckpointFolder, candidates: list[int], what: str) -> int:
    problems: list[str] = []
    for step in candidates:
        problem = _nonfinite_problem(ckpt, step)
        if problem is None:
            if problems:
                logger.warning("%s; the %s finite checkpoint is step %d", "; ".join(problems), what, step)
            return step
        problems.append(problem)
    raise CheckpointError(f"no checkpoint in {ckpt.directory} holds finite values: {'; '.join(problems)}")


def nonfinite_reason(step: int, leaf: str | None) -> str:
    return f"checkpoint step {step} holds non-finite values (NaN/inf) in {leaf or 'its state'}"


def _nonfinite_problem(ckpt: CheckpointFolder, step: int) -> str | None:
    """Why ``step`` is not finite, or ``None`` when it is (or cannot be read: restoring names the damage)."""
    try:
        record = read_record(ckpt, step)
        if record.get("finite") is True:
            return None
        if record.get("finite") is False:
            return nonfinite_reason(step, record.get("nonfinite"))
        leaf = nonfinite_leaf(_read_untargeted(ckpt, step, record))  # saved without the flag
    except CheckpointError:
        return None
    return None if leaf is None else nonfinite_reason(step, leaf)


def verify_files(ckpt: CheckpointFolder, step: int) -> None:
    """Checks every file of a finished step against the size and SHA-256 recorded at save.

    A step without a manifest (its writing failed) is checked by the array
    digests alone, in :func:`restore`. Orbax's ``_CHECKPOINT_METADATA``,
    which it rewrites at commit and so is not in the manifest, must be a
    JSON object.

    Raises:
        CheckpointError: naming the step and the first missing, truncated or
            altered file.
    """
    folder = step_dir(ckpt, step)
    problem = integrity.manifest_problem(folder) or step_metadata_problem(folder)
    if problem:
        raise CheckpointError(f"checkpoint step {step} is damaged: {problem}")


def step_metadata_problem(folder: pathlib.Path) -> str | None:
    """What is wrong with a step's ``_CHECKPOINT_METADATA`` (unreadable, not a JSON object), or ``None``."""
    path = folder / STEP_METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None  # older Orbax versions wrote none
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    try:
        metadata = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{path} is not valid JSON ({str(exc).splitlines()[0]})"
    return None if isinstance(metadata, dict) else f"{path} holds no JSON object"


def read_record(ckpt: CheckpointFolder, step: int) -> dict[str, Any]:
    """A step's JSON record, verified against its own digest: ``meta``, ``metrics``, ``finite``, the digests.

    Raises:
        CheckpointError: the record is unreadable or altered.
    """
    where = step_dir(ckpt, step) / "meta"
    with orbax_errors(f"reading checkpoint step {step} ({where})"):
        record = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    problem = integrity.record_problem(record)
    if problem:
        raise CheckpointError(f"checkpoint step {step} is damaged: {where} {problem}")
    return record


def _check_shapes(record: dict[str, Any], target: Any, step: int, names: Collection[str]) -> None:
    problem = integrity.shapes_problem(record, target, names)
    if problem:
        raise CheckpointMismatchError(
            f"checkpoint step {step} does not fit: {problem}; restore with the model and optimizer of the saved run"
        )


def _check_digests(
    record: dict[str, Any], restored: Any, step: int, names: Collection[str], where: pathlib.Path
) -> None:
    name = integrity.digest_problem(record, restored, names)
    if name:
        raise CheckpointError(
            f"checkpoint step {step} is damaged: the {name} arrays read from {where} differ "
            "from the ones saved (SHA-256 mismatch)"
        )


def _verified_record(ckpt: CheckpointFolder, step: int) -> dict[str, Any]:
    """The record of ``step`` once its pending save is finished and its files are verified."""
    wait(ckpt)
    verify_files(ckpt, step)
    return read_record(ckpt, step)


def restore(
    ckpt: CheckpointFolder, abstract_state: Any, *, step: int | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure of ``abstract_state``.

    Counterpart of ``model.load_state_dict(ckpt["model"])`` plus
    ``optimizer.load_state_dict(ckpt["optimizer"])``. The restore always has a
    target, so optax's NamedTuple states come back as NamedTuples and arrays
    land on the target's devices. The files and the arrays are verified
    against the SHA-256 digests recorded at save time.

    Args:
        ckpt: from ``create_checkpoint_manager``.
        abstract_state: a state of the right structure: a live one (e.g. a
            fresh ``create_train_state``), ``jax.eval_shape`` of one, or
            ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``.
        step: ``None`` or ``"latest"``, ``"best"``, or a step number.

    Returns:
        ``(state, meta)``: the restored state and the ``meta`` dict given to
        ``save``.

    Raises:
        CheckpointMismatchError: the checkpoint holds other shapes or dtypes.
        CheckpointError: no such checkpoint, or it is damaged (the message
            names the step and the file).
    """
    state, record = restore_step(ckpt, abstract_state, resolve_step(ckpt, step))
    return state, record["meta"]


def restore_step(
    ckpt: CheckpointFolder, abstract_state: Any, step: int, *, finite_only: bool = False
) -> tuple[Any, dict[str, Any]]:
    """:func:`restore` of a step number; returns the whole record.

    ``finite_only`` raises CheckpointError for a state holding NaN/inf, from
    its record's flag before any array is read, or by checking the restored
    arrays when the record has no flag.
    """
    record = _verified_record(ckpt, step)
    if finite_only and record.get("finite") is False:
        raise CheckpointError(nonfinite_reason(step, record.get("nonfinite")))
    names = list(integrity.state_parts(abstract_state))
    _check_shapes(record, abstract_state, step, names)
    stored = integrity.key_data_tree(abstract_state)  # what was written: typed keys as their key data
    target = jax.tree.map(_restore_target, stored)
    where = step_dir(ckpt, step) / "state"
    if (where / arrays.ARRAYS_FILE).is_file():
        where = where / arrays.ARRAYS_FILE
        host = arrays.fill(stored, arrays.nest(arrays.read_npz(where, step)), step, "state")
        _check_digests(record, host, step, names, where)
        state = jax.tree.map(_place, host, target)
    else:  # Orbax's format: the default, and what a state spread over processes always gets
        with orbax_errors(f"restoring checkpoint step {step} from {where}"):
            state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        _check_digests(record, state, step, names, where)
    if finite_only and "finite" not in record:
        leaf = nonfinite_leaf(state)
        if leaf is not None:
            raise CheckpointError(nonfinite_reason(step, leaf))
    return _wrap_keys(state, abstract_state), record


def restore_variables(
    ckpt: CheckpointFolder, abstract_params: Any, abstract_model_state: Any, *, step: int | str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Restores only a checkpoint's model variables, without its optimizer state.

    For deployment (``jaxnet export``): no optimizer has to be rebuilt, since
    the optimizer state is read without a target and dropped. The parameters
    and model state are verified like :func:`restore`'s.

    Args:
        ckpt: from ``create_checkpoint_manager`` (``read_only=True`` is fine).
        abstract_params, abstract_model_state: ``nnx.split(model, nnx.Param, ...)``
            of the model the run trained, or their ``jax.eval_shape``.
        step: ``None``/``"latest"``, ``"best"`` or a step number.

    Returns:
        ``(params, model_state, meta)`` with numpy arrays as leaves; a typed
        PRNG key of the model (an ``nnx.RngKey``) comes back as a JAX key
        array on the default device, since keys have no NumPy form.

    Raises:
        CheckpointMismatchError, CheckpointError: as :func:`restore`.
    """
    step = resolve_step(ckpt, step)
    record = _verified_record(ckpt, step)
    wanted = {"params": abstract_params, "model_state": abstract_model_state}
    _check_shapes(record, wanted, step, list(wanted))
    stored = integrity.key_data_tree(wanted)  # typed keys as the key data that was written
    where = step_dir(ckpt, step) / "state"
    if (where / arrays.ARRAYS_FILE).is_file():
        where = where / arrays.ARRAYS_FILE
        raw = arrays.nest(arrays.read_npz(where, step))
    else:
        raw = _read_orbax_untargeted(ckpt, step, where)
    restored = {name: arrays.fill(tree, raw.get(name, {}), step, name) for name, tree in stored.items()}
    _check_digests(record, restored, step, list(wanted), where)
    restored = _wrap_keys(restored, wanted)
    return restored["params"], restored["model_state"], record["meta"]


def _read_untargeted(ckpt: CheckpointFolder, step: int, record: dict[str, Any]) -> dict[str, Any]:
    """A step's arrays without a target: ``{"params/fc1/kernel/value": array, ...}`` or Orbax's nested dicts."""
    where = step_dir(ckpt, step) / "state"
    if not (where / arrays.ARRAYS_FILE).is_file():
        return _read_orbax_untargeted(ckpt, step, where)
    flat = arrays.read_npz(where / arrays.ARRAYS_FILE, step)
    return arrays.with_recorded_dtypes(flat, record.get("state_shapes", {}))


def _read_orbax_untargeted(ckpt: CheckpointFolder, step: int, where: pathlib.Path) -> Any:
    """A step in Orbax's format, read onto this process's first device (shapes from its metadata).

    Orbax restores without a target only onto the topology that saved it; a
    multi-process run's checkpoint is read whole by each process instead.
    """
    with orbax_errors(f"restoring checkpoint step {step} from {where}"):
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = ckpt.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        return ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def _wrap_keys(restored: Any, abstract: Any) -> Any:
    """``restored`` with the key data of each leaf that is a typed PRNG key in ``abstract`` wrapped back into a key.

    The key keeps the data's placement; its key type is the target's
    (``dtype=`` works for a live key and for a ``ShapeDtypeStruct`` alike).
    """

    def wrap(data: Any, ref: Any) -> Any:
        return jax.random.wrap_key_data(data, dtype=ref.dtype) if integrity.is_prng_key(ref) else data

    return jax.tree.map(wrap, restored, abstract)


def _place(array: np.ndarray, target: Any) -> Any:
    """A host array placed like ``target`` (a ``ShapeDtypeStruct`` with a sharding), on any number of processes."""
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return array
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _restore_target(leaf: Any) -> Any:
    """A leaf's restore target: its shape, dtype and placement (the default device when it has none).

    Without a placement Orbax would return whatever type was saved (NumPy
    arrays, as ``save`` writes them), not device arrays.
    """
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if isinstance(target, jax.ShapeDtypeStruct) and target.sharding is None:
        device = jax.local_devices()[0]
        target = jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    return target
