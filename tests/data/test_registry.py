"""Tests for jaxnet.data.load_dataset: names, resolution order, error texts."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import jaxnet.data
from jaxnet.data import DATASETS, load_dataset, registry
from jaxnet.errors import ConfigError, DataError
from tests.data.builders import write_mnist_folder


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown data set 'mnsit'; valid names: mnist, cifar10, linear, or tfds:NAME"
    ):
        load_dataset("mnsit")
    with pytest.raises(ConfigError, match="valid names"):
        load_dataset("tfds:")
    assert DATASETS == ("mnist", "cifar10", "linear")


def test_empty_data_dir_error_names_folder_files_and_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    text = str(info.value)
    assert f"no mnist files in {tmp_path / 'mnist'}" in text
    assert "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz" in text
    assert "omit --data-dir" in text and "JAXNET_DATA_DIR" in text
    with pytest.raises(DataError, match=r"no cifar10 files in .*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_partial_data_dir_lists_the_missing_files(tmp_path):
    write_mnist_folder(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"\(missing: t10k-images-idx3-ubyte\.gz\)"):
        load_dataset("mnist", data_dir=tmp_path)


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    arrays = write_mnist_folder(tmp_path / "mnist", 5, 3)
    monkeypatch.setenv("JAXNET_DATA_DIR", str(tmp_path))
    ds = load_dataset("mnist", download=False)
    assert ds.num_train == 5
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test"][0])


def test_cache_is_used_before_downloading(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "jaxnet" / "mnist", 4, 2)
    monkeypatch.delenv("JAXNET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert registry.default_cache_dir() == tmp_path / "jaxnet"
    ds = load_dataset("mnist", download=False)
    assert ds.num_train == 4 and str(tmp_path / "jaxnet" / "mnist") in ds.source


def test_no_download_and_empty_cache_gives_the_sample(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXNET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert load_dataset("mnist", download=False).num_train == 6000
    with pytest.raises(
        DataError, match=r"cifar10 is not available \(downloading is off \(--no-download / download=False\)\)"
    ):
        load_dataset("cifar10", download=False)


def test_tfds_names_dispatch_lazily(monkeypatch):
    calls = []
    fake = type(sys)("jaxnet.data.tfds")
    fake.load_tfds = lambda name, **kw: calls.append((name, kw)) or "ds"
    monkeypatch.setitem(sys.modules, "jaxnet.data.tfds", fake)
    assert load_dataset("tfds:fashion_mnist", data_dir="/x", download=False) == "ds"
    assert calls == [("fashion_mnist", {"data_dir": "/x", "download": False})]
    assert jaxnet.data.load_tfds is fake.load_tfds


def test_importing_jaxnet_data_does_not_import_tensorflow_datasets():
    code = "import sys, jaxnet.data; print('tensorflow_datasets' in sys.modules, 'jaxnet.data.tfds' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_linear_is_the_generated_regression_set():
    ds = load_dataset("linear")
    assert ds.num_classes == 0 and ds.train_labels.tolist() == [2.0, 4.0, 6.0, 8.0]
