"""Fault injection for jaxnet.checkpoint.saving: saves that cannot succeed end in one line, fast, losing nothing.

A failing save must end in one CheckpointError line within seconds (never a
wait on Orbax's 300-s signal timeouts), remove its partial folder and leave
the earlier checkpoints restorable, in either array format. Disks that are
full or read-only are real mounts where this process may mount (root in a
container), else skipped; the same failures are also injected by
monkeypatching.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import arrays, saving
from tests.checkpoint.helpers import dict_state, tmp_dirs
from tests.helpers import REPO

FAST = 10.0  # seconds: the longest a failure may take to surface
# A tmpfs that holds one checkpoint of dict_state(noisy=True) but not two, by format (Orbax's has more files).
ONE_CHECKPOINT_DISK = {"npz": "200k", "orbax": "300k"}


def _orbax_threads() -> list[threading.Thread]:
    """Threads of Orbax's still alive: a failed save must leave none waiting on a signal."""
    names = (
        "jaxnet_npz_save",
        "json_ch_save",
        "async_save",
        "save_finalize",
        "_target_setting_result",
        "np_type_handler",
        "array_type_handler",
        "write_metadata_after_commits",
    )
    return [t for t in threading.enumerate() if t.is_alive() and any(n in t.name for n in names)]


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount here ({' '.join(args)}: {result.stderr.strip() or result.returncode})")


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _read_only(path: pathlib.Path):
    """``path`` as a read-only bind mount of itself (permission bits do not stop root)."""
    _mount("--bind", str(path), str(path))
    try:
        result = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _restores(directory: pathlib.Path, step: int, state: dict) -> bool:
    ckpt = C.create_checkpoint_manager(directory, read_only=True)
    try:
        restored, _ = C.restore(ckpt, state, step=step)
        return bool(np.array_equal(np.asarray(restored["params"]["w"]), state["params"]["w"]))
    finally:
        C.close(ckpt)


