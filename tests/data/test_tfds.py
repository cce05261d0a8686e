"""Tests for jaxnet.data.tfds: prepared tfds data sets read without TensorFlow.

Nothing here touches the network: an autouse fixture makes every socket
connect fail. Two kinds of data are used:

* ``tfds.testing.mock_data`` for the catalogue's mnist and cifar10, with
  metadata (``dataset_info.json``, ``features.json``) written into a tmp
  data_dir, so that the mocked builders know their real splits and count as
  prepared;
* tiny real data sets built here by ``GeneratorBasedBuilder`` classes in the
  ``array_record`` format (no TensorFlow needed): a registered one storing 2-D
  uint8 ``Tensor`` images, and an unregistered one storing PNG ``Image``
  features, which tfds reads back from files alone.

The lazy path is tested on the real sets only: it reads labels with
``tfds.decode.SkipDecoding()`` on the image, and under ``mock_data`` that
makes tfds's fake generator encode PNGs with TensorFlow.
"""

from __future__ import annotations

import io
import socket
import sys
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from tensorflow_datasets.core import registered  # noqa: E402

from jaxnet.data.dataset import ArrayDataset  # noqa: E402
from jaxnet.data.tfds import GrainArraySource, load_tfds  # noqa: E402
from jaxnet.errors import ConfigError, DataError  # noqa: E402
from tests.data.tfds_mocks import mocked, write_metadata  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly instead of retrying."""

    def refuse(*args, **kwargs):
        raise RuntimeError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- tiny real data sets -----------------------------------------------------


def gray_example(i: int) -> tuple[np.ndarray, int]:
    """Example ``i`` of jaxnet_tiny_gray: an (8, 8) uint8 image and a label."""
    image = np.random.default_rng(i).integers(0, 256, size=(8, 8), dtype=np.uint8)
    image[0, 0] = i  # identifies the example after tfds shuffles the records
    return image, i % 3


def rgb_example(i: int) -> tuple[np.ndarray, int]:
    """Example ``i`` of jaxnet_tiny_rgb: an (8, 8, 3) uint8 image and a label."""
    image = np.random.default_rng(1000 + i).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image[0, 0, 0] = i
    return image, i % 4


class JaxnetTinyGray(tfds.core.GeneratorBasedBuilder):
    """64 train / 16 test images stored as a 2-D uint8 Tensor, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(64)),
            "test": self._generate_examples(range(64, 80)),
        }

    def _generate_examples(self, indices):
        for i in indices:
            image, label = gray_example(i)
            yield i, {"image": image, "label": label}


with registered.skip_registration():

    class JaxnetTinyRgb(tfds.core.GeneratorBasedBuilder):
        """48 train / 12 validation PNG images, 4 classes; read back from files only."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=4),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(range(48)),
                "validation": self._generate_examples(range(48, 60)),
            }

        def _generate_examples(self, indices):
            for i in indices:
                image, label = rgb_example(i)
                png = io.BytesIO()
                PIL_Image.fromarray(image).save(png, format="PNG")  # PIL: no TensorFlow
                yield i, {"image": png.getvalue(), "label": label}


class JaxnetTinyNeedsTf(tfds.core.GeneratorBasedBuilder):
    """A builder whose preparation fails the way TensorFlow-only builders do."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    def _generate_examples(self):
        yield from ()


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_gray")
    JaxnetTinyGray(data_dir=data_dir).download_and_prepare(file_format="array_record")
    return data_dir


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_rgb")
    JaxnetTinyRgb(data_dir=data_dir).download_and_prepare(file_format="array_record")
    return data_dir


def check_against_generator(images, labels, example_fn):
    """Every loaded image and label equals the one its builder generated."""
    for image, label in zip(images, labels):
        index = int(image[0, 0, 0])
        expected_image, expected_label = example_fn(index)
        np.testing.assert_array_equal(image, expected_image.reshape(image.shape))
        assert label == expected_label


# --- mocked catalogue data sets (tests/data/tfds_mocks.py) ----------------


