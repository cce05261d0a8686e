"""Tests for jaxnet.data.mnist: the IDX reader, its validation, the embedded sample."""

from __future__ import annotations

import gzip
import importlib.resources
import time

import numpy as np
import pytest

from jaxnet.data import load_dataset, read_mnist
from jaxnet.data.mnist import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from jaxnet.data.registry import load_embedded_mnist_sample
from jaxnet.errors import DataError
from tests.data.builders import gz, idx_bytes, make_mnist_arrays, write_mnist_folder

# Official MNIST class counts.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("compress", [True, False])
def test_read_mnist_round_trips_what_was_written(tmp_path, compress):
    arrays = write_mnist_folder(tmp_path, 7, 5, compress=compress)
    ds = read_mnist(tmp_path)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])
    assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 10
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in ds.source


def test_gzip_is_detected_by_content_not_name(tmp_path):
    images, _ = make_mnist_arrays(2)
    path = tmp_path / "x.gz"
    path.write_bytes(idx_bytes(images))  # raw content under a .gz name
    np.testing.assert_array_equal(read_idx(path, magic=IMAGES_MAGIC), images)


def test_truncated_file_names_the_file(tmp_path):
    images, _ = make_mnist_arrays(4)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gz(idx_bytes(images)[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated.*3,036 bytes"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_truncated_gzip_stream_names_the_file(tmp_path):
    images, _ = make_mnist_arrays(4)
    path = tmp_path / "imgs.gz"
    path.write_bytes(gz(idx_bytes(images))[:-30])  # cut inside the deflate stream
    with pytest.raises(DataError, match=r"imgs\.gz"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_wrong_magic_says_what_the_file_is(tmp_path):
    _, labels = make_mnist_arrays(4)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gz(idx_bytes(labels)))  # a labels file under the images name
    with pytest.raises(DataError, match=r"wrong magic number 2049.*expected 2051.*IDX label file"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_wrong_dtype_byte_is_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=0x0D03))  # 0x0D = float
    with pytest.raises(DataError, match=r"IDX data type 0x0d, but MNIST files hold unsigned bytes \(0x08\)"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_crc_error_is_detected(tmp_path):
    data = bytearray(gz(idx_bytes(make_mnist_arrays(4)[0])))
    data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    path = tmp_path / "f.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"f\.gz: reading failed.*CRC"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_trailing_bytes_are_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(idx_bytes(make_mnist_arrays(4)[1]) + b"junk")
    with pytest.raises(DataError, match="unexpected data after"):
        read_idx(path, magic=LABELS_MAGIC)


def test_tiny_gzip_claiming_gigabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.gz"
    header = bytes.fromhex("00000803") + (10**7).to_bytes(4, "big") + bytes.fromhex("0000001c0000001c")
    path.write_bytes(gz(header))
    with pytest.raises(DataError, match=r"7,840,000,000 bytes.*over the 268,435,456-byte limit"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_decompression_bomb_after_a_small_header_stops_early(tmp_path):
    # 4 declared labels, then 64 MiB of zeros that compress to ~64 KB.
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8)) + bytes(64 << 20), 1))
    start = time.perf_counter()
    with pytest.raises(DataError, match="unexpected data after"):
        read_idx(path, magic=LABELS_MAGIC)
    assert time.perf_counter() - start < 1.0  # read 1 byte past the data, not 64 MiB


def test_label_out_of_range_and_count_mismatch(tmp_path):
    write_mnist_folder(tmp_path, 6, 4)
    bad = np.array([1, 2, 12, 3], np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(bad)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: 1 labels outside 0\.\.9, first at index 2"):
        read_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DataError, match="holds 4 images but .* holds 3 labels"):
        read_mnist(tmp_path)


def test_wrong_image_size_is_refused(tmp_path):
    write_mnist_folder(tmp_path, 6, 4)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gz(idx_bytes(np.zeros((4, 32, 32), np.uint8))))
    with pytest.raises(DataError, match="images are 32x32, MNIST images are 28x28"):
        read_mnist(tmp_path)


def test_missing_files_are_listed(tmp_path):
    write_mnist_folder(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing MNIST files train-labels-idx1-ubyte\.gz"):
        read_mnist(tmp_path)


def test_embedded_sample():
    sample = load_embedded_mnist_sample()
    assert sample.train_images.shape == (6000, 28, 28, 1)
    assert sample.test_images.shape == (1000, 28, 28, 1)
    assert sample.source == ("embedded MNIST sample: 6000 train / 1000 test images from the official MNIST set")
    for labels, n in ((sample.train_labels, 6000), (sample.test_labels, 1000)):
        assert np.bincount(labels, minlength=10).min() >= 0.8 * n / 10  # balanced enough
    folder = importlib.resources.files("jaxnet.data") / "sample"
    total = sum(f.stat().st_size for f in folder.iterdir())  # type: ignore[attr-defined]
    assert total < 2.5e6
    readme = (folder / "README.txt").read_text()
    assert "Yann LeCun" in readme and "Corinna Cortes" in readme and "CC BY-SA 3.0" in readme


def test_real_mnist(shared_data):
    ds = load_dataset("mnist", data_dir=shared_data)
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_labels).tolist() == TRAIN_COUNTS
    assert np.bincount(ds.test_labels).tolist() == TEST_COUNTS
    assert str(shared_data / "mnist" / "train-images-idx3-ubyte.gz") in ds.source


def test_sample_is_the_head_of_the_real_set(shared_data):
    full, sample = read_mnist(shared_data / "mnist"), load_embedded_mnist_sample()
    np.testing.assert_array_equal(sample.train_images, full.train_images[:6000])
    np.testing.assert_array_equal(sample.test_labels, full.test_labels[:1000])
