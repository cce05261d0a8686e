"""Recovery: resume from the newest sound checkpoint, move damaged steps aside, clear killed saves.

Nothing here deletes a finished checkpoint: a damaged or non-finite step is
moved to ``<directory>/corrupt/<step>`` (so the resumed run can write that
step anew and a person can still look at it), and only the temporary
folders of saves whose process is gone are removed.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from typing import Any

from jaxnet.checkpoint import lock as lock_lib
from jaxnet.checkpoint.errors import CheckpointError, CheckpointMismatchError
from jaxnet.checkpoint.folder import CheckpointFolder, steps
from jaxnet.checkpoint.restoring import restore_step, step_metadata_problem

logger = logging.getLogger("jaxnet.checkpoint")

QUARANTINE_DIR = "corrupt"  # damaged steps are moved here, under the checkpoint folder


def restore_latest_good(ckpt: CheckpointFolder, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that is sound and finite, skipping the others.

    What ``--resume`` calls. A step is skipped when it is damaged, or when
    its state holds NaN/inf (written before ``fit`` refused to save such
    states; see ``save`` for what counts). Each skipped step is logged
    (logger ``jaxnet.checkpoint``, WARNING) with the reason; once an older
    step restores, the skipped folders are moved to
    ``<directory>/corrupt/<step>`` (nothing is deleted) so the resumed run
    can write those steps anew.

    Args:
        ckpt: from ``create_checkpoint_manager``.
        abstract_state: as for ``restore``.

    Returns:
        ``(state, meta)``, or ``None`` when there is no checkpoint at all (a
        run killed before its first save starts from scratch).

    Raises:
        CheckpointMismatchError: the checkpoints belong to another model.
        CheckpointError: every checkpoint is damaged or non-finite (each one
            is named).
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(steps(ckpt)):
        try:
            state, record = restore_step(ckpt, abstract_state, step, finite_only=True)
        except CheckpointMismatchError:
            raise
        except CheckpointError as exc:
            logger.warning("skipping checkpoint step %d: %s", step, exc)
            skipped.append((step, str(exc)))
            continue
        if skipped:
            where = move_aside(ckpt.directory, [s for s, _ in skipped])
            ckpt.manager.reload()
            logger.warning(
                "resuming from checkpoint step %d; the skipped step(s) %s were moved to %s",
                step,
                ", ".join(str(s) for s, _ in skipped),
                where,
            )
        else:
            logger.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
        return state, record["meta"]
    if skipped:
        raise CheckpointError(
            f"no sound checkpoint in {ckpt.directory}: "
            + "; ".join(reason for _, reason in skipped)
            + ". Start a fresh run with another --workdir"
        )
    return None


def move_aside(directory: pathlib.Path, bad_steps: list[int]) -> pathlib.Path:
    """Moves step folders to ``directory/corrupt/<step>`` (``<step>.1``, ... when taken); returns that folder."""
    target_dir = directory / QUARANTINE_DIR
    target_dir.mkdir(exist_ok=True)
    for step in bad_steps:
        target, n = target_dir / str(step), 0
        while target.exists():
            n += 1
            target = target_dir / f"{step}.{n}"
        os.replace(directory / str(step), target)
    return target_dir


def steps_with_damaged_metadata(directory: pathlib.Path) -> dict[int, str]:
    """``{step: problem}`` of the step folders whose ``_CHECKPOINT_METADATA`` is not a JSON object.

    Orbax skips a step metadata file that is not JSON, but one holding other
    JSON than an object (or fields of the wrong type) makes it raise for the
    whole folder.
    """
    folders = directory.iterdir() if directory.is_dir() else ()
    return {
        int(p.name): problem
        for p in folders
        if p.name.isdigit() and p.is_dir() and (problem := step_metadata_problem(p))
    }


def remove_unfinished_saves(directory: pathlib.Path) -> None:
    """Deletes the temporary folders of saves that a killed process left behind.

    Done when a folder is opened, synchronously, rather than with Orbax's
    background clean-up, which a process that exits soon after opening the
    folder would cut short. Nothing is deleted while another live process
    holds the workdir's lock (:mod:`jaxnet.checkpoint.lock`): its save in
    progress looks just like a killed one's.
    """
    if not directory.is_dir():
        return
    leftovers = sorted(directory.glob("*.orbax-checkpoint-tmp*"))
    if not leftovers:
        return
    holder = lock_lib.held_by_another_process(directory.parent)
    if holder is not None:
        logger.warning(
            "keeping %s: the workdir %s is in use by PID %s on host %s, and this may be its save in progress",
            ", ".join(str(p) for p in leftovers),
            directory.parent,
            holder.get("pid", "?"),
            holder.get("host", "?"),
        )
        return
    for leftover in leftovers:
        logger.info("removing %s, an unfinished save of a process that was killed", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
