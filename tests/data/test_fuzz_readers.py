"""Fuzzing the readers with mutated files: a correct parse or a DataError, nothing else.

Counts (seeded mutation loops, reproducible):
- IDX (MNIST): 10,000 mutated files in the slow test, 500 in the quick one,
  half gzip and half raw, images and labels files; bit flips, truncations,
  header field changes, inserted/deleted bytes, appended junk, both on the
  compressed bytes and on the content before compression. Every outcome is
  compared with an independent reference decoder: the reader must return
  exactly its array when the file is valid and raise DataError otherwise.
- CIFAR-10: 2,000 mutated cases in the slow test (1,500 pickles of all four
  styles, 500 .tar.gz archives), 200 in the quick one. A successful parse
  must be well formed (NHWC uint8, int32 labels 0..9, equal lengths).
Each case must finish in under 2 s (no hang), and no other exception type
may escape.
"""

from __future__ import annotations

import gzip
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet.data import read_cifar10, safe_extract
from jaxnet.data.cifar import CIFAR10_FOLDER, parse_batch
from jaxnet.data.mnist import IMAGES_MAGIC, LABELS_MAGIC, MAX_IDX_BYTES, read_idx
from jaxnet.errors import DataError
from tests.data.builders import (
    cifar_members,
    cifar_pickle,
    gz,
    idx_bytes,
    make_cifar_batch,
    make_mnist_arrays,
    malicious_batch,
    tar_bytes,
    tar_gz,
)

