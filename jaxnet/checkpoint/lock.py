"""One writer per workdir: an OS-level lock on ``W/.jaxnet.lock``, held for the whole run.

Two runs writing into one ``--workdir`` would interleave their checkpoints
and logs, and one would delete the other's save in progress as the leftover
of a killed process. :class:`WorkdirLock` makes the second one stop at once
with one line that names the first::

    the workdir W is in use by PID 1234 on host h since 2026-12-03 13:40:02 (a run is
    training there); wait for it, stop it, or choose another --workdir

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``W/.jaxnet.lock``; the
file holds JSON naming the holder (host, PID, start time, command). The
kernel releases a flock when its process dies, however it dies (``SIGKILL``
included), so the file existing is not the lock: a file left behind by a
dead process is simply taken over and rewritten. On a network file system
``flock`` is only as good as the server's locking (NFSv4 maps it onto byte
range locks, which work; some FUSE file systems ignore it).

Counterpart of the ``.lock`` files of pip's and TensorBoard's caches, or of
``filelock.FileLock``, without the dependency.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import socket
import sys
import time
from typing import Any

from jaxnet.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: see WorkdirLock's note
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("jaxnet.checkpoint.lock")

LOCK_FILE = ".jaxnet.lock"  # under a run's workdir
_READ_TRIES = 5  # a holder that has just locked may not have written its JSON yet
_READ_PAUSE_S = 0.02
_LOCK_TRIES = 20  # a lock released, or probed by holder(), between two steps of acquire: try again


def lock_path(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a workdir's lock lives: ``workdir/.jaxnet.lock``."""
    return pathlib.Path(workdir) / LOCK_FILE


