"""A run's model in its workdir: any model ``fit`` trained can be exported from its checkpoints.

:func:`jaxnet.fit` calls :func:`write_workdir_model` at the start of a run,
which lowers the forward function without its weights into ``W/model/``
(``forward.exported``, and ``model.json``: the weights' names, and the shapes
and dtypes of every variable a checkpoint holds). :func:`export_workdir`
(``jaxnet export --workdir W``) restores the chosen checkpoint's arrays in
that order and packs the same ``model.jaxexport`` as :func:`export_model`. A
workdir without ``model/`` (or an export for other platforms) rebuilds the
model from ``W/config.json`` instead: a jaxnet model by name, or
``package.module:factory`` with its ``model_kwargs``, as ``jaxnet train``
built it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, DataError
from jaxnet.export.lowering import (
    EXPORT_FORMAT,
    Transform,
    _check_export_args,
    _default_dtype,
    _describe,
    _key_impl,
    _named_arrays,
    _pack,
    lower_forward,
    make_forward,
)
from jaxnet.outputs import LOSSES, VALUE_KINDS

MODEL_DIR = "model"  # under a run's workdir: its forward function, written by write_workdir_model
_MODEL_INFO = "model.json"  # W/model/: input, output kind, weight names and the run's variables
_MODEL_MODULE = "forward.exported"  # W/model/: the serialized jax.export.Exported
_CONFIG_FILE = "config.json"  # jaxnet.checkpoint.workdir.CONFIG_FILE (not imported: the loader stays light)

logger = logging.getLogger("jaxnet.export")


# ---------------------------------------------------------------------------
# W/model: the forward function, recorded at the start of a run
# ---------------------------------------------------------------------------


def write_workdir_model(
    workdir: str | os.PathLike,
    graphdef: Any,
    params: Any,
    model_state: Any,
    *,
    input_shape: Sequence[int],
    input_dtype: str | np.dtype | None = None,
    transform: Transform | None = None,
    output: str = "logits",
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> pathlib.Path | None:
    """Records how to run the model in ``workdir/model/``, so ``jaxnet export`` needs none of its code.

    What :func:`jaxnet.fit` calls at the start of a run with a workdir (in
    process 0 only). It lowers the forward function (:func:`make_forward`,
    eval mode, preprocessing included, symbolic batch size) without its
    weights and writes it with the names, shapes and dtypes of the run's
    variables; ``jaxnet export --workdir W`` then restores any checkpoint's
    arrays into it. Only shapes and dtypes are read, so nothing is copied off
    the devices; it costs one lowering, no compilation. Files are replaced
    atomically.

    Args:
        workdir: the run's workdir.
        graphdef, params, model_state: ``nnx.split(model, nnx.Param, ...)``
            (``TrainState.params``/``model_state``, sharded or not).
        input_shape: one example's shape, e.g. ``(28, 28, 1)``.
        input_dtype: the stored examples' dtype (``"uint8"`` pixels); default
            ``"uint8"`` with a ``transform``, ``"float32"`` without.
        transform: the run's preprocessing (``train=False`` is applied).
        output: the model's output kind, as for :func:`export_model`.
        platforms: platforms to lower for.

    Returns:
        The ``workdir/model`` folder, or ``None`` when the model cannot be
        lowered (logged as a warning; the run goes on, and ``jaxnet export``
        then rebuilds registered and ``module:factory`` models from the config).

    Raises:
        ConfigError: bad arguments (shape, platforms, output kind), or the
            folder cannot be written.
    """
    shape = _check_export_args(input_shape, platforms, output)
    dtype = _default_dtype(input_dtype, transform)
    folder = pathlib.Path(workdir) / MODEL_DIR
    try:
        forward = make_forward(graphdef, params, model_state, transform=transform)
        exported = lower_forward(forward, input_shape=shape, input_dtype=dtype, platforms=platforms)
    except ConfigError as exc:
        (folder / _MODEL_INFO).unlink(missing_ok=True)  # an earlier run's model is not this one
        logger.warning("cannot record the model for 'jaxnet export' (%s); training goes on", exc)
        return None
    module = bytes(exported.serialize())
    info = {
        "format": EXPORT_FORMAT,
        "input_shape": list(shape),
        "input_dtype": dtype,
        "output": output,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "module_sha256": hashlib.sha256(module).hexdigest(),
        "weights": list(forward.names),
        "variables": list(forward.variables),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ((_MODEL_MODULE, module), (_MODEL_INFO, json.dumps(info).encode())):
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)  # model.json last: it names the module's digest
    except OSError as exc:
        raise ConfigError(f"cannot write {folder}: {exc.strerror or exc}; choose a writable --workdir") from None
    return folder


def read_workdir_model(workdir: str | os.PathLike) -> tuple[Any, dict[str, Any]] | None:
    """The lowered forward function and its description from ``workdir/model/``, or ``None`` if absent.

    Raises:
        DataError: the files are damaged (the module's SHA-256 differs, or
            either cannot be read).
    """
    folder = pathlib.Path(workdir) / MODEL_DIR
    if not (folder / _MODEL_INFO).is_file():
        return None
    try:
        info = json.loads((folder / _MODEL_INFO).read_text(encoding="utf-8"))
        module = (folder / _MODEL_MODULE).read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{folder} is damaged ({type(exc).__name__}: {exc}); rerun the training to rewrite it"
        ) from None
    if hashlib.sha256(module).hexdigest() != info.get("module_sha256"):
        raise DataError(f"{folder / _MODEL_MODULE} is damaged (SHA-256 mismatch); rerun the training to rewrite it")
    try:
        exported = jax.export.deserialize(bytearray(module))
    except Exception as exc:
        raise DataError(f"{folder / _MODEL_MODULE} cannot be read ({type(exc).__name__}: {exc})") from None
    return exported, info


def _abstract_variables(variables: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dicts of ``ShapeDtypeStruct`` shaped like the run's ``(params, model_state)``."""
    trees: dict[str, dict[str, Any]] = {"params": {}, "model_state": {}}
    for v in variables:
        dtype = _key_impl(v["dtype"])[1] if v["dtype"].startswith("key<") else jnp.dtype(v["dtype"])
        node = trees[v["part"]]
        *parents, last = v["path"]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = jax.ShapeDtypeStruct(tuple(v["shape"]), dtype)
    return trees["params"], trees["model_state"]


