"""Loading: a ``model.jaxexport`` file back, run with nothing but jax and numpy.

Counterpart of ``torch.jit.load``. Neither :mod:`jaxnet.models` nor flax is
imported here, so the model's code need not even be installed (a test runs
this in a fresh process and checks what it imported).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jaxnet.errors import ConfigError, DataError
from jaxnet.export.inputs import as_pixels, probabilities, read_inputs
from jaxnet.export.lowering import EXPORT_FORMAT
from jaxnet.outputs import CLASSIFIER_KINDS


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A reloaded ``model.jaxexport``: call it on a batch of raw inputs.

    Attributes:
        path: the file it was read from.
        info: the file's JSON description (``input_shape``, ``input_dtype``,
            ``output``, ``platforms``, ``metadata``...).
        exported: the deserialized ``jax.export.Exported``.
        weights: the weights, on the default device.
    """

    path: str
    info: dict[str, Any]
    exported: Any
    weights: tuple[jax.Array, ...]
    _call: Callable[..., jax.Array] = dataclasses.field(repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. ``(28, 28, 1)``."""
        return tuple(self.info["input_shape"])

    @property
    def input_dtype(self) -> np.dtype:
        """``uint8`` for image models (raw pixels), ``float32`` otherwise."""
        return np.dtype(self.info["input_dtype"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs ``(N, K)`` (logits, log-probabilities or values) for ``(N, *input_shape)`` inputs.

        Raises:
            DataError: inputs of the wrong shape or dtype (the message shows
                the expected ones and how to convert).
            ConfigError: the default device is not a platform it was exported for.
        """
        x = np.asarray(images)
        want = self.input_shape
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise DataError(
                f"{self.path} takes a batch of shape (N, {', '.join(map(str, want))}), got {x.shape}"
                + ("; add a batch axis with x[None]" if tuple(x.shape) == want else "")
            )
        if self.input_dtype == np.uint8:
            x = as_pixels(x, str(self.path))
        if self.input_dtype != np.uint8:
            x = x.astype(self.input_dtype)
        try:
            return np.asarray(self._call(list(self.weights), x))
        except ValueError as exc:  # e.g. run on a platform it was not exported for
            raise ConfigError(f"cannot run {self.path}: {str(exc).splitlines()[0]}") from None


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Reloads a ``model.jaxexport`` file; needs only jax and numpy.

    Counterpart of ``torch.jit.load(path)``. The returned model compiles once
    per batch size and runs on the default device (which must be one of the
    platforms it was exported for).

    Args:
        path: a file written from :func:`export_model`'s bytes (``jaxnet export``).

    Returns:
        An :class:`ExportedModel`; ``model(images)`` gives the outputs.

    Raises:
        DataError: a missing file, or one that is not a jaxnet export.

    Example:
        >>> model = load_exported("model.jaxexport")  # doctest: +SKIP
        >>> logits = model(np.zeros((7, 28, 28, 1), np.uint8))  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the exported model {path}: {exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            info = json.loads(archive["info"].tobytes().decode())
            module = archive["module"].tobytes()
            weights = [archive[f"w{i:04d}"] for i in range(len(info["weights"]))]
    except Exception as exc:  # zip, npz, JSON or key errors: all mean "not our file"
        raise DataError(
            f"{path} is not a jaxnet exported model ({type(exc).__name__}: {exc}); create one "
            "with 'jaxnet export --workdir W --out model.jaxexport'"
        ) from None
    if info.get("format") != EXPORT_FORMAT:
        raise DataError(f"{path} has export format {info.get('format')!r}; this jaxnet reads format {EXPORT_FORMAT}")
    try:
        exported = jax.export.deserialize(bytearray(module))
    except Exception as exc:
        raise DataError(f"{path}: the serialized module is damaged ({type(exc).__name__}: {exc})") from None
    device_weights = tuple(jax.device_put(w) for w in weights)
    return ExportedModel(str(path), info, exported, device_weights, jax.jit(exported.call))


def _read_batches(model: ExportedModel, files: Sequence[str | os.PathLike]) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(names, outputs)`` per file: ``file`` for one example, ``file[i]`` for a batch's."""
    for file in files:
        batch, batched = read_inputs(file, model.input_shape)
        if model.input_dtype == np.uint8:
            batch = as_pixels(batch, str(file))
        names = [f"{file}[{i}]" for i in range(len(batch))] if batched else [str(file)]
        yield names, model(batch)


def predict_files(
    model: str | os.PathLike | ExportedModel, files: Sequence[str | os.PathLike]
) -> list[tuple[str, int, np.ndarray]]:
    """Classifies examples stored as ``.npy`` arrays or image files with an exported model.

    Args:
        model: a ``model.jaxexport`` path or a loaded :class:`ExportedModel`.
        files: ``.npy`` files (one example or a batch ``(N, ...)``: images,
            or feature vectors for a model of float inputs) and image files
            (PNG...). A batch file gives one result per example, named
            ``file[i]``.

    Returns:
        ``(name, predicted class, class probabilities)`` per example.

    Raises:
        ConfigError: the model predicts values, not classes (use :func:`predict_values`).
        DataError: unreadable or ill-shaped inputs (see :func:`read_inputs`).
    """
    if not isinstance(model, ExportedModel):
        model = load_exported(model)
    if model.info["output"] not in CLASSIFIER_KINDS:
        raise ConfigError(
            f"{model.path} is a regression model, not a classifier; call load_exported(path)(x) "
            "or predict_values for its values"
        )
    results = []
    for names, outputs in _read_batches(model, files):
        for name, p in zip(names, probabilities(outputs, model.info["output"])):
            results.append((name, int(np.argmax(p)), p))
    return results


def predict_values(
    model: str | os.PathLike | ExportedModel, files: Sequence[str | os.PathLike]
) -> list[tuple[str, np.ndarray]]:
    """A regression model's outputs for the examples in ``.npy`` (or image) files.

    Returns:
        ``(name, values)`` per example, named as :func:`predict_files` names them.

    Raises:
        DataError: unreadable or ill-shaped inputs (see :func:`read_inputs`).
    """
    if not isinstance(model, ExportedModel):
        model = load_exported(model)
    return [
        (name, np.asarray(v).reshape(-1))
        for names, outputs in _read_batches(model, files)
        for name, v in zip(names, outputs)
    ]
