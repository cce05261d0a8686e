"""Batch iteration: the ``torch.utils.data.DataLoader`` counterpart.

The order of an epoch is a pure function of ``(seed, epoch)``, so a run can
resume mid-epoch (``start_batch``) and reproduce the exact batches, and two
processes agree on the order without talking to each other. Batches are
plain dicts of numpy arrays on the host; :func:`prefetch_to_device` moves
them to the accelerator ahead of use, onto their shards when given a
sharding.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jaxnet.errors import ConfigError, DataError

Batch = dict[str, Any]


def _count(value: Any, what: str, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value}")
    return operator.index(value)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch, a pure function of ``(seed, epoch)``.

    Counterpart of the ``RandomSampler`` inside ``DataLoader(shuffle=True)``
    (with ``torch.Generator().manual_seed``), made reproducible per epoch.

    Args:
      num_examples: size of the data set.
      seed: run seed (non-negative).
      epoch: epoch number (non-negative).
      shuffle: if False, the identity order.

    Returns:
      An ``int64`` array holding a permutation of ``range(num_examples)``.

    Raises:
      ConfigError: negative or non-integer arguments.

    >>> epoch_permutation(5, seed=0, epoch=0, shuffle=False).tolist()
    [0, 1, 2, 3, 4]
    """
    n = _count(num_examples, "num_examples", minimum=0)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([_count(seed, "seed", minimum=0), _count(epoch, "epoch", minimum=0)])
    return rng.permutation(n).astype(np.int64)


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool) -> int:
    """Batches per epoch: ``len(DataLoader(..., drop_last=drop_last))``.

    >>> num_batches(10, 4, drop_last=False), num_batches(10, 4, drop_last=True)
    (3, 2)
    """
    n = _count(num_examples, "num_examples", minimum=0)
    size = _count(batch_size, "batch_size", minimum=1)
    return n // size if drop_last else -(-n // size)


def iterate_batches(
    images: Any,
    labels: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Yields ``{"image": ..., "label": ...}`` batches of one epoch.

    Counterpart of iterating ``DataLoader(dataset, batch_size, shuffle,
    drop_last)``. Arguments are validated when this is called, not at the
    first ``next()``.

    Args:
      images: ``(N, ...)`` numpy array, or any array-like supporting ``len``
        and indexing with a 1-D integer array (e.g. a lazy tfds source).
      labels: ``(N,)`` labels, same kind of object.
      batch_size: examples per batch (the last one may be smaller unless
        ``drop_last``).
      shuffle: shuffle with :func:`epoch_permutation` ``(seed, epoch)``.
      seed: run seed.
      epoch: epoch number, so that each epoch has its own order.
      drop_last: drop the final incomplete batch.
      start_batch: skip this many batches (resume mid-epoch).

    Returns:
      An iterator of dicts of numpy arrays.

    Raises:
      ConfigError: bad ``batch_size``, ``seed``, ``epoch`` or ``start_batch``.
      DataError: images and labels have different lengths.

    >>> x, y = np.zeros((10, 2)), np.arange(10)
    >>> [b["label"].tolist() for b in iterate_batches(x, y, 4)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    n = len(images)
    if len(labels) != n:
        raise DataError(f"{n} images but {len(labels)} labels; they must have the same length")
    total = num_batches(n, batch_size, drop_last=drop_last)
    start = _count(start_batch, "start_batch", minimum=0)
    if start > total:
        raise ConfigError(
            f"start_batch {start} is past the end of the epoch ({total} batches of "
            f"{batch_size}); it must be in 0..{total}"
        )
    order = epoch_permutation(n, seed=seed, epoch=epoch, shuffle=shuffle)

    def batches() -> Iterator[Batch]:
        for b in range(start, total):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield {"image": images[idx], "label": labels[idx]}

    return batches()


def prefetch_to_device(iterator: Iterable[Any], size: int = 2, sharding: Any = None) -> Iterator[Any]:
    """Keeps ``size`` batches in flight on the device ahead of their use.

    ``jax.device_put`` is asynchronous, so while the step runs on batch
    ``i``, batches ``i+1 .. i+size`` are being copied. With ``sharding``
    (e.g. ``NamedSharding(mesh, P("data"))``) each batch lands directly on
    its shards. Counterpart of ``DataLoader(pin_memory=True)`` plus
    ``.to(device, non_blocking=True)``; the pattern of flax's
    ``jax_utils.prefetch_to_device``, without threads.

    Args:
      iterator: batches (pytrees of host arrays).
      size: batches to keep in flight (>= 1).
      sharding: a ``jax.sharding.Sharding`` (or pytree of them) for
        ``jax.device_put``; None places on the default device.

    Returns:
      An iterator of the same batches as ``jax.Array`` pytrees.

    Raises:
      ConfigError: ``size`` < 1, or a batch that the sharding cannot split
        (e.g. a last batch not divisible by the number of devices).

    >>> batches = iterate_batches(np.zeros((8, 2)), np.arange(8), 4)
    >>> [b["label"].shape for b in prefetch_to_device(batches)]
    [(4,), (4,)]
    """
    size = _count(size, "size", minimum=1)

    def put(batch: Any) -> Any:
        try:
            return jax.device_put(batch, sharding)
        except ValueError as e:
            shapes = jax.tree.map(np.shape, batch)
            raise ConfigError(
                f"cannot place a batch with shapes {shapes} on {sharding}: {e}. With a "
                "data-parallel sharding the batch size must be divisible by the number of "
                "devices; use such a batch size and drop_last=True"
            ) from e

    def prefetched() -> Iterator[Any]:
        source = iter(iterator)
        queue = collections.deque(put(b) for b in itertools.islice(source, size))
        while queue:
            yield queue.popleft()
            queue.extend(put(b) for b in itertools.islice(source, 1))

    return prefetched()