# ---------------------------------------------------------------------------
# Export from a workdir: the recorded (or rebuilt) function and a checkpoint's weights
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """An export's function and what its weights are restored into."""

    exported: Any  # the lowered forward function (jax.export.Exported)
    names: tuple[str, ...]  # its weights, in argument order
    abstract: tuple[Any, Any]  # (params, model_state) shaped like the run's checkpoints
    input_shape: tuple[int, ...]
    input_dtype: str
    output: str
    how: str  # "recorded" (W/model) or "rebuilt" (from config.json)


def _recorded_source(recorded: tuple[Any, dict[str, Any]]) -> _Source:
    exported, info = recorded
    return _Source(
        exported,
        tuple(info["weights"]),
        _abstract_variables(info["variables"]),
        tuple(info["input_shape"]),
        info["input_dtype"],
        info["output"],
        "recorded",
    )


def _rebuilt_source(workdir: str | os.PathLike, config: Mapping[str, Any], platforms: Sequence[str]) -> _Source | None:
    """The model rebuilt as ``jaxnet train`` builds it, or ``None`` when the config names no code jaxnet can find."""
    from flax import nnx

    from jaxnet import models
    from jaxnet.checkpoint import workdir as workdir_lib
    from jaxnet.data.transforms import make_image_transform

    name = config.get("model")
    if not isinstance(name, str):
        return None
    by_class = {spec.cls.__name__: key for key, spec in models.MODELS.items()}  # jaxnet.fit records the class
    registered = name if name in models.MODELS else by_class.get(name)
    if registered is None and ":" not in name:
        return None
    spec = models.MODELS[registered] if registered is not None else None
    where = f"{workdir}/{workdir_lib.CONFIG_FILE}"
    loss = config.get("loss")
    loss_output = LOSSES.get(loss) if isinstance(loss, str) else None
    output = config.get("output") or loss_output or (spec.output if spec else "logits")
    shape = tuple(config.get("input_shape") or (spec.input_shape if spec else ()))
    if not shape:
        raise ConfigError(f"{where} records no input_shape")
    dtype = config.get("input_dtype") or ("float32" if output in VALUE_KINDS else "uint8")
    transform = None
    if dtype == "uint8":
        if not config.get("mean") or not config.get("std"):
            raise ConfigError(
                f"{where} lacks the input normalization ('mean' and 'std'); it was not written by jaxnet train"
            )
        transform = make_image_transform(tuple(config["mean"]), tuple(config["std"]))
    model = models.build_model(registered or name, seed=int(config.get("seed", 0)), kwargs=config.get("model_kwargs"))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax types nnx.split's result as a variadic tuple
    forward = make_forward(graphdef, params, model_state, transform=transform)
    exported = lower_forward(forward, input_shape=shape, input_dtype=dtype, platforms=platforms)
    return _Source(exported, forward.names, (params, model_state), shape, dtype, output, "rebuilt")


