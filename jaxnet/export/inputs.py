"""Inputs of an exported model: ``.npy`` arrays and image files as batches, outputs as probabilities.

numpy only (Pillow for image files): what ``jaxnet predict`` reads and prints.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxnet.errors import DataError


def _to_batch(array: np.ndarray, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, bool]:
    """One example or a batch, with the channel axis optional for 1-channel models."""
    gray = shape[-1] == 1
    if array.shape == shape or (gray and array.shape == shape[:-1]):
        return array.reshape((1, *shape)), False
    if array.ndim == len(shape) + 1 and array.shape[1:] == shape:
        return array, True
    if gray and array.ndim == len(shape) and array.shape[1:] == shape[:-1]:
        return array.reshape((-1, *shape)), True
    raise DataError(
        f"{name}: an array of shape {array.shape} is neither one example {shape} nor a batch "
        f"(N, {', '.join(map(str, shape))})"
    )


def read_inputs(file: str | os.PathLike, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """Reads a ``.npy`` array (one example or a batch) or an image file as a batch.

    Images (PNG, JPEG, ... anything Pillow reads) are converted to the
    model's channels (grayscale ``L`` for 1, ``RGB`` for 3) and must already
    have its height and width.

    Args:
        file: the file.
        input_shape: one example's shape, e.g. ``(28, 28, 1)``.

    Returns:
        ``(batch, batched)``: an ``(N, *input_shape)`` array (uint8 for
        images), and whether the file held a batch rather than one example.

    Raises:
        DataError: unreadable files, wrong sizes or shapes.
    """
    path, shape = pathlib.Path(file), tuple(input_shape)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        return _to_batch(array, shape, str(path))
    from PIL import Image, UnidentifiedImageError  # only image files need Pillow

    modes = {1: "L", 3: "RGB"}
    if len(shape) != 3 or shape[-1] not in modes:
        raise DataError(
            f"{path}: image files fit (H, W, 1) or (H, W, 3) models, this one takes {shape}; pass a .npy array"
        )
    try:
        with Image.open(path) as image:
            image = image.convert(modes[shape[-1]])
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if array.shape[:2] != shape[:2]:
        raise DataError(
            f"{path}: the image is {array.shape[1]}x{array.shape[0]} pixels but the model takes "
            f"{shape[1]}x{shape[0]}; resize it first (e.g. Image.resize(({shape[1]}, {shape[0]})))"
        )
    return array.reshape((1, *shape)), False


def probabilities(outputs: np.ndarray, output: str) -> np.ndarray:
    """Class probabilities ``(N, K)`` from a classifier's outputs.

    Softmax of logits or log-probabilities (``softmax(log_softmax(z)) ==
    softmax(z)``); for ``"binary"`` (one logit per example) ``[1 - p, p]``
    with ``p = sigmoid(z)``, the counterpart of ``torch.sigmoid`` after
    ``BCEWithLogitsLoss``.

    >>> probabilities(np.zeros((1, 1)), "binary").tolist()
    [[0.5, 0.5]]
    """
    z = np.asarray(outputs, np.float64)
    if output == "binary":
        p = 1.0 / (1.0 + np.exp(-z.reshape(len(z), -1)[:, 0]))
        return np.stack([1.0 - p, p], axis=-1)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def as_pixels(x: np.ndarray, where: str) -> np.ndarray:
    """Inputs of a model that takes raw pixels, as uint8: integer pixel values 0..255 are taken as they are.

    Raises:
        DataError: floats (which scale they are in cannot be known), or integers outside 0..255.
    """
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: holds {x.dtype} values in [{lo}, {hi}]; the model takes pixels 0..255")
        return x.astype(np.uint8)
    raise DataError(
        f"{where}: holds {x.dtype} values, the model takes raw pixels 0..255 (uint8); for images in [0, 1] "
        "save (x * 255).round().astype(np.uint8), for pixel values stored as floats x.round().astype(np.uint8)"
    )
