"""The CIFAR-10 reader (jaxnet.data.cifar): every pickle style, archive and folder, malformed and hostile files."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest

from jaxnet.data import load_dataset, read_cifar10
from jaxnet.data.cifar import CIFAR10_FOLDER, parse_batch
from jaxnet.errors import DataError
from tests.data.builders import (
    cifar_members,
    cifar_pickle,
    expected_cifar,
    malicious_batch,
    tar_gz,
)


def _write_folder(root, members):
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("style", ["py2", "p2", "p4", "p5"])
@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_reads_every_pickle_style_from_archive_and_folder(tmp_path, style, layout):
    members = cifar_members(3, style)
    if layout == "archive":
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar_gz(members))
    else:
        _write_folder(tmp_path, members)
    ds = read_cifar10(tmp_path)
    assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    images, labels = expected_cifar(members, "data_batch_2")
    np.testing.assert_array_equal(ds.train_images[3:6], images)
    np.testing.assert_array_equal(ds.train_labels[3:6], labels)
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.5, 0.5, 0.5)


def test_rows_are_red_plane_then_green_then_blue():
    data = np.zeros((1, 3072), np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
    data[0, 1] = 99  # red, row 0, column 1
    images, _ = parse_batch(cifar_pickle({b"data": data, b"labels": [4]}), "b")
    assert images.shape == (1, 32, 32, 3)
    assert images[0, 5, 5].tolist() == [10, 20, 30] and images[0, 0, 1, 0] == 99


def test_accepts_the_archive_path_and_the_extracted_folder_itself(tmp_path):
    members = cifar_members(2)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz(members))
    _write_folder(tmp_path / "x", members)
    a, b = read_cifar10(archive), read_cifar10(tmp_path / "x" / CIFAR10_FOLDER)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert str(archive) in a.source


def test_object_and_float_arrays_are_refused():
    for bad in (np.array([[object()]], dtype=object), np.zeros((1, 3072), np.float32)):
        with pytest.raises(DataError):
            parse_batch(pickle.dumps({b"data": bad, b"labels": [0]}), "b")


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "needs b'data' and b'labels'"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\) uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"label 10 outside 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "1"]}, "list of ints"),
        ([1, 2], "is a dict"),
    ],
)
def test_malformed_batches(batch, message):
    with pytest.raises(DataError, match=message):
        parse_batch(cifar_pickle(batch, "p4"), "b")


def test_missing_batch_and_duplicate_member(tmp_path):
    members = cifar_members(2)
    del members[f"{CIFAR10_FOLDER}/data_batch_4"]
    (tmp_path / "m.tar.gz").write_bytes(tar_gz(members))
    with pytest.raises(DataError, match="missing CIFAR-10 batches data_batch_4"):
        read_cifar10(tmp_path / "m.tar.gz")
    members = cifar_members(2)
    first = next(iter(members))
    dup = tarfile.TarInfo(first)
    dup.size = 3
    (tmp_path / "d.tar.gz").write_bytes(tar_gz(members, extra=[dup]))
    with pytest.raises(DataError, match="appears twice"):
        read_cifar10(tmp_path / "d.tar.gz")


def test_symlink_member_is_not_followed(tmp_path):
    members = cifar_members(2)
    name = f"{CIFAR10_FOLDER}/test_batch"
    del members[name]
    link = tarfile.TarInfo(name)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    (tmp_path / "s.tar.gz").write_bytes(tar_gz(members, extra=[link]))
    with pytest.raises(DataError, match="expected a regular file"):
        read_cifar10(tmp_path / "s.tar.gz")


def test_corrupt_gzip_crc_is_detected(tmp_path):
    data = bytearray(tar_gz(cifar_members(2)))
    data[-8] ^= 1
    (tmp_path / "c.tar.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="CRC"):
        read_cifar10(tmp_path / "c.tar.gz")


def test_missing_files_error(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 files found; expected cifar-10-python.tar.gz"):
        read_cifar10(tmp_path)


def test_malicious_reduce_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    members = cifar_members(2)
    members[f"{CIFAR10_FOLDER}/data_batch_3"] = malicious_batch(marker)
    _write_folder(tmp_path, members)
    with pytest.raises(DataError, match=r"data_batch_3: refused to unpickle the global posix\.system"):
        read_cifar10(tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar_gz(members))
    with pytest.raises(DataError, match=r"data_batch_3: refused .* posix\.system"):
        read_cifar10(tmp_path / "cifar-10-python.tar.gz")
    assert not marker.exists()


def test_real_cifar10(shared_data):
    ds = load_dataset("cifar10", data_dir=shared_data)
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.source.endswith("cifar-10-python.tar.gz")
    # Same pixels as the standard unpickler's reading of the first test batch rows.
    with tarfile.open(shared_data / "cifar10" / "cifar-10-python.tar.gz") as tar:
        ref = pickle.loads(tar.extractfile(f"{CIFAR10_FOLDER}/test_batch").read(), encoding="bytes")
    np.testing.assert_array_equal(ds.test_images[:50], ref[b"data"][:50].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
