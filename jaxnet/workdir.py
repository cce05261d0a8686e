"""A run's working directory: its recorded config, and its logs rewound on resume.

``jaxnet train --workdir W`` keeps everything about one run in ``W``::

    W/config.json      the run's config, written by check_workdir
    W/checkpoints/     jaxnet.checkpoint's folder (checkpoint_directory)
    W/metrics.jsonl    the metrics log (jaxnet.tracking), rewound on --resume
    W/tensorboard/     TensorBoard event files

:func:`check_workdir` makes sure two different runs never share a workdir
and that ``--resume`` continues the run it names; nothing in a workdir is
changed when the check fails.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

from jaxnet.errors import ConfigError, DataError

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
CONFIG_FILE = "config.json"  # the run's config, under its workdir


def checkpoint_directory(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run's checkpoints live: ``workdir/checkpoints``."""
    return pathlib.Path(workdir) / CHECKPOINT_DIR


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
    resume: bool,
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
        resume: whether this run continues the one in ``workdir``.
        mutable_keys: config keys that may change on resume (e.g.
            ``("epochs",)`` to extend a run); the new values are recorded.

    Returns:
        The workdir's path.

    Raises:
        ConfigError: the workdir is a file, cannot be written, holds another
            run (the differing keys are named), already holds this run and
            ``resume`` is False, or does not exist and ``resume`` is True.
    """
    path = pathlib.Path(workdir)
    try:
        current = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the run config must be JSON: {exc}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a folder; choose another --workdir")
    has_run = (path / CONFIG_FILE).is_file()
    if resume:
        if not path.is_dir():
            raise ConfigError(
                f"cannot resume: the workdir {path} does not exist; start the run without "
                "--resume, or pass the --workdir of an earlier run"
            )
        if not has_run:
            raise ConfigError(
                f"cannot resume: {path} holds no jaxnet run ({CONFIG_FILE} is missing); start "
                "the run without --resume"
            )
        diff = _differences(read_config(path), current, mutable_keys)
        if diff:
            raise ConfigError(
                f"cannot resume the run in {path} with other settings ({'; '.join(diff)}); "
                "rerun with the saved run's flags, or use another --workdir"
            )
    elif has_run:
        diff = _differences(read_config(path), current, ())
        if diff:
            raise ConfigError(
                f"the workdir {path} holds another run ({'; '.join(diff)}); use another "
                "--workdir, or --resume with that run's flags to continue it"
            )
        raise ConfigError(
            f"the workdir {path} already holds this run; pass --resume to continue it, or use "
            "another --workdir to start afresh"
        )
    elif checkpoint_directory(path).is_dir() and any(checkpoint_directory(path).iterdir()):
        raise ConfigError(
            f"the workdir {path} holds checkpoints but no {CONFIG_FILE}; use another --workdir"
        )
    _write_config(path, current)
    return path


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