class WorkdirLock:
    """An exclusive lock on a workdir, held by one process at a time (a context manager).

    Take it before anything else in the workdir is touched, and hold it for
    the run::

        with WorkdirLock(workdir):
            ...  # check_workdir, checkpoints, logs

    :meth:`acquire` creates the workdir if needed; :meth:`release` removes
    the lock file, and the workdir too when this lock created it and it is
    still empty (a refused ``--resume`` into a new folder leaves nothing).
    Only one process of a multi-process run (process 0) takes it. A forked
    child shares its parent's lock; exec'd children do not inherit it.

    Windows has no ``fcntl``: there the lock is best effort, a file created
    with ``O_CREAT | O_EXCL`` and removed on release. A process that is
    killed leaves it behind, and since a live holder cannot be told from a
    dead one, the refusal then says to delete the file by hand.

    Args:
        workdir: the run's ``--workdir`` folder.

    On a file system without locks (``flock`` fails with ``ENOLCK``) the
    lock file is written and a warning logged, and the run goes on unguarded.

    Raises (from :meth:`acquire` and ``with``):
        ConfigError: the workdir is a file or cannot be created, the lock file
            cannot be written, or another process holds the lock (named with
            PID, host and time).

    Example:
        >>> import tempfile
        >>> workdir = tempfile.mkdtemp()
        >>> with WorkdirLock(workdir) as lock:
        ...     holder(workdir)["pid"] == os.getpid()
        True
        >>> holder(workdir) is None
        True
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self.path = lock_path(self.workdir)
        self._fd: int | None = None
        self._created_workdir = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises ConfigError naming its holder; returns ``self``."""
        if self.held:
            return self
        self._make_workdir()
        try:
            self._fd = self._lock_flock() if fcntl is not None else self._lock_exclusive_create()
        except BaseException:
            self._remove_created_workdir()
            raise
        return self

    def release(self) -> None:
        """Gives the lock up (a no-op when not held); never raises for a file already gone."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Unlinked while still locked: a process that opened the old file
        # meanwhile sees, after locking it, that it is no longer the lock
        # file, and starts over (_lock_flock's inode check).
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)
        self._remove_created_workdir()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WorkdirLock({str(self.workdir)!r}, held={self.held})"

    # --- internals -----------------------------------------------------------------------------

    def _make_workdir(self) -> None:
        if self.workdir.exists() and not self.workdir.is_dir():
            raise ConfigError(f"--workdir {self.workdir} is a file, not a folder; choose another --workdir")
        if self.workdir.is_dir():
            return
        try:
            self.workdir.mkdir(parents=True)
            self._created_workdir = True
        except FileExistsError:
            if not self.workdir.is_dir():
                raise ConfigError(
                    f"--workdir {self.workdir} is a file, not a folder; choose another --workdir"
                ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot create the workdir {self.workdir}: {_os_cause(exc)}; choose a writable --workdir"
            ) from None

    def _remove_created_workdir(self) -> None:
        if self._created_workdir:
            self._created_workdir = False
            with contextlib.suppress(OSError):
                self.workdir.rmdir()  # only if still empty

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            raise
        except OSError as exc:
            raise ConfigError(
                f"cannot create the lock file {self.path}: {_os_cause(exc)}; choose a writable --workdir"
            ) from None

    def _lock_flock(self) -> int:
        for _ in range(_LOCK_TRIES):
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # ENOLCK, EOPNOTSUPP: a file system without locks (some FUSE, NFS without lockd)
                    logger.warning(
                        "cannot lock %s (%s): its file system does not support locks, so a second "
                        "run in this workdir would not be stopped",
                        self.path,
                        _os_cause(exc),
                    )
                    self._write(fd)
                    return fd
                os.close(fd)
                info = holder(self.workdir)
                if info is not None:
                    raise ConfigError(_in_use_message(self.workdir, info)) from None
                time.sleep(_READ_PAUSE_S)
                continue  # released meanwhile, or only probed by holder() elsewhere: again
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released (and removed) it between our open and lock: again
        else:
            raise ConfigError(_in_use_message(self.workdir, holder(self.workdir) or {}))
        previous = _parse(_read(fd))
        if previous:
            logger.info(
                "taking over %s from PID %s on host %s, which no longer holds it (the process "
                "ended without releasing it)",
                self.path,
                previous.get("pid"),
                previous.get("host"),
            )
        self._write(fd)
        return fd

    def _lock_exclusive_create(self) -> int:
        try:
            fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise ConfigError(
                _in_use_message(self.workdir, holder(self.workdir))
                + f" (if no run is there any more, delete {self.path})"
            ) from None
        self._write(fd)
        return fd

    def _write(self, fd: int) -> None:
        now = datetime.datetime.now().astimezone()
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now.strftime("%Y-%m-%d %H:%M:%S"),
            "started_utc": now.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        data = (json.dumps(info, indent=1) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"cannot write the lock file {self.path}: {_os_cause(exc)}; choose a writable --workdir"
            ) from None


def holder(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds ``workdir``'s lock: ``{"host", "pid", "started", ...}``, or ``None`` if nobody does.

    A lock file left by a dead process is nobody's (``None``). Where there is
    no ``fcntl`` (Windows) the file existing counts as held. A holder whose
    file names no one yet (it is being written) is ``{}``.
    """
    path = lock_path(workdir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if fcntl is not None:
            try:
                # A shared lock conflicts only with the holder's exclusive one.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass  # held
            else:
                return None  # nobody holds it (our shared lock goes with the close)
        for _ in range(_READ_TRIES):
            info = _parse(_read(fd))
            if info:
                return info
            time.sleep(_READ_PAUSE_S)
        return {}
    finally:
        os.close(fd)


def held_by_another_process(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder of ``workdir``'s lock when it is a process other than this one, else ``None``."""
    info = holder(workdir)
    if info is None:
        return None
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return None
    return info


def _in_use_message(workdir: pathlib.Path, info: dict[str, Any] | None) -> str:
    if not info:
        who = f"another process (its lock file {lock_path(workdir)} names no holder)"
    else:
        who = f"PID {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')}"
    return (
        f"the workdir {workdir} is in use by {who} (a run is training there); wait for it, stop it, "
        "or choose another --workdir"
    )


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _read(fd: int) -> bytes:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return b""


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _os_cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    text = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{name + ': ' if name else ''}{text}{where}"
