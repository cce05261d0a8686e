"""Reader of the official MNIST IDX files, validated before anything is allocated.

The IDX format (http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number
``00 00 TYPE NDIM``, then NDIM big-endian uint32 dimensions, then the data.
MNIST uses TYPE ``0x08`` (unsigned byte): images have magic 2051
(``00 00 08 03``, dims N x 28 x 28) and labels 2049 (``00 00 08 01``, dim N).
The files are usually gzip-compressed; both forms are accepted.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np

from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.safe_io import ByteSource, data_errors, drain, open_maybe_gzip, read_exact_into
from jaxnet.errors import ConfigError, DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_UBYTE = 0x08
MAX_IDX_BYTES = 256 * 2**20  # largest decoded content accepted (train images: 47 MB)
MNIST_SIDE = 28
NUM_CLASSES = 10
MNIST_MEAN = (0.1307,)  # torchvision tutorials' Normalize((0.1307,), (0.3081,))
MNIST_STD = (0.3081,)

# Split -> (images file, labels file), official names without ".gz".
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def mnist_file_names() -> tuple[str, ...]:
    """The four official file names, gzip form (``train-images-idx3-ubyte.gz``, ...)."""
    return tuple(f"{stem}.gz" for pair in MNIST_FILES.values() for stem in pair)


def find_idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    """Finds ``stem.gz`` or else ``stem`` in ``folder``; None if neither is a file."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def missing_mnist_files(folder: pathlib.Path) -> list[str]:
    """Names of the official files absent from ``folder`` (gzip form)."""
    return [f"{stem}.gz" for pair in MNIST_FILES.values() for stem in pair if find_idx_file(folder, stem) is None]


def _read_header(stream: ByteSource, path: pathlib.Path, magic: int) -> tuple[int, ...]:
    """Checks the magic number, then reads and returns the declared dimensions."""
    kind = "image" if magic == IMAGES_MAGIC else "label"
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: empty or truncated IDX header ({len(head)} bytes)")
    found = int.from_bytes(head, "big")
    if head[:2] == b"\0\0" and head[3] == magic & 0xFF and head[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: IDX data type 0x{head[2]:02x}, but MNIST files hold unsigned "
            f"bytes (0x{IDX_UBYTE:02x}); this is not an MNIST {kind} file"
        )
    if found != magic:
        other = {IMAGES_MAGIC: "an IDX image file", LABELS_MAGIC: "an IDX label file"}
        what = other.get(found, "not an MNIST IDX file")
        raise DataError(
            f"{path}: wrong magic number {found} (0x{found:08x}); expected {magic} "
            f"(0x{magic:08x}) for an IDX {kind} file, found {what}. Check that the "
            "file names match their contents (images vs labels)"
        )
    ndim = magic & 0xFF
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(raw_dims)} of {4 + 4 * ndim} bytes)")
    dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: IDX header declares an empty array of shape {dims}")
    return dims


def read_idx(path: str | os.PathLike[str], *, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzip-compressed or raw).

    The header is validated, the declared size is checked against
    ``max_bytes`` before anything is allocated, and the data must end exactly
    where the header says: a short file or trailing bytes are errors. For
    gzip files the whole stream is read, so its CRC is checked too, and no
    more than the declared size is ever decompressed into memory.

    Args:
      path: the ``.gz`` or uncompressed IDX file.
      magic: :data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`.
      max_bytes: largest declared data size accepted.

    Returns:
      A ``uint8`` array of the declared shape.

    Raises:
      DataError: missing, unreadable, truncated or malformed file.

    >>> read_idx("train-labels-idx1-ubyte.gz", magic=LABELS_MAGIC).shape  # doctest: +SKIP
    (60000,)
    """
    path = pathlib.Path(path)
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise ConfigError(f"magic must be {IMAGES_MAGIC} or {LABELS_MAGIC}, got {magic}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with data_errors(path), contextlib.ExitStack() as stack:
        stream = open_maybe_gzip(path, stack)
        dims = _read_header(stream, path, magic)
        size = int(np.prod(dims, dtype=object))  # Python ints: no overflow
        if size > max_bytes:
            raise DataError(
                f"{path}: header declares shape {dims} ({size:,} bytes), over the "
                f"{max_bytes:,}-byte limit; the file is corrupt or not MNIST"
            )
        data = np.empty(size, dtype=np.uint8)
        got = read_exact_into(stream, data.data)  # the array's own writable buffer
        if got < size:
            raise DataError(
                f"{path}: truncated: header declares shape {dims} ({size:,} bytes) "
                f"but only {got:,} bytes of data follow; download the file again"
            )
        extra = drain(stream, 0, str(path))  # reads to EOF: checks the gzip CRC
        if extra:
            raise DataError(f"{path}: unexpected data after the declared {size:,} bytes")
    return data.reshape(dims)


def read_mnist_split(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Reads one split; returns ``(images (N,28,28,1) uint8, labels (N,) int32, paths)``."""
    images_stem, labels_stem = MNIST_FILES[split]
    images_path = find_idx_file(folder, images_stem)
    labels_path = find_idx_file(folder, labels_stem)
    if images_path is None or labels_path is None:
        stem = images_stem if images_path is None else labels_stem
        raise DataError(f"{folder}: missing {stem}.gz (or {stem}) for the MNIST {split} split")
    images = read_idx(images_path, magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=LABELS_MAGIC)
    if images.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, MNIST images are {MNIST_SIDE}x{MNIST_SIDE}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the two files must come from the same split"
        )
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"{labels_path}: {bad.size} labels outside 0..{NUM_CLASSES - 1}, first at "
            f"index {bad[0]} (value {labels[bad[0]]})"
        )
    return images[..., None], labels.astype(np.int32), f"{images_path}, {labels_path}"


def read_mnist(folder: str | os.PathLike[str]) -> ArrayDataset:
    """Reads MNIST from the four official IDX files in ``folder``.

    Counterpart of ``torchvision.datasets.MNIST(root, train=True/False)``
    without the transforms: images stay ``uint8``, and the tutorials'
    ``Normalize((0.1307,), (0.3081,))`` constants travel as ``mean``/``std``.

    Args:
      folder: folder holding ``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (or the same names without ``.gz``).

    Returns:
      The data set: images ``(N, 28, 28, 1)`` uint8, labels ``(N,)`` int32.

    Raises:
      DataError: a file is missing, truncated or malformed (the file is named).

    >>> ds = read_mnist("data/mnist")  # doctest: +SKIP
    >>> ds.train_images.shape, ds.test_images.shape  # doctest: +SKIP
    ((60000, 28, 28, 1), (10000, 28, 28, 1))
    """
    folder = pathlib.Path(folder)
    missing = missing_mnist_files(folder)
    if missing:
        raise DataError(f"{folder}: missing MNIST files {', '.join(missing)} (the names without .gz are accepted too)")
    train_images, train_labels, train_src = read_mnist_split(folder, "train")
    test_images, test_labels, test_src = read_mnist_split(folder, "test")
    return ArrayDataset(
        name="mnist",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        source=f"MNIST IDX files: {train_src}, {test_src}",
    )
