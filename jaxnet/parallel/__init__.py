"""Several devices and several processes: the counterpart of the tutorials' DDP/FSDP lessons.

* :mod:`jaxnet.parallel.sharding`: the device mesh, batch and state
  shardings, and the data-parallel / FSDP train step that XLA partitions
  (``jax.jit`` with shardings).
* :mod:`jaxnet.parallel.steps`: the same step written per device, with
  ``shard_map`` or ``pmap`` and an explicit gradient ``pmean``.
* :mod:`jaxnet.parallel.multiprocess`: joining several processes into one
  run (``jax.distributed``); :mod:`jaxnet.parallel.process_batches`: each
  process's slice of every batch, and the global arrays built from them.
* :mod:`jaxnet.parallel.launcher`: ``jaxnet launch``, the ``torchrun``
  counterpart that starts and watches those processes.

The old module paths (``jaxnet.sharding``, ``jaxnet.distributed_step``,
``jaxnet.distributed``, ``jaxnet.launch``) import the same modules.
"""
