"""A run's working directory: its recorded config, and its logs rewound on resume.

``jaxnet train --workdir W`` keeps everything about one run in ``W``::

    W/config.json      the run's config, written by check_workdir
    W/model/           the model's lowered forward function, for jaxnet export (jaxnet.export)
    W/checkpoints/     jaxnet.checkpoint's folder (checkpoint_directory)
    W/metrics.jsonl    the metrics log (jaxnet.tracking), rewound on --resume
    W/tensorboard/     TensorBoard event files

:func:`check_workdir` makes sure two different runs never share a workdir
and that ``--resume`` continues the run it names; nothing in a workdir is
changed when the check fails.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

from jaxnet.errors import ConfigError, DataError

logger = logging.getLogger("jaxnet.checkpoint.workdir")

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
CONFIG_FILE = "config.json"  # the run's config, under its workdir
# Config keys a resumed run may change (the new values are recorded): fit's mutable_keys, and
# what `jaxnet train --help` and the refusal of any other change name.
RESUMABLE_KEYS = ("epochs",)


def checkpoint_directory(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run's checkpoints live: ``workdir/checkpoints``."""
    return pathlib.Path(workdir) / CHECKPOINT_DIR


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished step (a folder named by its step number).

    Unfinished saves (Orbax's temporary folders) and damaged steps moved to
    ``corrupt/`` do not count.
    """
    folder = checkpoint_directory(workdir)
    return folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The config a run wrote to ``workdir/config.json``.

    Raises:
        ConfigError: no such file (not a jaxnet run's workdir).
        DataError: the file is not a JSON object.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{pathlib.Path(workdir)} holds no jaxnet run ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is damaged: {exc}; restore it or use another --workdir") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} is damaged: expected a JSON object; restore it or use another --workdir")
    return config


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Collection[str]) -> list[str]:
    missing = object()
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [
        f"{k}: {saved.get(k, '(unset)')!r} in the saved run, {current.get(k, '(unset)')!r} now"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def _write_config(path: pathlib.Path, config: dict[str, Any]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path / CONFIG_FILE)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the workdir {path}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}; choose a writable --workdir"
        ) from None


def check_workdir(
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    resume: bool | str,
    mutable_keys: Collection[str] = (),
) -> pathlib.Path:
    """Validates a run's working directory and records the run's config in it.

    A fresh run (``resume=False``) needs a new or empty-of-runs workdir; a
    resumed one needs the workdir of a run with the same config. Nothing in
    an existing workdir is changed when the check fails.

    Args:
        workdir: the ``--workdir`` folder.
        config: JSON-serializable description of the run, at least what makes
            runs incompatible: ``model``, ``dataset``, hyper-parameters, seed,
            and for ``jaxnet export`` the input ``mean``/``std``.
        resume: whether this run continues the one in ``workdir``: ``True``
            (there must be a checkpoint to continue from), ``False`` (a new
            run), or ``"auto"`` (``--resume-or-start``: continue if there is a
            checkpoint, else start the run, clearing the logs of an attempt
            that stopped before its first checkpoint).
        mutable_keys: config keys that may change on resume (e.g.
            ``("epochs",)`` to extend a run); the new values are recorded.

    Returns:
        The workdir's path.

    A workdir whose run stopped before its first checkpoint (``config.json``
    and no finished step) is refused to a fresh run and to ``resume=True``
    with a message that says so; ``resume="auto"`` with the same config
    starts that run over from step 0 after removing its stale logs.

    Raises:
        ConfigError: the workdir is a file, cannot be written, holds another
            run (the differing keys are named, and the keys that may change),
            already holds this run and ``resume`` is False, or does not exist
            and ``resume`` is True.
    """
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto'; got {resume!r}")
    path = pathlib.Path(workdir)
    try:
        current = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the run config must be JSON: {exc}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a folder; choose another --workdir")
    has_run = (path / CONFIG_FILE).is_file()
    if resume == "auto":
        if not has_run:
            resume = False  # nothing there yet: start
        elif not has_checkpoint(path):
            _check_existing_run(path, current, resume=True, mutable_keys=mutable_keys, start_over=True)
            clear_logs(path)
            logger.info(
                "the run in %s stopped before its first checkpoint; starting it over from step 0 "
                "(its logs were cleared)",
                path,
            )
            _write_config(path, current)
            return path
        else:
            resume = True
    if resume and not path.is_dir():
        raise ConfigError(
            f"cannot resume: the workdir {path} does not exist; start the run without "
            "--resume, or pass the --workdir of an earlier run"
        )
    if resume and not has_run:
        raise ConfigError(
            f"cannot resume: {path} holds no jaxnet run ({CONFIG_FILE} is missing); start the run without --resume"
        )
    if has_run:
        _check_existing_run(path, current, resume=bool(resume), mutable_keys=mutable_keys)
    elif has_checkpoint(path):
        raise ConfigError(f"the workdir {path} holds checkpoints but no {CONFIG_FILE}; use another --workdir")
    _write_config(path, current)
    return path


def _check_existing_run(
    path: pathlib.Path,
    current: dict[str, Any],
    *,
    resume: bool,
    mutable_keys: Collection[str],
    start_over: bool = False,
) -> None:
    """Raises unless ``current`` may continue (``resume``) the run recorded in ``path``."""
    saved = read_config(path)
    started = has_checkpoint(path)
    stopped = (
        f"the run in {path} stopped before its first checkpoint (or is still in its first "
        f"steps): {CONFIG_FILE} is there, no checkpoint"
    )
    if resume:
        diff = _differences(saved, current, mutable_keys)
        may = f"only {', '.join(mutable_keys)} may change on resume" if mutable_keys else "nothing may change on resume"
        if diff and started:
            raise ConfigError(
                f"cannot resume the run in {path} with other settings ({'; '.join(diff)}); {may}. "
                "Rerun with the saved run's flags, or use another --workdir"
            )
        if diff:
            raise ConfigError(
                f"cannot resume: {stopped}, and it had other settings ({'; '.join(diff)}). Rerun with "
                "its flags and --resume-or-start to start it over there, or remove the folder (nothing "
                "was saved) or choose another --workdir for the new settings"
            )
        if not started and not start_over:
            raise ConfigError(
                f"cannot resume: {stopped}, so there is nothing to resume from. Start it over with "
                "--resume-or-start (its logs are cleared), or remove the folder or choose another --workdir"
            )
        return
    diff = _differences(saved, current, ())
    if not started:
        other = f", with other settings ({'; '.join(diff)})" if diff else ""
        raise ConfigError(
            f"{stopped}{other}. Pass --resume-or-start (with its flags) to start it over there, or remove "
            "the folder or choose another --workdir"
        )
    if diff:
        raise ConfigError(
            f"the workdir {path} holds another run ({'; '.join(diff)}); use another "
            "--workdir, or --resume with that run's flags to continue it"
        )
    raise ConfigError(
        f"the workdir {path} already holds this run; pass --resume to continue it, or use "
        "another --workdir to start afresh"
    )


def clear_logs(workdir: str | os.PathLike) -> None:
    """Removes a run's logs (``metrics.jsonl``, TensorBoard events, ``curves.png``), for a run started over."""
    import shutil

    path = pathlib.Path(workdir)
    for name in ("metrics.jsonl", "curves.png"):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "tensorboard", ignore_errors=True)


def rewind_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drops the records after ``step`` from a JSON-lines log, for a resumed run.

    The resumed run writes those records again, so the log ends up equal to
    an uninterrupted run's. A last line cut short by a kill is dropped too.
    The file is rewritten atomically.

    Args:
        path: e.g. ``workdir/metrics.jsonl``; a missing file is fine.
        step: the restored checkpoint's step; records with ``"step" <= step``
            (or without a step) are kept.

    Returns:
        The number of lines dropped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