def _export_source(workdir: str | os.PathLike, config: Mapping[str, Any], platforms: Sequence[str]) -> _Source:
    """``W/model`` when it covers ``platforms`` (any model), else the model rebuilt from ``config.json``."""
    recorded = read_workdir_model(workdir)
    if recorded is not None and set(platforms) <= set(recorded[1]["platforms"]):
        return _recorded_source(recorded)
    name = config.get("model")
    try:
        rebuilt = _rebuilt_source(workdir, config, platforms)
        why = "it names no jaxnet model or package.module:factory"
    except ConfigError as exc:
        rebuilt, why = None, str(exc)
    if rebuilt is not None:
        return rebuilt
    if recorded is not None:
        have = ",".join(recorded[1]["platforms"])
        raise ConfigError(
            f"{workdir}/{MODEL_DIR} was lowered for {have}, and the model {name!r} cannot be rebuilt for "
            f"{','.join(platforms)} ({why}); export with --platforms {have}"
        )
    raise ConfigError(
        f"{workdir} has no {MODEL_DIR}/ folder (jaxnet.fit writes one at the start of a run), and its model "
        f"{name!r} cannot be rebuilt from {os.path.basename(_CONFIG_FILE)} ({why}); rerun the training with this "
        "jaxnet, or export from Python with jaxnet.export.export_model(result.graphdef, result.state, ...)"
    )


def _restore_weights(
    workdir: str | os.PathLike, config: Mapping[str, Any], step: str | int, source: _Source
) -> tuple[int, list[np.ndarray], str]:
    """``(step, weights in the source's order, params_sha256)`` of the chosen checkpoint."""
    from jaxnet import checkpoint
    from jaxnet.checkpoint import workdir as workdir_lib

    ckpt = checkpoint.create_checkpoint_manager(
        workdir_lib.checkpoint_directory(workdir),
        read_only=True,
        best_metric=config.get("best_metric", checkpoint.DEFAULT_BEST_METRIC),
        best_mode=config.get("best_mode", "max"),
    )
    try:
        if step == "best" and checkpoint.best(ckpt) is None:
            step = "latest"  # no epoch-end checkpoint ranked yet
        step = checkpoint.resolve_step(ckpt, step)
        params, model_state, _ = checkpoint.restore_variables(ckpt, *source.abstract, step=step)
    finally:
        checkpoint.close(ckpt)
    arrays = _named_arrays(params, model_state)
    missing = [n for n in source.names if n not in arrays]
    if missing:
        raise ConfigError(
            f"checkpoint step {step} of {workdir} lacks the weights {missing[:3]}; it belongs to another model"
        )
    return step, [arrays[n] for n in source.names], checkpoint.params_sha256(params)


def export_workdir(
    workdir: str | os.PathLike, *, step: str | int = "best", platforms: Sequence[str] = ("cpu", "cuda")
) -> tuple[bytes, dict[str, Any]]:
    """A ``model.jaxexport`` of a run's checkpoint, from the run's workdir alone (``jaxnet export``).

    The function comes from ``W/model/`` (any model :func:`jaxnet.fit`
    trained, recorded by :func:`write_workdir_model`) when it was lowered
    for ``platforms``; else the model is rebuilt from ``W/config.json``
    (a jaxnet model, or ``package.module:factory`` with its
    ``model_kwargs``), as ``jaxnet train`` built it.

    Args:
        workdir: the run's workdir (``config.json`` and ``checkpoints/``).
        step: ``"best"`` (by the run's best metric, else the latest),
            ``"latest"`` or a step number.
        platforms: platforms the file must run on.

    Returns:
        ``(data, info)``: the file's bytes, and its JSON description as
        :func:`load_exported` reads it (``metadata`` names the model, data
        set, step, ``params_sha256`` and whether the function was
        ``"recorded"`` or ``"rebuilt"``).

    Raises:
        ConfigError: not a run's workdir, or a model that can be neither
            found in ``W/model/`` nor rebuilt (the message says what to do).
        jaxnet.checkpoint.CheckpointError: no such checkpoint step.
    """
    from jaxnet.checkpoint import workdir as workdir_lib

    config = workdir_lib.read_config(workdir)
    source = _export_source(workdir, config, platforms)
    step, weights, sha256 = _restore_weights(workdir, config, step, source)
    metadata = {
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "step": step,
        "params_sha256": sha256,
        "function": source.how,
    }
    info = _describe(
        source.exported,
        names=source.names,
        input_shape=source.input_shape,
        input_dtype=source.input_dtype,
        output=source.output,
        metadata=metadata,
    )
    return _pack(source.exported, weights, info), info
