"""Bounded reads and error translation shared by the data readers.

Every reader turns whatever a malformed or hostile file makes the standard
library raise (``OSError``, ``EOFError``, ``zlib.error``, ...) into one
:class:`jaxnet.errors.DataError` that names the file, so that callers have a
single exception type to handle.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pathlib
import struct
import tarfile
import zlib
from collections.abc import Iterator
from typing import Protocol

from jaxnet.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20  # 1 MiB: read size for streaming copies and drains


class ByteSource(Protocol):
    """What the bounded readers need: ``read(size)`` returning bytes.

    Files, gzip streams, tar members and a tar archive's ``fileobj`` all fit.
    """

    def read(self, size: int, /) -> bytes: ...


# What a corrupt file can make the standard library raise while we read it.
# MemoryError is included because a hostile length field can request an
# allocation larger than the machine; that is a property of the file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes gzip.BadGzipFile and truncated-file errors
    EOFError,  # gzip: "Compressed file ended before the end-of-stream marker"
    zlib.error,
    tarfile.TarError,
    struct.error,
    ValueError,
    OverflowError,
    MemoryError,
)


@contextlib.contextmanager
def data_errors(name: str | os.PathLike[str], action: str = "reading") -> Iterator[None]:
    """Re-raises low-level read errors as a :class:`DataError` naming ``name``.

    A :class:`DataError` raised inside the block passes through unchanged.

    Args:
      name: the file (or URL) being read, named in the error message.
      action: what was being done, e.g. ``"reading"`` or ``"extracting"``.

    Raises:
      DataError: wrapping any of :data:`READ_ERRORS`.
    """
    try:
        yield
    except DataError:
        raise
    except READ_ERRORS as e:
        raise DataError(
            f"{name}: {action} failed, the file is corrupt or truncated "
            f"({type(e).__name__}: {str(e)[:200]}); download it again or replace it"
        ) from e


def is_gzip(path: pathlib.Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes ``1f 8b``."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_maybe_gzip(path: pathlib.Path, stack: contextlib.ExitStack) -> io.BufferedIOBase:
    """Opens ``path`` for reading, decompressing on the fly if it is gzip.

    Detection uses the content (magic bytes), not the file name, so a ``.gz``
    name on a raw file, or the reverse, still reads correctly.

    Args:
      path: file to open.
      stack: exit stack that owns the opened file objects.

    Returns:
      A binary stream of the (decompressed) content.
    """
    raw = stack.enter_context(open(path, "rb"))
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    raw.seek(0)
    return raw


def read_exact_into(stream: io.BufferedIOBase, buffer: memoryview) -> int:
    """Fills ``buffer`` from ``stream``; returns how many bytes were read.

    Fewer bytes than ``len(buffer)`` means the stream ended early. Memory use
    is the buffer itself: nothing is read beyond it.
    """
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(buffer[filled:])
        if not n:
            break
        filled += n
    return filled


def read_bounded(stream: ByteSource, max_bytes: int, name: str) -> bytes:
    """Reads a whole stream, refusing more than ``max_bytes`` bytes.

    Args:
      stream: binary stream to read to its end.
      max_bytes: largest content accepted.
      name: file named in the error.

    Returns:
      The content.

    Raises:
      DataError: if the stream holds more than ``max_bytes`` bytes.
    """
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(
            f"{name}: larger than the {max_bytes:,}-byte limit for this kind of file; it is not an official data file"
        )
    return data


def drain(stream: ByteSource, max_bytes: int, name: str) -> int:
    """Reads and discards the rest of ``stream`` (at most ``max_bytes``).

    Reading a gzip stream to its end makes :mod:`gzip` check the CRC-32 and
    length trailer, so corruption anywhere in the file is detected.

    Returns:
      The number of bytes discarded.

    Raises:
      DataError: if more than ``max_bytes`` bytes remain.
    """
    total = 0
    while chunk := stream.read(min(CHUNK_BYTES, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise DataError(f"{name}: unexpected data after the end of the content")
    return total
