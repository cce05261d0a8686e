"""A restricted unpickler for the CIFAR-10 python batches.

``pickle.load`` runs whatever callables a file names, so a downloaded pickle
can execute code. The CIFAR batches only need dicts, lists, bytes, ints and
numpy ``uint8`` arrays, so :class:`RestrictedUnpickler` allows exactly the
globals that rebuild a plain numeric ndarray and its dtype, and refuses every
other global with a :class:`DataError` naming it.

Even the allowed globals never reach numpy with the file's values: they
return small placeholder objects that record the pickled arguments, and
:func:`load_restricted` then builds the array with ``np.frombuffer`` after
checking dtype, shape and byte count.

Resource limits, so that a small file cannot take large memory or time:
the pure-Python ``pickle._Unpickler`` is used rather than the C one, whose
memo table is preallocated from a 4-byte index in the file (a 10-byte pickle
can ask for gigabytes; the Python one keeps the memo in a dict); its
``BYTEARRAY8`` handler, which zero-fills whatever length the file declares,
is replaced by a bounded one; the latin-1 encoder has a byte budget; arrays
are views of the pickled bytes, never copies; and the number of opcodes is
capped at :data:`MAX_OPS`.
"""

from __future__ import annotations

import io
import pickle
import re
import reprlib
import struct
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from jaxnet.errors import DataError

MAX_OPS = 1_000_000  # opcodes per pickle; an official batch uses about 35,000
_DTYPE_SPEC = re.compile(r"[iuf][1248]|b1")  # numeric dtypes only, never object
_ByteOrder = Literal["<", ">", "|", "="]
# Pickled byte-order text -> numpy byte order; anything else is refused.
_BYTE_ORDERS: dict[str, _ByteOrder] = {"<": "<", ">": ">", "|": "|", "=": "="}
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _text(value: Any) -> str | None:
    """``str`` for str or ASCII bytes (Python 2 pickles give bytes), else None."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class _Sealed:
    """Base of the non-class stand-ins: no ``__dict__``, and ``BUILD`` is refused.

    Without this, a pickle's BUILD opcode could set attributes on objects
    shared between calls.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ValueError("unexpected state for a pickled global")


class _NdarrayClass(_Sealed):
    """Stands in for ``numpy.ndarray``, which pickles pass to ``_reconstruct``."""

    __slots__ = ()


class _Latin1Encode(_Sealed):
    """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for bytes.

    One per unpickler, with a budget: a pickle could otherwise call it many
    times on one memoized string and build far more bytes than it holds.
    """

    __slots__ = ("budget",)

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise ValueError("_codecs.encode is only allowed as encode(str, 'latin1')")
        self.budget -= len(text)
        if self.budget < 0:
            raise ValueError("the pickle decodes to more bytes than it contains")
        return text.encode("latin1")


_NDARRAY = _NdarrayClass()


class _DtypeStub:
    """Records ``numpy.dtype(spec, align, copy)`` and its ``__setstate__``."""

    __slots__ = ("spec", "byte_order")

    def __init__(self, spec: Any, *_: Any) -> None:
        self.spec = _text(spec)
        self.byte_order: _ByteOrder | None = "|"  # None: unsupported

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2:
            order = _text(state[1])
            self.byte_order = None if order is None else _BYTE_ORDERS.get(order)
            # A structured or sub-array dtype has fields or a shape here.
            if len(state) >= 5 and any(x is not None for x in state[2:5]):
                self.byte_order = None
        else:
            self.byte_order = None

    def build(self) -> np.dtype:
        if self.spec is None or not _DTYPE_SPEC.fullmatch(self.spec) or self.byte_order is None:
            raise ValueError(f"unsupported array dtype {reprlib.repr(self.spec)}")
        return np.dtype(self.spec).newbyteorder(self.byte_order)


class _ArrayStub:
    """Records ``_reconstruct(ndarray, ...)`` and the array's ``__setstate__``."""

    __slots__ = ("state",)

    def __init__(self, *args: Any) -> None:
        if len(args) != 3 or args[0] is not _NDARRAY:
            raise ValueError("only plain numpy.ndarray objects can be rebuilt")
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.ndarray:
        state = self.state
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # drop the version number
        if not (isinstance(state, tuple) and len(state) == 4):
            raise ValueError("malformed ndarray state")
        shape, dtype, fortran, raw = state
        order = "F" if fortran is True else "C"
        return _from_bytes(raw, dtype, shape, order)


