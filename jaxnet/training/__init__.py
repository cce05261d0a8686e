"""The pieces that :func:`jaxnet.fit` (in :mod:`jaxnet.train`) is made of, one concern per module.

* :mod:`~jaxnet.training.plan`: every argument checked and resolved before
  anything is compiled or written (the output kind, loss, metrics, the best
  checkpoint's metric); the CLI calls it too.
* :mod:`~jaxnet.training.steps`: the train state and the compiled steps of a run
  (single device, sharded, scanned, loss-scaled).
* :mod:`~jaxnet.training.run_files`: the workdir as one context manager: its
  lock, the recorded config, the write probe, the checkpoints and the logs.
* :mod:`~jaxnet.training.loop`: one epoch of steps, and resuming inside one.
* :mod:`~jaxnet.training.evaluation`: batched evaluation with padding masked.
* :mod:`~jaxnet.training.stops`: SIGTERM/SIGINT and divergence, agreed by
  every process.
* :mod:`~jaxnet.training.result`: each epoch's record, the summary and
  :class:`~jaxnet.training.result.FitResult`.

Users call ``jaxnet.fit``; these modules are for reading how it works and for
building a loop of one's own from the same parts. The old paths
``jaxnet.fit_plan``, ``jaxnet.run_files``, ``jaxnet.stops`` and
``jaxnet.evaluation`` import the same modules.
"""