def _fails_fast(ckpt: C.CheckpointFolder, state: dict, step: int) -> tuple[str, float]:
    """Saves ``step`` and waits; returns the CheckpointError's message and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(C.CheckpointError) as info:
        C.save(ckpt, step, state, meta={"step": step})
        C.wait(ckpt)
    took = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message and took < FAST, (took, message)
    return message, took


def _fails_fast_wait(ckpt: C.CheckpointFolder) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(C.CheckpointError) as info:
        C.wait(ckpt)
    took = time.monotonic() - start
    assert "\n" not in str(info.value) and took < FAST, took
    return str(info.value), took


def _disk_full_in_the_background(monkeypatch, array_format: str, *, partial: bool = True) -> None:
    """Makes writing the ``state`` item fail with ENOSPC in Orbax's background thread (half a file first).

    The failure comes where a full disk makes it come: in the commit future
    of the item's handler, after ``save`` has returned.
    """

    async def disk_full(path: pathlib.Path) -> None:
        if partial:
            with open(os.fspath(path), "wb") as f:
                f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if array_format == "npz":

        async def write(self, path, flat):
            await disk_full(path)

        monkeypatch.setattr(arrays.NpzHandler, "_write", write)
    else:

        async def async_save(self, directory, args):
            return [
                ocp.future.CommitFutureAwaitingContractedSignals(disk_full(directory / "d"), name="np_type_handler")
            ]

        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


# --- probe_writable ----------------------------------------------------------------------------


def test_probe_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "w" / "checkpoints"
    assert C.probe_writable(folder) == folder.absolute()
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_probe_writable_names_the_path_and_the_cause(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(C.CheckpointError, match=r"checkpoints: it is a file, not a folder \[ENOTDIR\]"):
        C.probe_writable(tmp_path / "checkpoints")
    with pytest.raises(C.CheckpointError, match=r"Not a directory \[ENOTDIR\] at .*checkpoints"):
        C.probe_writable(tmp_path / "checkpoints" / "sub")

    def fail(code: int):
        def raising(fd):
            raise OSError(code, os.strerror(code))

        return raising

    for code, text in [
        (errno.ENOSPC, r"No space left on device \[ENOSPC\] at .*free some space"),
        (errno.EACCES, r"Permission denied \[EACCES\] at .*make it writable"),
        (errno.EROFS, r"Read-only file system \[EROFS\] at .*read-only"),
    ]:
        monkeypatch.setattr(saving.os, "fsync", fail(code))
        with pytest.raises(C.CheckpointError, match=text) as info:
            C.probe_writable(tmp_path / "ok")
        monkeypatch.undo()
        assert str(tmp_path / "ok") in str(info.value) and "\n" not in str(info.value)
        assert list((tmp_path / "ok").iterdir()) == []  # the probe file is gone


def test_probe_writable_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with _read_only(folder):
        with pytest.raises(
            C.CheckpointError,
            match=rf"cannot write checkpoints to {folder}: Read-only file "
            r"system \[EROFS\]",
        ):
            C.probe_writable(folder)


# --- saves that cannot succeed -----------------------------------------------------------------


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_a_file_in_the_way_fails_at_once_and_keeps_the_old_checkpoint(tmp_path, array_format):
    directory = tmp_path / "checkpoints"
    state = dict_state()
    ckpt = C.create_checkpoint_manager(directory, array_format=array_format)
    C.save(ckpt, 1, state, meta={"step": 1})
    C.wait(ckpt)
    os.replace(directory, tmp_path / "moved")
    directory.write_text("in the way")
    message, _ = _fails_fast(ckpt, state, 2)
    assert message.startswith(f"saving checkpoint step 2 to {directory} failed: Not a directory [ENOTDIR] at ")
    assert "move it or choose another --workdir" in message
    C.close(ckpt)
    assert _orbax_threads() == []
    directory.unlink()
    os.replace(tmp_path / "moved", directory)
    assert _restores(directory, 1, state)


def test_opening_a_checkpoint_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(C.CheckpointError, match="checkpoints is a file, not a folder; move it or choose"):
        C.create_checkpoint_manager(tmp_path / "checkpoints")


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_a_read_only_disk_fails_at_once_and_keeps_the_old_checkpoint(tmp_path, array_format):
    directory = tmp_path / "checkpoints"
    state = dict_state()
    ckpt = C.create_checkpoint_manager(directory, array_format=array_format)
    C.save(ckpt, 1, state, meta={"step": 1})
    C.wait(ckpt)
    with _read_only(directory):
        message, _ = _fails_fast(ckpt, state, 2)
        assert "Read-only file system [EROFS]" in message and "the newest checkpoint is still step 1" in message
        assert _orbax_threads() == []
        assert _restores(directory, 1, state)
    C.save(ckpt, 2, state, meta={"step": 2})  # writable again: saving goes on
    C.close(ckpt)
    assert _restores(directory, 2, state)


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_a_full_disk_fails_at_once_removes_the_partial_save_and_keeps_the_old_one(
    tmp_path, caplog, capfd, array_format
):
    directory = tmp_path / "checkpoints"
    state = dict_state(noisy=True)
    with _tmpfs(directory, ONE_CHECKPOINT_DISK[array_format]):
        ckpt = C.create_checkpoint_manager(directory, array_format=array_format)
        C.save(ckpt, 1, state, meta={"step": 1})
        C.wait(ckpt)
        free = shutil.disk_usage(directory).free
        with caplog.at_level(logging.DEBUG):
            message, _ = _fails_fast(ckpt, state, 2)
        assert message.startswith(
            f"saving checkpoint step 2 to {directory} failed: No space left on device [ENOSPC] at "
        )
        assert "the partial save was removed, the newest checkpoint is still step 1; free some space" in message
        assert tmp_dirs(directory) == [] and shutil.disk_usage(directory).free == free
        assert [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname] == []  # muted
        assert _orbax_threads() == []
        C.close(ckpt)
        assert _restores(directory, 1, state)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_disk_full_in_the_background_is_raised_once_and_the_next_save_works(tmp_path, monkeypatch, capfd, array_format):
    # ENOSPC in the middle of writing the arrays, injected: the partial file and
    # folder are removed, retention keeps every earlier step, and after the
    # failure (raised once, by wait) saving works again.
    directory = tmp_path / "checkpoints"
    ckpt = C.create_checkpoint_manager(directory, max_to_keep=2, array_format=array_format)
    for step in (1, 2):
        C.save(ckpt, step, dict_state(step), meta={"step": step})
    C.wait(ckpt)
    _disk_full_in_the_background(monkeypatch, array_format)
    C.save(ckpt, 3, dict_state(3), meta={"step": 3})  # returns: the failure is in the background
    message, _ = _fails_fast_wait(ckpt)
    assert message.startswith(f"saving checkpoint step 3 to {directory} failed: No space left on device [ENOSPC]")
    assert "the partial save was removed, the newest checkpoint is still step 2" in message
    assert tmp_dirs(directory) == [] and C.steps(ckpt) == [1, 2]  # step 1 is not retired by a failed save
    monkeypatch.undo()
    C.save(ckpt, 3, dict_state(3), meta={"step": 3})
    C.close(ckpt)  # no second report of the old failure
    assert C.steps(C.create_checkpoint_manager(directory, read_only=True)) == [2, 3]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR:absl" not in err, err[-2000:]


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_check_saves_raises_a_background_failure_without_waiting_for_the_next_save(tmp_path, monkeypatch, array_format):
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format)
    C.check_saves(ckpt)  # nothing pending: nothing to say
    _disk_full_in_the_background(monkeypatch, array_format, partial=False)
    C.save(ckpt, 1, dict_state(), meta={})
    deadline = time.monotonic() + FAST
    with pytest.raises(C.CheckpointError, match="saving checkpoint step 1 .*ENOSPC"):
        while time.monotonic() < deadline:
            C.check_saves(ckpt)
            time.sleep(0.01)
    monkeypatch.undo()
    C.close(ckpt)


_FAILING_RUN = textwrap.dedent("""
    import os, pathlib, sys, time
    import numpy as np
    from jaxnet import checkpoint as C
    directory = pathlib.Path(sys.argv[1])
    state = {"params": {"w": np.ones(1000, np.float32)}}
    ckpt = C.create_checkpoint_manager(directory, array_format=sys.argv[2])
    C.save(ckpt, 1, state, meta={})
    C.wait(ckpt)
    os.replace(directory, str(directory) + ".moved")
    directory.write_text("in the way")
    print("FAILING", flush=True)
    try:
        C.save(ckpt, 2, state, meta={})
        C.close(ckpt)
    except C.CheckpointError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_the_process_exits_within_seconds_after_a_failed_save(tmp_path, array_format):
    # The 300-s hang was at exit: Orbax's writer threads waited for a signal
    # that the failed folder creation never sent, and Python joins them.
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAILING_RUN, str(tmp_path / "checkpoints"), array_format],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "FAILING"
        start = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 3 and took < FAST, (took, err[-3000:])
    assert len(lines) == 1 and "saving checkpoint step 2" in lines[0] and "ENOTDIR" in lines[0], err[-3000:]
