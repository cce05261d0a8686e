"""The restricted unpickler (jaxnet.data.safe_pickle): refused globals, trailing data, resource limits."""

from __future__ import annotations

import io
import pickle
import struct
import time

import numpy as np
import pytest

from jaxnet.data import safe_pickle
from jaxnet.data.safe_pickle import load_restricted
from jaxnet.errors import DataError
from tests.data.builders import META


def test_refused_global_is_named(tmp_path):
    data = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": io.BytesIO})
    with pytest.raises(DataError, match=r"batch_9: refused to unpickle the global _io\.BytesIO"):
        load_restricted(data, "batch_9")


def test_data_after_the_pickle_is_refused():
    with pytest.raises(DataError, match="4 bytes of unexpected data"):
        load_restricted(pickle.dumps(META) + b"junk", "m")


# --- resource limits: a small file must not cost large memory or time -------


def _fast(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start < 1.0


def test_bytearray8_with_a_huge_declared_length_is_refused_fast():
    data = b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"."  # BYTEARRAY8 of 1 TiB
    with pytest.raises(DataError, match="BYTEARRAY8 of 1099511627776 bytes"):
        load_restricted(data, "b")
    data = b"\x80\x05\x96" + struct.pack("<Q", 2**30) + b"."  # 1 GiB: would be zero-filled
    assert _fast(lambda: pytest.raises(DataError, load_restricted, data, "b"))


def test_huge_memo_index_does_not_allocate():
    data = b"\x80\x02Nr" + struct.pack("<I", 2**31) + b"."  # LONG_BINPUT 2**31
    assert _fast(lambda: load_restricted(data, "m")) and load_restricted(data, "m") is None


def test_repeated_latin1_encode_cannot_amplify_memory():
    text = b"X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20)  # BINUNICODE, 1 MiB
    call = b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R"  # BINGET 0, BINGET 1, 'latin1', TUPLE2, REDUCE
    data = b"\x80\x02c_codecs\nencode\nq\x00" + text + b"q\x01](" + call * 200 + b"e."
    with pytest.raises(DataError, match="decodes to more bytes than it contains"):
        load_restricted(data, "amp")


def test_opcode_budget(monkeypatch):
    monkeypatch.setattr(safe_pickle, "MAX_OPS", 100)
    with pytest.raises(DataError, match="more than 100 pickle opcodes"):
        load_restricted(b"\x80\x02" + b"N0" * 60 + b"N.", "ops")
    assert load_restricted(b"\x80\x02" + b"N0" * 40 + b"N.", "ops") is None


def test_arrays_sharing_one_pickled_buffer_are_not_copied():
    arr = np.zeros(1 << 20, np.uint8)  # pickled once, then referenced 2000 times (memo)
    data = pickle.dumps({b"k%d" % i: arr for i in range(2000)}, protocol=5)
    assert len(data) < 2 << 20
    out = {}
    assert _fast(lambda: out.update(load_restricted(data, "v")))
    assert np.shares_memory(out[b"k0"], out[b"k1999"])  # views, not 2 GB of copies