@pytest.mark.parametrize("name", ["mnist", "mnist:3.0.1"])
def test_mocked_mnist(monkeypatch, tmp_path, name):
    write_metadata(tmp_path, "mnist", {"train": 60000, "test": 10000})
    with mocked(monkeypatch, tmp_path, num_examples=20):
        ds = load_tfds(name, data_dir=tmp_path)
    assert isinstance(ds, ArrayDataset)
    assert ds.name == f"tfds:{name}"
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        assert isinstance(images, np.ndarray)
        assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (20,) and labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() < 10
    assert images.max() > 0  # random data, not zeros
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert "mnist/3.0.1" in ds.source and str(tmp_path) in ds.source


def test_mocked_cifar10_rgb(monkeypatch, tmp_path):
    write_metadata(tmp_path, "cifar10", {"train": 50000, "test": 10000})
    with mocked(monkeypatch, tmp_path, num_examples=12):
        ds = load_tfds("cifar10", data_dir=tmp_path)
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.max() < 10
    assert ds.num_classes == 10
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.5, 0.5, 0.5)


# --- real prepared data sets -------------------------------------------------


def test_download_true_prepares_and_loads(tmp_path):
    ds = load_tfds("jaxnet_tiny_gray", data_dir=tmp_path, download=True)
    assert (tmp_path / "jaxnet_tiny_gray" / "1.0.0" / "dataset_info.json").is_file()
    assert ds.train_images.shape == (64, 8, 8, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (16, 8, 8, 1)
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 3
    check_against_generator(ds.train_images, ds.train_labels, gray_example)
    check_against_generator(ds.test_images, ds.test_labels, gray_example)
    assert sorted(int(i) for i in ds.train_images[:, 0, 0, 0]) == list(range(64))
    # Fewer train images than the stats sample: mean/std are exact.
    pixels = ds.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-9)
    assert "jaxnet_tiny_gray/1.0.0" in ds.source


def test_image_features_read_from_files_with_validation_split(rgb_dir):
    ds = load_tfds("jaxnet_tiny_rgb", data_dir=rgb_dir)  # no code registered: read-only builder
    assert ds.train_images.shape == (48, 8, 8, 3) and ds.test_images.shape == (12, 8, 8, 3)
    assert ds.num_classes == 4
    check_against_generator(ds.train_images, ds.train_labels, rgb_example)
    check_against_generator(ds.test_images, ds.test_labels, rgb_example)
    assert sorted(int(i) for i in ds.test_images[:, 0, 0, 0]) == list(range(48, 60))
    assert "train/validation" in ds.source
    assert len(ds.mean) == 3 and all(0.3 < m < 0.7 for m in ds.mean)


@pytest.mark.parametrize("name", ["jaxnet_tiny_gray", "jaxnet_tiny_rgb"])
def test_lazy_equals_in_memory_on_disk(gray_dir, rgb_dir, name):
    data_dir = gray_dir if name == "jaxnet_tiny_gray" else rgb_dir
    eager = load_tfds(name, data_dir=data_dir)
    lazy = load_tfds(name, data_dir=data_dir, max_in_memory_bytes=0)
    images = lazy.train_images
    assert isinstance(images, GrainArraySource) and isinstance(lazy.test_images, GrainArraySource)
    assert images.shape == eager.train_images.shape and images.dtype == np.uint8
    index = np.array([5, 0, 40, 5, -1])
    np.testing.assert_array_equal(images[index], eager.train_images[index])
    np.testing.assert_array_equal(images[7], eager.train_images[7])
    np.testing.assert_array_equal(images[2:9:3], eager.train_images[2:9:3])
    np.testing.assert_array_equal(images.dataset[11], eager.train_images[11])
    np.testing.assert_array_equal(lazy.train_labels, eager.train_labels)
    np.testing.assert_array_equal(lazy.test_labels, eager.test_labels)
    assert lazy.mean == eager.mean and lazy.std == eager.std
    assert images[np.array([], dtype=np.int64)].shape == (0, *eager.image_shape)


def test_lazy_source_rejects_bad_indices(gray_dir):
    images = load_tfds("jaxnet_tiny_gray", data_dir=gray_dir, max_in_memory_bytes=0).train_images
    with pytest.raises(IndexError, match="out of range for 64"):
        images[np.array([0, 64])]
    with pytest.raises(TypeError, match="1-D integer array"):
        images[np.array([0.0, 1.0])]
    with pytest.raises(TypeError, match="1-D integer array"):
        images[np.zeros((2, 2), dtype=np.int64)]