def _from_bytes(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Builds an array after checking every piece of the pickled description."""
    if not isinstance(dtype, _DtypeStub):
        raise ValueError("array dtype is not a numpy dtype")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError("array data is not raw bytes")
    if not (isinstance(shape, tuple) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"malformed array shape {reprlib.repr(shape)}")
    if order not in ("C", "F"):
        raise ValueError(f"malformed array order {reprlib.repr(order)}")
    dt = dtype.build()
    if int(np.prod(shape, dtype=object)) * dt.itemsize != len(raw):
        raise ValueError(f"array of shape {shape} and dtype {dt} does not match {len(raw)} bytes")
    # A view, not a copy: many stubs may share one buffer.
    return np.frombuffer(raw, dtype=dt).reshape(shape, order=order)


class _FrombufferStub:
    """Records ``numpy._core.numeric._frombuffer(buf, dtype, shape, order)`` (protocol 5)."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        if len(args) != 4:
            raise ValueError("malformed _frombuffer call")
        self.args = args

    def __setstate__(self, state: Any) -> None:
        raise ValueError("unexpected state for _frombuffer")

    def build(self) -> np.ndarray:
        return _from_bytes(*self.args)


# (module, name) -> what the unpickler gets instead of the real global.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,  # Python 2 / numpy 1 pickles
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,  # numpy 2 pickles
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.numeric", "_frombuffer"): _FrombufferStub,  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _FrombufferStub,
}


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that only rebuilds numeric numpy arrays and plain containers.

    Counterpart of the ``pickle.load(f, encoding="bytes")`` in the CIFAR-10
    page's ``unpickle`` helper, minus its ability to run arbitrary code.
    """

    # Set by ``pickle._Unpickler.load`` (undocumented, so not in the stubs).
    read: Callable[[int], bytes]
    append: Callable[[Any], None]

    def __init__(self, file: io.BufferedIOBase, *, filename: str, max_bytes: int) -> None:
        super().__init__(file, encoding="bytes")
        self.filename = filename
        self.max_bytes = max_bytes  # no object may be larger than the input
        self.ops_left = MAX_OPS
        self.encode = _Latin1Encode(max_bytes)

    def load_bytearray8(self) -> None:
        # The stdlib version zero-fills bytearray(n) for any n the file declares.
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self.max_bytes:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes in a {self.max_bytes}-byte pickle")
        self.append(bytearray(self.read(size)))

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return self.encode
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            qualified = f"{module}.{name}"
            if not (_PLAIN_NAME.fullmatch(qualified) and len(qualified) <= 200):
                qualified = repr(qualified[:200])  # mangled name: quote, shorten
            raise DataError(
                f"{self.filename}: refused to unpickle the global {qualified}: a "
                "CIFAR-10 batch only holds numpy arrays, lists and bytes, so this file "
                "is corrupt or malicious; delete it and download the data set again"
            ) from None


def _counted(load: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wraps an opcode handler so that each call spends one unit of ``ops_left``."""

    def counted(self: Any) -> None:
        self.ops_left -= 1
        if self.ops_left < 0:
            raise pickle.UnpicklingError(f"more than {MAX_OPS:,} pickle opcodes")
        load(self)

    return counted


# Extension codes (copyreg) and persistent ids bypass find_class: refused
# (absent from the table, so they fail as unknown opcodes).
_REFUSED_OPCODES = {op[0] for op in (pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.PERSID, pickle.BINPERSID)}
RestrictedUnpickler.dispatch = {
    code: _counted(RestrictedUnpickler.load_bytearray8 if code == pickle.BYTEARRAY8[0] else load)
    for code, load in pickle._Unpickler.dispatch.items()
    if code not in _REFUSED_OPCODES
}


def _materialize(value: Any) -> Any:
    if isinstance(value, (_ArrayStub, _FrombufferStub)):
        return value.build()
    if isinstance(value, _DtypeStub):
        raise ValueError("a bare numpy dtype is not valid here")
    return value


def load_restricted(data: bytes, filename: str) -> Any:
    """Unpickles ``data`` with :class:`RestrictedUnpickler`.

    Top-level values of a dict (and the object itself) that are pickled
    arrays come back as read-only ``np.ndarray``; arrays nested deeper stay
    placeholders and fail the caller's type checks.

    Args:
      data: the whole pickle (the caller bounds its size).
      filename: named in errors.

    Returns:
      The unpickled object.

    Raises:
      DataError: refused global, malformed pickle, data after the end.
    """
    stream = io.BytesIO(data)
    try:
        obj = RestrictedUnpickler(stream, filename=filename, max_bytes=len(data)).load()
        if isinstance(obj, dict):
            obj = {k: _materialize(v) for k, v in obj.items()}
        else:
            obj = _materialize(obj)
    except DataError:
        raise
    except RecursionError as e:
        raise DataError(f"{filename}: malformed pickle (nested too deeply)") from e
    except Exception as e:  # noqa: BLE001 -- anything the file provokes is a bad file
        # Nothing from the file is executed (find_class allows no code), so any
        # exception here -- UnpicklingError, KeyError, TypeError, IndexError,
        # struct.error, MemoryError, ... -- means the bytes are malformed.
        raise DataError(
            f"{filename}: not a valid CIFAR-10 pickle ({type(e).__name__}: "
            f"{repr(str(e)[:200])[1:-1]}); "
            "the file is corrupt, download it again"
        ) from e
    if stream.tell() != len(data):
        raise DataError(
            f"{filename}: {len(data) - stream.tell()} bytes of unexpected data after "
            "the end of the pickle; the file is corrupt"
        )
    return obj
