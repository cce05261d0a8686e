"""Tests for jaxnet.data.loader: permutations, batching, resume, prefetch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxnet.data import epoch_permutation, iterate_batches, num_batches, prefetch_to_device
from jaxnet.errors import ConfigError, DataError


def test_epoch_permutation_is_deterministic_per_seed_and_epoch():
    a = epoch_permutation(100, seed=3, epoch=1, shuffle=True)
    assert np.array_equal(a, epoch_permutation(100, seed=3, epoch=1, shuffle=True))
    assert sorted(a.tolist()) == list(range(100)) and a.dtype == np.int64
    assert not np.array_equal(a, epoch_permutation(100, seed=3, epoch=2, shuffle=True))
    assert not np.array_equal(a, epoch_permutation(100, seed=4, epoch=1, shuffle=True))
    assert epoch_permutation(5, seed=3, epoch=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "n, size, drop_last, expected",
    [(10, 4, False, 3), (10, 4, True, 2), (8, 4, True, 2), (0, 4, False, 0), (3, 4, True, 0)],
)
def test_num_batches_matches_dataloader_len(n, size, drop_last, expected):
    assert num_batches(n, size, drop_last=drop_last) == expected


def test_iterate_batches_covers_every_example_once():
    images, labels = np.arange(10 * 2).reshape(10, 2), np.arange(10)
    batches = list(iterate_batches(images, labels, 4, shuffle=True, seed=1))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    seen = np.concatenate([b["label"] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for b in batches:  # images stay paired with their labels
        np.testing.assert_array_equal(b["image"], images[b["label"]])
    dropped = list(iterate_batches(images, labels, 4, shuffle=True, seed=1, drop_last=True))
    assert [len(b["label"]) for b in dropped] == [4, 4]


def test_start_batch_resumes_mid_epoch_with_the_same_batches():
    images, labels = np.zeros((23, 1)), np.arange(23)
    full = list(iterate_batches(images, labels, 5, shuffle=True, seed=7, epoch=3))
    tail = list(iterate_batches(images, labels, 5, shuffle=True, seed=7, epoch=3, start_batch=2))
    assert [b["label"].tolist() for b in tail] == [b["label"].tolist() for b in full[2:]]
    assert list(iterate_batches(images, labels, 5, start_batch=5)) == []


def test_works_with_array_likes():
    class Lazy:  # len + integer-array indexing, like a lazy tfds source
        def __init__(self, n):
            self.n, self.reads = n, 0

        def __len__(self):
            return self.n

        def __getitem__(self, idx):
            self.reads += 1
            return np.stack([np.full((2, 2), i) for i in idx])

    images = Lazy(7)
    batches = list(iterate_batches(images, np.arange(7), 3))
    assert images.reads == 3 and batches[2]["image"].shape == (1, 2, 2)
    assert batches[1]["image"][0, 0, 0] == 3


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ConfigError, "batch_size must be >= 1, got 0"),
        ({"batch_size": 2.5}, ConfigError, "batch_size must be an integer"),
        ({"batch_size": True}, ConfigError, "batch_size must be an integer"),
        ({"batch_size": 2, "start_batch": 9}, ConfigError, r"start_batch 9 is past the end.*0\.\.5"),
        ({"batch_size": 2, "shuffle": True, "seed": -1}, ConfigError, "seed must be >= 0"),
    ],
)
def test_bad_arguments_raise_at_call_time(kwargs, error, message):
    with pytest.raises(error, match=message):
        iterate_batches(np.zeros((10, 1)), np.zeros(10), **kwargs)  # no next() needed


def test_length_mismatch():
    with pytest.raises(DataError, match="10 images but 9 labels"):
        iterate_batches(np.zeros((10, 1)), np.zeros(9), 2)


def test_prefetch_yields_the_same_batches_as_device_arrays_and_keeps_size_in_flight():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"image": np.full((4, 2), i, np.float32), "label": np.full(4, i, np.int32)}

    it = prefetch_to_device(source(), size=3)
    first = next(it)
    assert pulled == [0, 1, 2]  # size batches already sent to the device
    assert isinstance(first["image"], jax.Array) and first["label"].tolist() == [0] * 4
    rest = list(it)
    assert [int(b["label"][0]) for b in rest] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="size must be >= 1"):
        prefetch_to_device(source(), size=0)


def test_prefetch_places_batches_on_their_shards():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    images, labels = np.arange(20 * 3, dtype=np.float32).reshape(20, 3), np.arange(20)
    batches = iterate_batches(images, labels, 8, drop_last=True)
    out = list(prefetch_to_device(batches, sharding=sharding))
    assert len(out) == 2
    for batch in out:
        assert batch["image"].sharding == sharding and len(batch["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out[1]["image"]), images[8:16])
    last = iterate_batches(images, labels, 8, start_batch=2)  # the 4-example remainder
    with pytest.raises(ConfigError, match="divisible by the number of devices"):
        list(prefetch_to_device(last, sharding=sharding))
