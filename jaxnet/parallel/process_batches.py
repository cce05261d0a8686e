"""Each process's part of a multi-process run's data: its rows of every global batch, and the global arrays.

The ``DistributedSampler`` half of :mod:`jaxnet.parallel.multiprocess` (which
joins the processes): every process computes the same shuffled order and
keeps its own contiguous block of each global batch
(:func:`process_batch_slice`, :func:`iterate_process_batches`); the blocks
are assembled, without copying between processes, into one global
``jax.Array`` split over the mesh (:func:`global_batch_from_local`,
:func:`global_batches`); :func:`gather_to_host` brings sharded results back
whole for the main process to write. With one process each is its
single-process counterpart. All are importable from
:mod:`jaxnet.parallel.multiprocess` too.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxnet.data.loader import iterate_batches
from jaxnet.errors import ConfigError
from jaxnet.parallel.sharding import DATA_AXIS, batch_sharding, check_batch_divisible

__all__ = [
    "gather_to_host",
    "global_batch_from_local",
    "global_batches",
    "iterate_process_batches",
    "process_batch_slice",
]


def process_batch_slice(
    global_batch_indices: np.ndarray, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """This process's part of a global batch: its contiguous block of the indices.

    Counterpart of ``DistributedSampler``: every process computes the same
    shuffled order (a pure function of seed and epoch) and keeps block
    ``process_index`` of each global batch -- the rows that
    :func:`global_batch_from_local` places on this process's devices.

    Args:
        global_batch_indices: ``(B,)`` example indices of one global batch.
        process_index: default ``jax.process_index()``.
        process_count: default ``jax.process_count()``.

    Returns:
        ``(B / process_count,)`` indices.

    Raises:
        ConfigError: if ``B`` is not divisible by the number of processes.

    >>> process_batch_slice(np.arange(8), 1, 2).tolist()
    [4, 5, 6, 7]
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process index {index} must be in [0, {count})")
    size = len(global_batch_indices)
    if size % count:
        raise ConfigError(f"global batch size {size} is not divisible by {count} processes; use a multiple of {count}")
    per = size // count
    return np.asarray(global_batch_indices)[index * per : (index + 1) * per]


def iterate_process_batches(
    images: Any,
    labels: Any,
    global_batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[dict[str, Any]]:
    """This process's rows of every global batch of one epoch (incomplete last batch dropped).

    The same order as ``iterate_batches(..., drop_last=True)`` in a
    single-process run, so both runs see the same global batches.

    Args:
        images, labels: the whole split (each process holds or can index it).
        global_batch_size: examples per step over all processes.
        shuffle, seed, epoch, start_batch: as for :func:`jaxnet.data.iterate_batches`.

    Returns:
        An iterator of ``{"image", "label"}`` numpy batches of
        ``global_batch_size / jax.process_count()`` rows.
    """
    if global_batch_size % jax.process_count():
        check_batch_divisible(global_batch_size, jax.process_count())
    order = iterate_batches(
        np.arange(len(labels)),
        labels,
        global_batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=True,
        start_batch=start_batch,
    )
    for batch in order:
        idx = process_batch_slice(batch["image"])
        yield {"image": images[idx], "label": labels[idx]}


def global_batch_from_local(local_batch: Any, mesh: Mesh, *, axis: str = DATA_AXIS) -> Any:
    """Assembles the processes' local batches into one global batch, split over ``axis``.

    Each process passes its own ``(B / P, ...)`` rows; the result is a global
    ``(B, ...)`` ``jax.Array`` whose shards already sit on the devices that
    use them (``jax.make_array_from_process_local_data``). With one process it
    is ``jax.device_put`` onto the batch sharding.

    Args:
        local_batch: pytree of host arrays, this process's rows.
        mesh: the mesh over all processes' devices.
        axis: the batch's mesh axis.

    Returns:
        The global batch, a pytree of ``jax.Array``.

    Raises:
        ConfigError: local rows not divisible by this process's devices.
    """
    sharding = batch_sharding(mesh, axis=axis)
    local_devices = len(sharding.addressable_devices)

    def assemble(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ConfigError(
                f"this process holds {x.shape[0]} rows of the batch for {local_devices} local devices; "
                f"the global batch size must be a multiple of {mesh.shape[axis]} devices"
            )
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(assemble, local_batch)


def global_batches(local_batches: Iterable[Any], mesh: Mesh, *, size: int = 2, axis: str = DATA_AXIS) -> Iterator[Any]:
    """:func:`global_batch_from_local` over an iterator, ``size`` batches in flight.

    The multi-process counterpart of :func:`jaxnet.data.prefetch_to_device`.
    """
    if size < 1:
        raise ConfigError(f"prefetch size must be >= 1, got {size}")
    source = iter(local_batches)
    queue = collections.deque(global_batch_from_local(b, mesh, axis=axis) for b in itertools.islice(source, size))
    while queue:
        yield queue.popleft()
        queue.extend(global_batch_from_local(b, mesh, axis=axis) for b in itertools.islice(source, 1))


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a whole numpy array in every process, however it is sharded.

    For checkpoints and logs written by the main process. With several
    processes it is a collective: every process must call it.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
