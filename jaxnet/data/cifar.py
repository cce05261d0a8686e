"""Reader of the official CIFAR-10 python files, from the archive or a folder.

The official ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` and
``batches.meta``: dict pickles whose ``b"data"`` is an ``(N, 3072)`` uint8
array (each row the 1024-byte R plane, then G, then B of a 32x32 image) and
``b"labels"`` a list of ints 0..9. The archive is read member by member
without extracting anything, and the pickles go through
:mod:`jaxnet.data.safe_pickle`, which cannot run code.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import tarfile
from typing import Any

import numpy as np

from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.safe_io import data_errors, drain, read_bounded
from jaxnet.data.safe_pickle import load_restricted
from jaxnet.errors import DataError

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
SIDE = 32
ROW_BYTES = 3 * SIDE * SIDE  # 3072
MAX_MEMBER_BYTES = 64 * 2**20  # one official batch is ~31 MB
MAX_ARCHIVE_MEMBERS = 256  # the official archive has 9 (folder + 8 files)
MAX_ARCHIVE_BYTES = 1 << 30  # sum of declared member sizes (official: ~186 MB)
CIFAR10_MEAN = (0.5, 0.5, 0.5)  # the tutorial's Normalize((0.5,)*3, (0.5,)*3)
CIFAR10_STD = (0.5, 0.5, 0.5)


def _field(batch: dict[Any, Any], key: bytes) -> Any:
    """``batch[key]``, accepting str keys too (pickles written by Python 3)."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode("ascii"))


def parse_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one pickled batch into ``(images (N,32,32,3) uint8, labels (N,) int32)``.

    Args:
      data: the pickle's bytes.
      name: file (or archive member) named in errors.

    Returns:
      NHWC images and int32 labels.

    Raises:
      DataError: refused global, malformed pickle, wrong keys, shapes or labels.
    """
    batch = load_restricted(data, name)
    if not isinstance(batch, dict):
        raise DataError(f"{name}: a CIFAR-10 batch is a dict, found {type(batch).__name__}")
    images, labels = _field(batch, b"data"), _field(batch, b"labels")
    if images is None or labels is None:
        keys = [repr(k)[:40] for k in itertools.islice(batch, 8)]
        raise DataError(f"{name}: a CIFAR-10 batch needs b'data' and b'labels', found keys {keys}")
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 2
        and images.shape[1] == ROW_BYTES
        and images.shape[0] > 0
    ):
        what = (
            f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        )
        raise DataError(f"{name}: b'data' must be an (N, {ROW_BYTES}) uint8 array, found {what}")
    labels = _labels_array(labels, name)
    if len(labels) != len(images):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    # (N, 3072) rows are R plane, G plane, B plane -> (N, 3, 32, 32) -> NHWC.
    nhwc = images.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(nhwc), labels


def _labels_array(labels: Any, name: str) -> np.ndarray:
    """Validates a list (or 1-D integer array) of labels 0..9; returns int32."""
    if isinstance(labels, list):
        if not all(type(x) is int for x in labels):
            raise DataError(f"{name}: b'labels' must be a list of ints")
        if any(x < 0 or x >= NUM_CLASSES for x in labels):
            bad = next(x for x in labels if x < 0 or x >= NUM_CLASSES)
            raise DataError(f"{name}: label {bad} outside 0..{NUM_CLASSES - 1}")
        return np.asarray(labels, dtype=np.int32).reshape(-1)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise DataError(f"{name}: labels outside 0..{NUM_CLASSES - 1}")
        return labels.astype(np.int32)
    raise DataError(f"{name}: b'labels' must be a list of ints, found {type(labels).__name__}")


def _check_meta(data: bytes, name: str) -> None:
    meta = load_restricted(data, name)
    names = _field(meta, b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == NUM_CLASSES):
        raise DataError(f"{name}: expected a dict with {NUM_CLASSES} b'label_names'")


def _read_archive(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the batches straight from the ``.tar.gz``, in one pass, nothing extracted."""
    wanted = {f"{CIFAR10_FOLDER}/{b}": b for b in (*TRAIN_BATCHES, TEST_BATCH, META)}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seen: set[str] = set()
    declared = 0
    with data_errors(path), tarfile.open(path, mode="r:gz") as archive:
        for count, member in enumerate(archive, start=1):
            declared += max(member.size, 0)
            if count > MAX_ARCHIVE_MEMBERS or declared > MAX_ARCHIVE_BYTES:
                raise DataError(
                    f"{path}: more than {MAX_ARCHIVE_MEMBERS} members or "
                    f"{MAX_ARCHIVE_BYTES:,} bytes; this is not the CIFAR-10 archive"
                )
            batch = wanted.get(member.name.removeprefix("./"))
            if batch is None:
                continue
            where = f"{path}:{member.name}"
            if batch in seen:
                raise DataError(f"{where}: appears twice in the archive")
            seen.add(batch)
            if not member.isreg() or member.size > MAX_MEMBER_BYTES:
                raise DataError(f"{where}: expected a regular file under {MAX_MEMBER_BYTES:,} bytes")
            stream = archive.extractfile(member)
            assert stream is not None  # extractfile returns None only for non-regular members
            data = read_bounded(stream, member.size, where)
            if len(data) != member.size:
                raise DataError(f"{where}: truncated ({len(data)} of {member.size} bytes)")
            if batch == META:
                _check_meta(data, where)
            else:
                found[batch] = parse_batch(data, where)
        # Read to the end of the gzip stream so that its CRC is verified.
        drain(archive.fileobj, 1 << 20, str(path))
    _require_all(found, path)
    return found


