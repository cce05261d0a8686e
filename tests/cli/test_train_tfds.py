"""`jaxnet train --dataset tfds:NAME` end to end, on a real prepared tfds data set built here."""

from __future__ import annotations

import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.core import registered  # noqa: E402

from jaxnet.data import load_dataset  # noqa: E402
from tests.helpers import run_jaxnet as run_cli  # noqa: E402

with registered.skip_registration():

    class JaxnetMnistSlice(tfds.core.GeneratorBasedBuilder):
        """1,024 train / 256 test real MNIST images (from the embedded sample), array_record."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            sample = load_dataset("mnist", download=False)
            return {
                "train": self._generate_examples(sample.train_images[:1024], sample.train_labels[:1024]),
                "test": self._generate_examples(sample.test_images[:256], sample.test_labels[:256]),
            }

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"image": image, "label": int(label)}


def test_train_on_a_prepared_tfds_dataset(tmp_path):
    JaxnetMnistSlice(data_dir=tmp_path).download_and_prepare(file_format="array_record")
    proc = run_cli(
        "train",
        "--dataset",
        "tfds:jaxnet_mnist_slice",
        "--data-dir",
        str(tmp_path),
        "--model",
        "mlp128",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--json",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dataset"] == "tfds:jaxnet_mnist_slice"
    assert "jaxnet_mnist_slice" in summary["dataset_source"]
    assert summary["steps"] == 3 * (1024 // 32)
    assert summary["test_accuracy"] > 0.7  # real digits, 3 short epochs


def test_unprepared_tfds_dataset_is_a_one_line_error(tmp_path):
    proc = run_cli("train", "--dataset", "tfds:mnist", "--data-dir", str(tmp_path), "--no-download")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "is not prepared" in proc.stderr.strip().splitlines()[-1]
