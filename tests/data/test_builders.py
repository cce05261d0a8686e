"""The file builders of ``tests/data/builders.py`` write what the official formats say."""

from __future__ import annotations

import pickle

import numpy as np

from tests.data.builders import idx_bytes, make_cifar_batch, make_mnist_arrays, py2_pickle


def test_py2_pickle_reads_back_with_the_standard_unpickler():
    batch = make_cifar_batch(4)
    d = pickle.loads(py2_pickle(batch), encoding="bytes")
    assert d[b"labels"] == batch[b"labels"]
    np.testing.assert_array_equal(d[b"data"], batch[b"data"])
    assert d[b"data"].dtype == np.uint8 and d[b"filenames"] == batch[b"filenames"]


def test_idx_bytes_header():
    images, labels = make_mnist_arrays(3)
    assert idx_bytes(images)[:16] == bytes.fromhex("00000803 00000003 0000001c 0000001c")
    assert idx_bytes(labels)[:8] == bytes.fromhex("00000801 00000003")


def test_make_cifar_batch_helper_is_deterministic():
    a, b = make_cifar_batch(2, 5), make_cifar_batch(2, 5)
    np.testing.assert_array_equal(a[b"data"], b[b"data"])
