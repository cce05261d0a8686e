"""The in-memory data set type shared by every reader."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled image data set split into train and test parts.

    Images are kept as ``uint8`` in NHWC layout on the host; normalization and
    augmentation happen on the device, inside the compiled step (see
    :mod:`jaxnet.data.transforms`). Counterpart of a pair of
    ``torchvision.datasets`` objects (``train=True`` / ``train=False``).

    ``train_images`` and ``test_images`` may also be any array-like object that
    supports ``len()`` and indexing with a 1-D integer ``np.ndarray`` (returning
    a stacked ``np.ndarray``), so that a data set too large for memory can be
    read lazily (see :mod:`jaxnet.data.tfds`).
    """

    name: str  # registry name: "mnist", "cifar10", "tfds:NAME", "linear"
    train_images: Any  # (N, H, W, C) uint8, or float32 features for regression
    train_labels: np.ndarray  # (N,) int32 class ids, or float32 targets
    test_images: Any  # (M, H, W, C), same dtype as train_images
    test_labels: np.ndarray  # (M,)
    num_classes: int  # 0 for regression data sets
    mean: tuple[float, ...]  # per-channel mean, in units of pixel/255
    std: tuple[float, ...]  # per-channel std, in units of pixel/255
    source: str  # what was read: file paths, a URL, or the embedded sample

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)``."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)
