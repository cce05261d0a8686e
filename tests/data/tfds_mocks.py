"""Catalogue data sets of tensorflow-datasets, mocked: metadata written to a folder, ``mock_data`` reading it.

Shared by ``tests/data/test_tfds.py`` and ``tests/test_fit_api.py``; import it
after ``pytest.importorskip("tensorflow_datasets")``.
"""

from __future__ import annotations

import contextlib

import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking


def write_metadata(data_dir, name: str, splits: dict[str, int], file_format: str = "array_record"):
    """Writes dataset_info.json/features.json so tfds sees ``name`` as prepared."""
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    infos = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[n],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path,
                dataset_name=builder.name,
                split=split,
                filetype_suffix=file_format,
            ),
        )
        for split, n in splits.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


@contextlib.contextmanager
def mocked(monkeypatch, data_dir, num_examples):
    """``tfds.testing.mock_data`` reading metadata from ``data_dir``."""

    # tfds 4.9.10's mock stores `__getitems__` as a plain attribute of a
    # MagicMock, so it is called without `self` and fails; take the keys from
    # the last positional argument whatever tfds passes.
    def getitems(*args, generator, serialized=False):
        return [generator[k] for k in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", getitems)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
        yield
