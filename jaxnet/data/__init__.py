"""Data: readers of the official files, downloads, batching and on-device transforms.

The counterpart of ``torchvision.datasets``, ``torchvision.transforms`` and
``torch.utils.data.DataLoader``. ``jaxnet.data.tfds`` (tensorflow-datasets)
is imported only when used: ``load_dataset("tfds:NAME")`` or
``jaxnet.data.load_tfds``.
"""

from __future__ import annotations

from typing import Any

from jaxnet.data.archive import safe_extract
from jaxnet.data.cifar import read_cifar10
from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.download import download
from jaxnet.data.loader import epoch_permutation, iterate_batches, num_batches, prefetch_to_device
from jaxnet.data.mnist import read_mnist
from jaxnet.data.registry import DATASETS, load_dataset
from jaxnet.data.transforms import augment, normalize, random_crop, random_flip

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "augment",
    "download",
    "epoch_permutation",
    "iterate_batches",
    "load_dataset",
    "load_tfds",
    "normalize",
    "num_batches",
    "prefetch_to_device",
    "random_crop",
    "random_flip",
    "read_cifar10",
    "read_mnist",
    "safe_extract",
]


def __getattr__(name: str) -> Any:
    # Lazy: tensorflow-datasets is an optional, heavy dependency.
    if name == "load_tfds":
        from jaxnet.data.tfds import load_tfds

        return load_tfds
    raise AttributeError(f"module 'jaxnet.data' has no attribute {name!r}")
