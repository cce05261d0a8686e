"""Prepared tensorflow-datasets data sets, read without TensorFlow.

:func:`load_tfds` opens a data set that ``tfds build`` (or ``download=True``)
has already prepared in the ``array_record`` format, through tfds's random
access data source -- what ``tfds.data_source`` returns -- so neither
TensorFlow nor ``tfds.load`` is needed. Counterpart of
``torchvision.datasets.X(root, train=..., download=...)`` for any tfds image
classification set.

A split whose images fit in ``max_in_memory_bytes`` is read into one
``(N, H, W, C)`` uint8 array. A larger one becomes a :class:`GrainArraySource`,
which reads the requested records from disk each time it is indexed, so the
loader streams batches instead of holding the whole split.

Reads go through the source's batched ``__getitems__`` where it has one, in
chunks of ``_READ_CHUNK`` records: that was the fastest of the ways to read
a tfds source that were timed (``benchmarks/DATA.md``).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError, DataError

_READ_CHUNK = 1024  # records per batched read (benchmarks/DATA.md)
_STATS_SAMPLE = 4096  # train images drawn (seed 0) to estimate mean and std
_KNOWN_STATS = {
    # The PyTorch tutorials' Normalize values, in units of pixel/255.
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _require(module_name: str) -> ModuleType:
    """Imports an optional dependency, or raises ConfigError naming the extra."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"reading tensorflow-datasets data sets needs the optional package "
            f"{module_name!r}, which could not be imported ({e}); install the "
            f'extra with: pip install "jaxnet[tfds]"'
        ) from e


def _read_chunks(source: Any, keys: np.ndarray) -> Iterator[tuple[int, Sequence[Any]]]:
    """Yields ``(offset, records)`` for consecutive chunks of ``keys``.

    Uses the source's batched ``__getitems__`` where it has one (tfds's data
    sources do), else reads record by record.
    """
    batched = hasattr(source, "__getitems__")
    for start in range(0, len(keys), _READ_CHUNK):
        chunk = keys[start : start + _READ_CHUNK].tolist()
        yield start, source.__getitems__(chunk) if batched else [source[k] for k in chunk]