CASE_SECONDS = 2.0
PICKLE_OPCODES = bytes(range(0x80, 0x96)) + b"()tl]}RbcKJMNVXUTCB.ehaseqpgu0123456789"
INTERESTING_U32 = (0, 1, 2, 3, 28, 255, 256, 2049, 2051, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _mutate(data: bytes, rng: np.random.Generator, *, header: int = 0) -> bytes:
    """One random mutation of ``data``; ``header`` > 0 enables u32 field edits there."""
    b = bytearray(data)
    kind = rng.integers(7 if header else 6)
    if kind == 0 and b:  # flip 1..8 bits
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(b))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        del b[rng.integers(len(b) + 1) :]
    elif kind == 2:  # append junk
        b += rng.integers(0, 256, rng.integers(1, 65), dtype=np.uint8).tobytes()
    elif kind == 3 and b:  # delete a run
        i = rng.integers(len(b))
        del b[i : i + int(rng.integers(1, 17))]
    elif kind == 4:  # insert a run
        i = rng.integers(len(b) + 1)
        b[i:i] = rng.integers(0, 256, rng.integers(1, 17), dtype=np.uint8).tobytes()
    elif kind == 5 and b:  # overwrite a run with random bytes
        i = rng.integers(len(b))
        n = min(int(rng.integers(1, 9)), len(b) - i)
        b[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 6:  # set a header field (magic or a dimension) to a chosen value
        field = int(rng.integers(header // 4)) * 4
        value = int(rng.choice(INTERESTING_U32)) if rng.random() < 0.7 else int(rng.integers(2**32))
        b[field : field + 4] = value.to_bytes(4, "big")
    return bytes(b)


def _reference_idx(data: bytes, magic: int) -> np.ndarray | None:
    """Independent decoding of an IDX file: the array, or None if invalid."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return None
    ndim = magic & 0xFF
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic or len(data) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims, dtype=object))
    if 0 in dims or size > MAX_IDX_BYTES or len(data) != 4 + 4 * ndim + size:
        return None
    return np.frombuffer(data[4 + 4 * ndim :], np.uint8).reshape(dims)


def _idx_bases() -> list[tuple[bytes, int]]:
    images, labels = make_mnist_arrays(3, seed=11)
    return [(idx_bytes(images), IMAGES_MAGIC), (idx_bytes(labels), LABELS_MAGIC)]


def _run_idx_fuzz(num_cases: int, seed: int, tmp_path) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    bases = _idx_bases()
    path = tmp_path / "case.gz"
    outcomes = {"parsed": 0, "refused": 0}
    for case in range(num_cases):
        content, magic = bases[case % 2]
        header = 4 + 4 * (magic & 0xFF)
        mode = (case // 2) % 3
        if mode == 0:  # raw file
            data = _mutate(content, rng, header=header)
        elif mode == 1:  # mutate the content, then compress: valid gzip, bad IDX
            data = gz(_mutate(content, rng, header=header))
        else:  # mutate the compressed bytes
            data = _mutate(gz(content), rng)
        path.write_bytes(data)
        expected = _reference_idx(data, magic)
        start = time.perf_counter()
        try:
            got = read_idx(path, magic=magic)
        except DataError:
            got = None
        assert time.perf_counter() - start < CASE_SECONDS, f"case {case} was slow"
        if expected is None:
            assert got is None, f"case {case}: reader accepted an invalid file"
            outcomes["refused"] += 1
        else:
            assert got is not None, f"case {case}: reader refused a valid file"
            np.testing.assert_array_equal(got, expected)
            outcomes["parsed"] += 1
    return outcomes


def test_idx_fuzz_quick(tmp_path):
    outcomes = _run_idx_fuzz(500, seed=0, tmp_path=tmp_path)
    assert sum(outcomes.values()) == 500
    assert outcomes["parsed"] > 10 and outcomes["refused"] > 200  # both paths exercised


@pytest.mark.slow
def test_idx_fuzz_10000(tmp_path):
    outcomes = _run_idx_fuzz(10_000, seed=1, tmp_path=tmp_path)
    assert sum(outcomes.values()) == 10_000
    assert outcomes["parsed"] > 200 and outcomes["refused"] > 5000


@settings(max_examples=200, deadline=None)
@given(
    magic=st.sampled_from([IMAGES_MAGIC, LABELS_MAGIC, 0x0803, 0x0D03, 0x0801, 0]),
    dims=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 40), min_size=3, max_size=3),
    extra=st.integers(-20, 20),
    compress=st.booleans(),
)
def test_idx_headers_property(tmp_path_factory, magic, dims, extra, compress):
    """Arbitrary header fields: the reader agrees with the reference decoder."""
    ndim = 3 if magic in (IMAGES_MAGIC, 0x0803, 0x0D03) else 1
    dims = dims[:ndim]
    size = int(np.prod(dims, dtype=object))
    body = bytes(max(0, min(size, 100_000) + extra))
    content = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + body
    data = gz(content) if compress else content
    path = tmp_path_factory.mktemp("h") / "f"
    path.write_bytes(data)
    for expected_magic in (IMAGES_MAGIC, LABELS_MAGIC):
        expected = _reference_idx(data, expected_magic)
        try:
            got = read_idx(path, magic=expected_magic)
        except DataError:
            got = None
        assert (got is None) == (expected is None)
        if got is not None:
            np.testing.assert_array_equal(got, expected)


def _check_batch(images: np.ndarray, labels: np.ndarray) -> None:
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
    assert labels.dtype == np.int32 and labels.shape == (len(images),)
    assert labels.min() >= 0 and labels.max() <= 9


def _run_cifar_fuzz(num_pickles: int, num_archives: int, seed: int, tmp_path) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    styles = ("py2", "p2", "p4", "p5")
    bases = [cifar_pickle(make_cifar_batch(2, seed=i), s) for i, s in enumerate(styles)]
    outcomes = {"parsed": 0, "refused": 0}
    for case in range(num_pickles):
        data = bases[case % len(bases)]
        for _ in range(rng.integers(1, 4)):
            data = _mutate(data, rng)
        if data and rng.random() < 0.3:  # drop in a random pickle opcode
            i = rng.integers(len(data))
            data = data[:i] + bytes([rng.choice(list(PICKLE_OPCODES))]) + data[i + 1 :]
        start = time.perf_counter()
        try:
            images, labels = parse_batch(data, f"case{case}")
            _check_batch(images, labels)
            outcomes["parsed"] += 1
        except DataError:
            outcomes["refused"] += 1
        assert time.perf_counter() - start < CASE_SECONDS, f"pickle case {case} was slow"
    members = cifar_members(2, "py2")
    base_archive = tar_gz(members)
    base_tar = tar_bytes(members)
    path = tmp_path / "cifar-10-python.tar.gz"
    for case in range(num_archives):
        if case % 2:
            data = _mutate(base_archive, rng)
        else:  # mutate the tar itself, then compress
            data = gz(_mutate(base_tar, rng))
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            ds = read_cifar10(path)
            _check_batch(ds.train_images, ds.train_labels)
            _check_batch(ds.test_images, ds.test_labels)
            outcomes["parsed"] += 1
        except DataError:
            outcomes["refused"] += 1
        assert time.perf_counter() - start < CASE_SECONDS, f"archive case {case} was slow"
    return outcomes


def test_cifar_fuzz_quick(tmp_path):
    outcomes = _run_cifar_fuzz(150, 50, seed=0, tmp_path=tmp_path)
    assert sum(outcomes.values()) == 200 and outcomes["refused"] > 50


@pytest.mark.slow
def test_cifar_fuzz_2000(tmp_path):
    outcomes = _run_cifar_fuzz(1500, 500, seed=1, tmp_path=tmp_path)
    assert sum(outcomes.values()) == 2000
    assert outcomes["parsed"] > 20 and outcomes["refused"] > 1000


def test_malicious_pickle_batch_is_refused_and_the_marker_never_appears(tmp_path):
    marker = tmp_path / "MARKER"
    members = cifar_members(2)
    members[f"{CIFAR10_FOLDER}/data_batch_1"] = malicious_batch(marker, protocol=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(tar_gz(members))
    with pytest.raises(DataError, match=r"data_batch_1: refused to unpickle the global posix\.system"):
        read_cifar10(archive)
    assert not marker.exists()


def test_tar_with_escaping_members_writes_nothing_outside(tmp_path):
    outside = tmp_path / "escape"
    absolute = tmp_path / "absolute"
    (tmp_path / "work").mkdir()
    for name in ("../escape", str(absolute)):
        archive = tmp_path / "evil.tar.gz"
        archive.write_bytes(tar_gz({"fine.txt": b"ok", name: b"pwned"}))
        with pytest.raises(DataError, match="absolute path or a '..' component"):
            safe_extract(archive, tmp_path / "work" / "target")
    assert not outside.exists() and not absolute.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.tar.gz", "work"]