def _read_folder(folder: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the batches from an extracted ``cifar-10-batches-py`` folder."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for batch in (*TRAIN_BATCHES, TEST_BATCH, META):
        path = folder / batch
        if not path.is_file():
            continue
        with data_errors(path), open(path, "rb") as f:
            data = read_bounded(f, MAX_MEMBER_BYTES, str(path))
        if batch == META:
            _check_meta(data, str(path))
        else:
            found[batch] = parse_batch(data, str(path))
    _require_all(found, folder)
    return found


def _require_all(found: dict[str, Any], where: pathlib.Path) -> None:
    missing = [b for b in (*TRAIN_BATCHES, TEST_BATCH) if b not in found]
    if missing:
        raise DataError(
            f"{where}: missing CIFAR-10 batches {', '.join(missing)}; expected the official "
            f"{CIFAR10_ARCHIVE} (with {CIFAR10_FOLDER}/data_batch_1..5 and test_batch)"
        )


def locate_cifar10(path: str | os.PathLike[str]) -> pathlib.Path | None:
    """Finds the CIFAR-10 files under ``path``; None if there are none.

    Accepted, in this order: ``path`` is the archive; ``path`` holds an
    extracted ``cifar-10-batches-py/``; ``path`` holds the archive; ``path``
    is itself the extracted folder.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return path
    for candidate in (path / CIFAR10_FOLDER, path / CIFAR10_ARCHIVE):
        if candidate.exists():
            return candidate
    if (path / TRAIN_BATCHES[0]).is_file():
        return path
    return None


def read_cifar10(path: str | os.PathLike[str]) -> ArrayDataset:
    """Reads CIFAR-10 from the official python archive or its extracted folder.

    Counterpart of ``torchvision.datasets.CIFAR10(root, train=True/False)``
    without the transforms. Pickles are read with a restricted unpickler, so
    a tampered file cannot run code.

    Args:
      path: ``cifar-10-python.tar.gz``, a folder holding it or an extracted
        ``cifar-10-batches-py/``, or that extracted folder itself.

    Returns:
      The data set: images ``(N, 32, 32, 3)`` uint8 NHWC, labels int32;
      50,000 train and 10,000 test images for the official files.

    Raises:
      DataError: files missing, unsafe, truncated or malformed (the file is named).

    >>> ds = read_cifar10("data/cifar10")  # doctest: +SKIP
    >>> ds.train_images.shape  # doctest: +SKIP
    (50000, 32, 32, 3)
    """
    location = locate_cifar10(path)
    if location is None:
        raise DataError(
            f"{path}: no CIFAR-10 files found; expected {CIFAR10_ARCHIVE} or an extracted {CIFAR10_FOLDER}/ folder"
        )
    found = _read_folder(location) if location.is_dir() else _read_archive(location)
    train = [found[b] for b in TRAIN_BATCHES]
    test_images, test_labels = found[TEST_BATCH]
    return ArrayDataset(
        name="cifar10",
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"CIFAR-10 python batches: {location}",
    )