def test_memory_threshold_is_per_split(gray_dir):
    # train: 64 images of 8*8 bytes = 4096 bytes; test: 16 images = 1024 bytes.
    fits = load_tfds("jaxnet_tiny_gray", data_dir=gray_dir, max_in_memory_bytes=4096)
    assert isinstance(fits.train_images, np.ndarray)
    split = load_tfds("jaxnet_tiny_gray", data_dir=gray_dir, max_in_memory_bytes=4095)
    assert isinstance(split.train_images, GrainArraySource)
    assert isinstance(split.test_images, np.ndarray)


def test_grain_array_source_over_a_plain_sequence():
    records = [{"image": np.full((2, 3), i, dtype=np.uint8), "label": i} for i in range(5)]
    images = GrainArraySource(records, "image", (2, 3, 1))  # a list has no __getitems__
    out = images[np.array([4, 1])]
    assert out.shape == (2, 2, 3, 1) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [4, 1]
    assert len(images) == 5 and "GrainArraySource" in repr(images)


# --- errors ------------------------------------------------------------------


def test_unprepared_set_fails_fast_with_the_fix(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_tfds("mnist", data_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert f"tfds build mnist --data_dir={tmp_path} --file_format=array_record" in message
    assert "download=True" in message


def test_unknown_name_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no_such_jaxnet_set") as info:
        load_tfds("no_such_jaxnet_set", data_dir=tmp_path)
    assert len(str(info.value)) < 600  # tfds's list of every data set is cut off


def test_failed_preparation_explains(tmp_path):
    with pytest.raises(DataError, match="TensorFlow") as info:
        load_tfds("jaxnet_tiny_needs_tf", data_dir=tmp_path, download=True)
    assert "No module named 'tensorflow'" in str(info.value)


def test_tfrecord_only_set_names_the_conversion(tmp_path):
    write_metadata(tmp_path, "mnist", {"train": 10, "test": 10}, file_format="tfrecord")
    with pytest.raises(DataError, match="array_record") as info:
        load_tfds("mnist", data_dir=tmp_path)
    assert "convert_format" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_key": "picture"}, r"no feature 'picture'.*\['image', 'label'\].*image_key="),
        ({"label_key": "class"}, r"no feature 'class'.*label_key="),
        ({"image_key": "label"}, r"dtype int64.*uint8.*image_key="),
        ({"label_key": "image"}, r"not a ClassLabel.*label_key="),
    ],
)
def test_bad_feature_keys(gray_dir, kwargs, match):
    with pytest.raises(DataError, match=match):
        load_tfds("jaxnet_tiny_gray", data_dir=gray_dir, **kwargs)


def test_variable_size_images_are_rejected(tmp_path):
    write_metadata(tmp_path, "caltech101", {"train": 10, "test": 10})
    with pytest.raises(DataError, match=r"shape \(None, None, 3\).*fixed-size"):
        load_tfds("caltech101", data_dir=tmp_path)


def test_missing_splits_are_listed(tmp_path):
    write_metadata(tmp_path, "mnist", {"train": 10, "extra": 10})
    with pytest.raises(DataError, match=r"splits \['extra', 'train'\]"):
        load_tfds("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("module", ["tensorflow_datasets", "importlib_resources"])
def test_missing_extra(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ConfigError, match=r'pip install "jaxnet\[tfds\]"') as info:
        load_tfds("mnist", data_dir=tmp_path)
    assert module in str(info.value)


def test_missing_grain_for_lazy_reads(monkeypatch):
    monkeypatch.setitem(sys.modules, "grain", None)
    with pytest.raises(ConfigError, match=r"'grain'.*jaxnet\[tfds\]"):
        GrainArraySource([{"image": np.zeros((2, 2), np.uint8)}], "image", (2, 2, 1))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2GB"])
def test_bad_memory_limit(tmp_path, bad):
    with pytest.raises(ConfigError, match="max_in_memory_bytes"):
        load_tfds("mnist", data_dir=tmp_path, max_in_memory_bytes=bad)
