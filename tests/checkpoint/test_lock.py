"""Tests of jaxnet.checkpoint.lock: one writer per workdir, refused with the holder's name, taken over after a kill."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxnet.checkpoint import lock
from jaxnet.errors import ConfigError
from tests.helpers import REPO

_HOLDER = textwrap.dedent("""
    import sys, time
    from jaxnet.checkpoint.lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("LOCKED", flush=True)
    time.sleep(600)
""")

_TRY = textwrap.dedent("""
    import sys
    from jaxnet.errors import ConfigError
    from jaxnet.checkpoint.lock import WorkdirLock
    try:
        WorkdirLock(sys.argv[1]).acquire()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print("LOCKED")
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def holder_process(tmp_path):
    """Starts a process that holds the lock of ``tmp_path / "w"``; yields it (killed at the end)."""
    procs = []

    def start(workdir: pathlib.Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(workdir)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == "LOCKED", proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path, holder_process):
    workdir = tmp_path / "w"
    first = holder_process(workdir)
    second = subprocess.run(
        [sys.executable, "-c", _TRY, str(workdir)], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 2, second.stdout
    message = second.stderr.strip()
    assert "\n" not in message
    assert re.fullmatch(
        rf"the workdir {re.escape(str(workdir))} is in use by PID {first.pid} on host "
        rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(a run is training "
        r"there\); wait for it, stop it, or choose another --workdir",
        message,
    ), message
    # in this process too, and the holder's file is untouched
    with pytest.raises(ConfigError, match=f"in use by PID {first.pid} "):
        lock.WorkdirLock(workdir).acquire()
    assert lock.holder(workdir)["pid"] == first.pid
    assert json.loads((workdir / lock.LOCK_FILE).read_text())["pid"] == first.pid


def test_a_killed_holders_lock_is_taken_over(tmp_path, holder_process, caplog):
    workdir = tmp_path / "w"
    first = holder_process(workdir)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (workdir / lock.LOCK_FILE).is_file()  # left behind, but nobody's lock any more
    assert lock.holder(workdir) is None
    with caplog.at_level("INFO", logger="jaxnet.checkpoint.lock"):
        with lock.WorkdirLock(workdir) as taken:
            assert taken.held
            info = json.loads((workdir / lock.LOCK_FILE).read_text())
            assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
            assert lock.held_by_another_process(workdir) is None  # it is ours
    assert f"from PID {first.pid}" in caplog.text
    assert not (workdir / lock.LOCK_FILE).exists()
    assert workdir.is_dir()  # it existed before this lock: kept


def test_release_lets_the_next_one_in_and_removes_a_folder_it_created(tmp_path):
    workdir = tmp_path / "new" / "w"
    first = lock.WorkdirLock(workdir).acquire()
    assert workdir.is_dir() and lock.holder(workdir)["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"in use by PID {os.getpid()} "):
        lock.WorkdirLock(workdir).acquire()  # another lock in this same process is another writer
    first.release()
    first.release()  # a no-op
    assert not workdir.exists()  # created by the lock and still empty
    with lock.WorkdirLock(workdir):
        (workdir / "config.json").write_text("{}")
    assert workdir.is_dir() and sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_a_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "w"
    path.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        lock.WorkdirLock(path).acquire()
    assert str(info.value) == f"--workdir {path} is a file, not a folder; choose another --workdir"
    with pytest.raises(ConfigError, match="cannot create the workdir .*ENOTDIR|is a file"):
        lock.WorkdirLock(path / "sub").acquire()
    assert path.read_text() == "not a folder"


def test_without_fcntl_an_exclusive_file_is_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "fcntl", None)
    workdir = tmp_path / "w"
    with lock.WorkdirLock(workdir):
        assert lock.holder(workdir)["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by PID {os.getpid()} .*delete .*\.jaxnet\.lock"):
            lock.WorkdirLock(workdir).acquire()
    assert not (workdir / lock.LOCK_FILE).exists()
    with lock.WorkdirLock(workdir):
        pass


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import types

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(
        lock,
        "fcntl",
        types.SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_SH=fcntl.LOCK_SH, LOCK_NB=fcntl.LOCK_NB),
    )
    with caplog.at_level("WARNING", logger="jaxnet.checkpoint.lock"):
        with lock.WorkdirLock(tmp_path / "w") as taken:
            assert taken.held and json.loads((tmp_path / "w" / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "does not support locks" in caplog.text and "ENOLCK" in caplog.text
