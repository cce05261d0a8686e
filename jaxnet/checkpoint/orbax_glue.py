"""What stands between Orbax and the user: its log lines, and its exceptions turned into one-line errors.

Orbax logs ~60 INFO lines per save and, when a save fails, ~150-240 lines of
tracebacks from its threads, while the failure itself reaches the caller of
``save``/``wait``/``close`` anyway; and when one TensorStore write of a save
fails (a full disk), the others finish after Orbax's event loop has closed
and each prints a traceback of ``RuntimeError: Event loop is closed``.
:func:`quiet_orbax` keeps those out of the terminal (they go to the
``jaxnet.checkpoint`` logger at DEBUG), and
:func:`orbax_errors` and :func:`write_failure` turn Orbax's and the OS's
exceptions into :class:`~jaxnet.checkpoint.errors.CheckpointError` lines that
name the path, the cause and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from jaxnet.checkpoint.errors import CheckpointError
from jaxnet.errors import JaxnetError

logger = logging.getLogger("jaxnet.checkpoint")

# Saves without the ranking metric (mid-epoch ones) are intended, and so is
# opening a folder read-only (jaxnet export, inspection).
_EXPECTED_ORBAX_WARNINGS = (
    "did not provide metrics",
    "read_only=True, setting save_interval_steps=0",
    "Given directory is read only",
)
# Orbax's complaints about a step's _CHECKPOINT_METADATA (the raw file content included);
# restoring checks that file itself and names the damage (restoring.verify_files).
_STEP_METADATA_COMPLAINTS = (
    "Failed to json parse Metadata file",
    "Failed to read Metadata file",
    "Metadata file does not exist",
)

# What to do about a failed write, by errno.
WRITE_FIXES = {
    errno.ENOSPC: "free some space or choose another --workdir",
    errno.EDQUOT: "free some space (the disk quota is used up) or choose another --workdir",
    errno.EROFS: "the file system is mounted read-only; choose another --workdir",
    errno.EACCES: "make it writable or choose another --workdir",
    errno.EPERM: "make it writable or choose another --workdir",
    errno.ENOTDIR: "a file stands where a folder should be; move it or choose another --workdir",
}


class _OrbaxNoiseFilter(logging.Filter):
    """Drops Orbax's INFO/DEBUG records, the warnings about what jaxnet does on purpose,
    and the tracebacks of failures that jaxnet raises as one CheckpointError line.

    Records with a traceback go to the ``jaxnet.checkpoint`` logger at DEBUG
    instead, for whoever debugs Orbax.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        if any(text in message for text in (*_EXPECTED_ORBAX_WARNINGS, *_STEP_METADATA_COMPLAINTS)):
            return False
        if record.exc_info:
            logger.debug("Orbax: %s", message, exc_info=record.exc_info)
            return False
        return True


_ORBAX_NOISE_FILTER = _OrbaxNoiseFilter()


class _LateWriteFilter:
    """``sys.unraisablehook`` that drops one known race of a failed save and passes anything else on.

    A TensorStore write that completes after Orbax's asyncio loop for the
    save has closed (the save failed on another write) calls
    ``loop.call_soon_threadsafe`` on the closed loop; TensorStore reports the
    ``RuntimeError`` as unraisable. Only that exception, raised there, is
    dropped (logged at DEBUG); every other one goes to the previous hook.
    """

    def __init__(self, previous: Callable[[Any], Any]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if (
            isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"
            and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))
        ):
            logger.debug("a write of a failed save finished after Orbax's event loop closed: %s", exc)
            return
        self.previous(unraisable)


def quiet_orbax() -> None:
    """Filters Orbax's records out of the ``absl`` logger, and its late-write race out of ``sys.unraisablehook``.

    Both are installed once; nothing else about logging or error reporting changes.
    """
    logging.getLogger("absl").addFilter(_ORBAX_NOISE_FILTER)  # adding it twice is a no-op
    if not isinstance(sys.unraisablehook, _LateWriteFilter):
        sys.unraisablehook = _LateWriteFilter(sys.unraisablehook)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def orbax_errors(action: str) -> Iterator[None]:
    """Turns Orbax's and the OS's exceptions into one-line CheckpointErrors: ``"{action} failed: ..."``."""
    try:
        yield
    except JaxnetError:
        raise
    except Exception as exc:  # Orbax/TensorStore raise bare Exception and ValueError
        raise CheckpointError(f"{action} failed: {type(exc).__name__}: {first_line(exc)}") from exc


def call_orbax(reported: list[BaseException], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, once more if it raised a save failure that is in ``reported`` already.

    Orbax raises a failed save's exception once in every thread that waits
    for it (``manager.save`` waits for the previous save first, in jaxnet's
    worker thread); the second call goes on.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not any(exc is seen for seen in reported):
            raise
    return fn(*args, **kwargs)


# TensorStore's errors are ValueErrors whose text carries the OS's: `Failed writing: "PATH": ... [os_error_code='28']`.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_PATH = re.compile(r'Failed (?:writing|to write|reading): "([^"]+)"')


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, nearest first, each once."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OS's error behind a failed write: an OSError with an errno in ``exc``'s chain of causes
    (Orbax wraps them), or the one a TensorStore error reports in its text."""
    for current in _causes(exc):
        if isinstance(current, OSError) and current.errno:
            return current
        found = _TENSORSTORE_OS_ERROR.search(str(current))
        if found:
            code, path = int(found.group(1)), _TENSORSTORE_PATH.search(str(current))
            return OSError(code, os.strerror(code), path.group(1) if path else None)
    return None


def write_failure(exc: BaseException, where: pathlib.Path | None) -> tuple[str, str]:
    """``("No space left on device [ENOSPC] at PATH", what to do)`` for an exception of a write."""
    os_error = _os_error_in(exc)
    if os_error is None:
        text = str(exc).strip()
        return (
            f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": "),
            "choose another --workdir",
        )
    code = os_error.errno or 0  # never 0: _os_error_in returns only errors with an errno
    name = errno.errorcode.get(code, str(code))
    path = os_error.filename or where
    text = f"{os_error.strerror or os_error} [{name}]" + (f" at {path}" if path else "")
    return text, WRITE_FIXES.get(code, "choose another --workdir")
