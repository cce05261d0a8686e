"""Builders of small, valid official-format files for the data tests.

Imported by the reader tests of ``tests/data/``; ``test_builders.py`` checks
that the builders themselves produce what the standard library reads back,
so that the reader tests rest on real formats.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import struct
import tarfile

import numpy as np

from jaxnet.data import cifar, mnist


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """Raw IDX content of a uint8 array (magic from its ndim unless given)."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def gz(data: bytes) -> bytes:
    """``data`` gzipped with a fixed mtime, so that the same input gives the same bytes."""
    return gzip.compress(data, mtime=0)


def make_mnist_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28x28 uint8 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n, dtype=np.uint8),
    )


def write_mnist_folder(folder: pathlib.Path, n_train: int = 20, n_test: int = 10, *, compress: bool = True) -> dict:
    """Writes the four official files; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = make_mnist_arrays(n, seed)
        arrays[split] = (images, labels)
        for stem, array in zip(mnist.MNIST_FILES[split], (images, labels)):
            content = idx_bytes(array)
            name = f"{stem}.gz" if compress else stem
            (folder / name).write_bytes(gz(content) if compress else content)
    return arrays


def make_cifar_batch(n: int, seed: int = 0) -> dict[bytes, object]:
    """One official-style batch dict of ``n`` random images (``b"data"`` ``(n, 3072)`` uint8) and labels."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _op_bytes(value: bytes) -> bytes:
    """SHORT_BINSTRING / BINSTRING: how Python 2 wrote a str (read back as bytes)."""
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<I", len(value)) + value


def _op_int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def py2_pickle(batch: dict[bytes, object]) -> bytes:
    """The batch as Python 2's cPickle (protocol 2) wrote the official files.

    ``numpy.core.multiarray._reconstruct`` / ``numpy.ndarray`` / ``numpy.dtype``
    globals, byte strings as BINSTRING, labels as a list of ints.
    """
    out = [b"\x80\x02}q\x00("]  # PROTO 2, EMPTY_DICT, BINPUT 0, MARK
    for key, value in batch.items():
        out.append(_op_bytes(key))
        if isinstance(value, np.ndarray):
            shape = b"".join(_op_int(d) for d in value.shape)
            out += [
                b"cnumpy.core.multiarray\n_reconstruct\n",
                b"cnumpy\nndarray\n",
                b"K\x00\x85",
                _op_bytes(b"b"),
                b"\x87R",  # ((0,), 'b') -> REDUCE
                b"(K\x01(",
                shape,
                b"t",  # state: (1, shape,
                b"cnumpy\ndtype\n",
                _op_bytes(b"u1"),
                b"\x89\x88\x87R",  # dtype('u1', False, True)
                b"(K\x03",
                _op_bytes(b"|"),
                b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
                b"\x89",
                _op_bytes(value.tobytes()),
                b"tb",  # , False, raw) BUILD
            ]
        elif isinstance(value, list):
            out.append(b"](")
            out += [_op_bytes(v) if isinstance(v, bytes) else _op_int(v) for v in value]
            out.append(b"e")
        elif isinstance(value, int):
            out.append(_op_int(value))
        else:
            out.append(_op_bytes(value))
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def cifar_pickle(batch: dict[bytes, object], style: str = "py2") -> bytes:
    """``style``: ``"py2"`` (the official files), or ``"p2"``/``"p4"``/``"p5"`` protocols."""
    if style == "py2":
        return py2_pickle(batch)
    return pickle.dumps(batch, protocol=int(style[1:]))


META = {b"num_cases_per_batch": 10, b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}


def cifar_members(n: int = 3, style: str = "py2") -> dict[str, bytes]:
    """Member name -> pickle bytes of a tiny complete CIFAR-10 set."""
    members = {}
    for i, batch in enumerate((*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)):
        members[f"{cifar.CIFAR10_FOLDER}/{batch}"] = cifar_pickle(make_cifar_batch(n, seed=i), style)
    members[f"{cifar.CIFAR10_FOLDER}/{cifar.META}"] = cifar_pickle(META, style)
    return members


def tar_bytes(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """An uncompressed tar with the given regular files (plus raw extra headers)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A ``.tar.gz`` with the given regular files (plus raw extra headers): :func:`tar_bytes`, gzipped."""
    return gz(tar_bytes(members, extra))


def expected_cifar(style_members: dict[str, bytes], batch: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference decoding of one member with the standard (unsafe) unpickler."""
    d = pickle.loads(style_members[f"{cifar.CIFAR10_FOLDER}/{batch}"], encoding="bytes")
    return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[b"labels"])


class _RunsOnUnpickle:
    """Pickles as the call ``os.system("touch MARKER")``: the code a malicious pickle runs when loaded."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_batch(marker: pathlib.Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """A CIFAR batch pickle whose ``b"data"``, unpickled by the standard library, creates ``marker``."""
    return pickle.dumps({b"data": _RunsOnUnpickle(marker), b"labels": [0]}, protocol=protocol)
