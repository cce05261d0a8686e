"""Checkpoints of the whole training state, on Orbax, that resume a run exactly.

Counterpart of the tutorials' ``torch.save({"model": ..., "optimizer": ...,
"epoch": ...}, path)`` and ``load_state_dict``, with what a long run needs:
asynchronous saves, retention of the newest and the best, SHA-256 checks of
every file and array, recovery from damaged or non-finite steps, and
failures in one line. The default checkpoint is in Orbax's own format, so
plain ``orbax-checkpoint`` restores it without jaxnet.

The design (layout on disk, save and restore paths, integrity, recovery) is
in ``jaxnet/checkpoint/README.md``; each module owns one concern:
:mod:`~jaxnet.checkpoint.manager` (open, close), :mod:`~jaxnet.checkpoint.folder`
(the handle), :mod:`~jaxnet.checkpoint.saving`, :mod:`~jaxnet.checkpoint.restoring`,
:mod:`~jaxnet.checkpoint.recovery`, :mod:`~jaxnet.checkpoint.arrays` (the
``arrays.npz`` format), :mod:`~jaxnet.checkpoint.integrity` (digests),
:mod:`~jaxnet.checkpoint.orbax_glue` (Orbax's logs and errors), and beside
them :mod:`~jaxnet.checkpoint.workdir` and :mod:`~jaxnet.checkpoint.lock`
(a run's folder and its one writer).
"""

from __future__ import annotations

from jaxnet.checkpoint.arrays import ARRAYS_FILE
from jaxnet.checkpoint.errors import CheckpointError, CheckpointMismatchError
from jaxnet.checkpoint.folder import DEFAULT_BEST_METRIC, Checkpointer, CheckpointFolder, best, latest, steps
from jaxnet.checkpoint.integrity import MANIFEST_FILE, params_sha256
from jaxnet.checkpoint.manager import ARRAY_FORMATS, close, create_checkpoint_manager
from jaxnet.checkpoint.recovery import QUARANTINE_DIR, restore_latest_good
from jaxnet.checkpoint.restoring import (
    STEP_METADATA_FILE,
    read_record,
    resolve_step,
    restore,
    restore_variables,
    verify_files,
)
from jaxnet.checkpoint.saving import check_saves, probe_writable, save, wait

__all__ = [
    "ARRAYS_FILE",
    "ARRAY_FORMATS",
    "DEFAULT_BEST_METRIC",
    "MANIFEST_FILE",
    "QUARANTINE_DIR",
    "STEP_METADATA_FILE",
    "CheckpointError",
    "CheckpointFolder",
    "CheckpointMismatchError",
    "Checkpointer",
    "best",
    "check_saves",
    "close",
    "create_checkpoint_manager",
    "latest",
    "params_sha256",
    "probe_writable",
    "read_record",
    "resolve_step",
    "restore",
    "restore_latest_good",
    "restore_variables",
    "save",
    "steps",
    "verify_files",
    "wait",
]