def _stack_images(records: Sequence[Any], image_key: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """Stacks the records' images: (B, H, W) or (B, H, W, C) -> (B, H, W, C)."""
    images = np.stack([np.asarray(r[image_key]) for r in records])
    return images.reshape(len(records), *image_shape)


def _read_images(source: Any, image_key: str, image_shape: tuple[int, ...], keys: np.ndarray) -> np.ndarray:
    """Reads the images of ``keys`` into one ``(len(keys), H, W, C)`` uint8 array."""
    out = np.empty((len(keys), *image_shape), dtype=np.uint8)
    for start, records in _read_chunks(source, keys):
        out[start : start + len(records)] = _stack_images(records, image_key, image_shape)
    return out


def _read_split(
    source: Any, image_key: str | None, label_key: str, image_shape: tuple[int, ...]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Reads all labels, and all images unless ``image_key`` is None, in one pass."""
    n = len(source)
    images = None if image_key is None else np.empty((n, *image_shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    for start, records in _read_chunks(source, np.arange(n)):
        stop = start + len(records)
        labels[start:stop] = np.asarray([r[label_key] for r in records], dtype=np.int64)
        if images is not None:
            assert image_key is not None  # images are allocated only for an image_key
            images[start:stop] = _stack_images(records, image_key, image_shape)
    return images, labels


class _ImageOf:
    """Picklable map function for grain: record -> ``(H, W, C)`` uint8 image."""

    def __init__(self, image_key: str, image_shape: tuple[int, ...]):
        self.image_key = image_key
        self.image_shape = image_shape

    def __call__(self, record: dict[str, Any]) -> np.ndarray:
        return np.asarray(record[self.image_key], dtype=np.uint8).reshape(self.image_shape)


class GrainArraySource:
    """The uint8 images of one split, read from disk when indexed.

    Behaves like a read-only ``(N, H, W, C)`` uint8 array for what
    :class:`~jaxnet.data.dataset.ArrayDataset` needs: ``len()``, ``.shape``,
    ``.dtype`` and indexing with an int, a slice or a 1-D integer array, which
    returns a stacked ``np.ndarray``. Counterpart of a map-style
    ``torch.utils.data.Dataset`` over files on disk.

    ``dataset`` is the same data as a ``grain.MapDataset`` of single images,
    for building a grain pipeline (shuffle, batch, worker processes) on top.

    Args:
        data_source: a tfds random-access data source of one split
            (``tfds.data_source(name, split=...)``), or any sequence of dicts.
        image_key: the feature that holds the image.
        image_shape: ``(H, W, C)`` of one image; 2-D images get ``C = 1``.

    Raises:
        ConfigError: if grain is not installed.
    """

    def __init__(self, data_source: Any, image_key: str, image_shape: tuple[int, ...]):
        grain = _require("grain")
        self._source = data_source
        self._image_key = image_key
        self.shape = (len(data_source), *image_shape)
        self.dtype = np.dtype(np.uint8)
        self.dataset = grain.MapDataset.source(data_source).map(_ImageOf(image_key, image_shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        """Reads images: an int gives ``(H, W, C)``, anything else ``(B, H, W, C)``.

        Raises:
            TypeError: if ``index`` is not an int, a slice or 1-D integer array.
            IndexError: if an index is outside ``[-N, N)``.
        """
        n = len(self)
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        if isinstance(index, slice):
            return self[np.arange(n)[index]]
        keys = np.asarray(index)
        if keys.size == 0:
            keys = keys.astype(np.int64)
        if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
            raise TypeError(
                f"GrainArraySource takes an int, a slice or a 1-D integer array; "
                f"got {type(index).__name__} of shape {keys.shape} and dtype "
                f"{keys.dtype}, e.g. use images[np.array([0, 5, 7])]"
            )
        if keys.size and (keys.min() < -n or keys.max() >= n):
            raise IndexError(
                f"index out of range for {n} images: min {keys.min()}, max {keys.max()}; use indices in [-{n}, {n})"
            )
        keys = np.where(keys < 0, keys + n, keys)
        return _read_images(self._source, self._image_key, self.shape[1:], keys)

    def __repr__(self) -> str:
        return f"GrainArraySource(shape={self.shape}, dtype=uint8, key={self._image_key!r})"


def _open_builder(tfds: ModuleType, name: str, data_dir: Any, download: bool) -> Any:
    """Returns the builder of a prepared data set, never downloading unasked."""
    if data_dir is None:
        where = "tfds's default data_dir"
    else:
        where = f"data_dir={os.fspath(data_dir)!r}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, ValueError, AssertionError
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"tensorflow-datasets cannot open data set {name!r} ({where}): {first_line}. "
            f"Check the name and version (tfds.list_builders()), or pass the data_dir "
            f"that holds {name.split(':')[0]}/VERSION/dataset_info.json"
        ) from e
    if builder.is_prepared():
        return builder
    dir_option = f" --data_dir={os.fspath(data_dir)}" if data_dir is not None else ""
    if not download:
        raise DataError(
            f"tfds data set {name!r} is not prepared: {builder.data_path} has no "
            f"dataset_info.json ({where}). Prepare it with `tfds build {name}{dir_option} "
            f"--file_format=array_record`, or call load_tfds({name!r}, download=True)"
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # network, TensorFlow-only builders, manual downloads
        raise DataError(
            f"could not download and prepare tfds data set {name!r} into "
            f"{builder.data_path}: {type(e).__name__}: {e}. Some builders need "
            f"network access or TensorFlow to prepare (pip install tensorflow); "
            f"otherwise run `tfds build {name}{dir_option} --file_format=array_record` "
            f"where that works and copy the folder here"
        ) from e
    return builder


def _check_features(features: Any, name: str, image_key: str, label_key: str) -> tuple[tuple[int, ...], int]:
    """Validates the image and label features; returns ``(H, W, C)`` and num_classes."""
    keys = sorted(features.keys()) if hasattr(features, "keys") else []
    for key, arg in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in keys:
            raise DataError(
                f"tfds data set {name!r} has no feature {key!r}; its features are "
                f"{keys}. Pass {arg}= naming one of them"
            )
    image, label = features[image_key], features[label_key]
    if np.dtype(image.np_dtype) != np.uint8:
        raise DataError(
            f"feature {image_key!r} of tfds data set {name!r} has dtype "
            f"{np.dtype(image.np_dtype)}, but load_tfds reads uint8 images; pass "
            f"image_key= naming a uint8 Image or Tensor feature"
        )
    shape = tuple(image.shape)
    if len(shape) not in (2, 3) or any(d is None for d in shape):
        raise DataError(
            f"feature {image_key!r} of tfds data set {name!r} has shape {shape}; "
            f"load_tfds needs fixed-size (H, W) or (H, W, C) images. Pick a "
            f"fixed-size config of the data set, or image_key= another feature"
        )
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise DataError(
            f"feature {label_key!r} of tfds data set {name!r} is a "
            f"{type(label).__name__}, not a ClassLabel with num_classes; pass "
            f"label_key= naming the ClassLabel feature"
        )
    return (shape if len(shape) == 3 else (*shape, 1)), int(num_classes)


def _pick_splits(splits: Any, name: str) -> tuple[str, str]:
    """Returns the train split and the test split (``validation`` when no test)."""
    names = sorted(splits.keys())
    test = "test" if "test" in names else "validation"
    if "train" not in names or test not in names:
        raise DataError(
            f"tfds data set {name!r} has splits {names}; load_tfds needs 'train' "
            f"and 'test' (or 'validation'). Use tfds.data_source({name!r}, "
            f"split=...) directly for other splits"
        )
    return "train", test


def _as_data_source(builder: Any, split: str, name: str, decoders: Any = None) -> Any:
    """Opens the random-access source of one split, explaining format errors."""
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:  # prepared only as tfrecord
        raise DataError(
            f"tfds data set {name!r} in {builder.data_path} is stored in a format "
            f"without random access ({e}). Rebuild it with `tfds build {name} "
            f"--file_format=array_record`, or convert it with `tfds "
            f"convert_format --dataset_version_dir={builder.data_path} "
            f"--out_file_format=array_record`"
        ) from e


def _load_split(
    tfds: ModuleType,
    builder: Any,
    split: str,
    keys: tuple[str, str],
    image_shape: tuple[int, ...],
    max_in_memory_bytes: int,
) -> tuple[Any, np.ndarray]:
    """Reads one split: images in memory when they fit, else a GrainArraySource."""
    name, (image_key, label_key) = builder.name, keys
    source = _as_data_source(builder, split, name)
    num_bytes = len(source) * math.prod(image_shape)  # uint8: one byte per value
    if num_bytes <= max_in_memory_bytes:
        return _read_split(source, image_key, label_key, image_shape)
    # Labels must be in memory: read them with image decoding skipped.
    labels_source = _as_data_source(builder, split, name, decoders={image_key: tfds.decode.SkipDecoding()})
    _, labels = _read_split(labels_source, None, label_key, image_shape)
    return GrainArraySource(source, image_key, image_shape), labels


def _image_stats(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in units of pixel/255, of a seeded sample."""
    n = len(images)
    rng = np.random.default_rng(0)
    keys = np.sort(rng.choice(n, size=min(n, _STATS_SAMPLE), replace=False))
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(keys), _READ_CHUNK):
        chunk = images[keys[start : start + _READ_CHUNK]].astype(np.float64) / 255.0
        total = total + chunk.sum(axis=(0, 1, 2))  # (C,)
        total_sq = total_sq + np.square(chunk).sum(axis=(0, 1, 2))
        count += chunk.shape[0] * chunk.shape[1] * chunk.shape[2]
    mean = np.asarray(total / count)  # (C,): the sums are arrays once a chunk is read
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    max_in_memory_bytes: int = 2 * 1024**3,
) -> ArrayDataset:
    """Loads a prepared tensorflow-datasets image classification set.

    Counterpart of ``torchvision.datasets.X(root, train=..., download=...)``.
    Reads the ``train`` split and the ``test`` split (``validation`` when there
    is no ``test``) through tfds's random-access data source, without
    TensorFlow. Images may be stored as ``tfds.features.Image`` (decoded with
    PIL) or as uint8 ``tfds.features.Tensor``; 2-D images get a channel axis.
    ``mean``/``std`` are the tutorials' values for ``mnist`` and ``cifar10``;
    for any other set they are estimated from 4,096 train images drawn with a
    fixed seed (all of them when there are fewer).

    Args:
        name: tfds name, optionally with config and version, e.g. ``"mnist"``,
            ``"mnist:3.0.1"``, ``"cifar10"``.
        data_dir: folder that holds ``NAME/VERSION/``; ``None`` uses tfds's
            default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        download: when the set is not prepared, download and prepare it in the
            ``array_record`` format (some builders need TensorFlow for this).
            When False, a missing set raises at once instead of downloading.
        image_key: the uint8 image feature.
        label_key: the ``ClassLabel`` feature.
        max_in_memory_bytes: a split whose images take more bytes than this is
            returned as a lazy :class:`GrainArraySource` read from disk.

    Returns:
        An ``ArrayDataset`` with ``(N, H, W, C)`` uint8 images (arrays or
        ``GrainArraySource``), ``(N,)`` int32 labels and ``name="tfds:NAME"``.

    Raises:
        ConfigError: if tensorflow-datasets, importlib_resources or (for lazy
            splits) grain is missing, or ``max_in_memory_bytes`` is invalid.
        DataError: if the set is unknown, not prepared, fails to prepare, is
            not stored as array_record, or lacks uint8 fixed-size images, a
            ``ClassLabel`` label or the train/test splits.

    >>> ds = load_tfds("mnist", data_dir="/data/tfds")  # doctest: +SKIP
    >>> ds.train_images.shape, ds.num_classes  # doctest: +SKIP
    ((60000, 28, 28, 1), 10)
    """
    tfds = _require("tensorflow_datasets")
    _require("importlib_resources")  # tfds needs it to run without TensorFlow
    limit = max_in_memory_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(
            f"max_in_memory_bytes must be a non-negative int, got {max_in_memory_bytes!r}; "
            f"e.g. 2 * 1024**3 for 2 GiB, or 0 to always read lazily"
        )
    builder = _open_builder(tfds, name, data_dir, download)
    image_shape, num_classes = _check_features(builder.info.features, name, image_key, label_key)
    train_split, test_split = _pick_splits(builder.info.splits, name)
    keys = (image_key, label_key)
    train_images, train_labels = _load_split(tfds, builder, train_split, keys, image_shape, limit)
    test_images, test_labels = _load_split(tfds, builder, test_split, keys, image_shape, limit)
    if len(train_labels) == 0:
        raise DataError(f"the train split of tfds data set {name!r} in {builder.data_path} is empty")
    known = _KNOWN_STATS.get(builder.name)
    if known is not None and len(known[0]) == image_shape[-1]:
        mean, std = known
    else:
        mean, std = _image_stats(train_images)
    return ArrayDataset(
        name=f"tfds:{name}",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        source=(f"tensorflow-datasets {builder.info.full_name} ({train_split}/{test_split}) from {builder.data_path}"),
    )
