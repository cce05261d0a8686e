"""Fault injection for jaxnet.checkpoint: saves that cannot succeed, live runs' saves, NaN and damaged checkpoints.

A failing save must end in one CheckpointError line within seconds (never a
wait on Orbax's 300-s signal timeouts), remove its partial folder and leave
the earlier checkpoints restorable. Disks that are full or read-only are real
mounts where this process may mount (root in a container), else skipped; the
same failures are also injected by monkeypatching.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import integrity
from jaxnet.checkpoint import lock as L
from tests.helpers import REPO

FAST = 10.0  # seconds: the longest a failure may take to surface


def _state(value: float = 1.0, n: int = 30_000) -> dict:
    """A small TrainState-like dict (120 KB of params): two fit a 200 KB disk, three do not."""
    return {"step": np.asarray(1, np.int32), "params": {"w": np.full(n, value, np.float32)},
            "opt_state": {"mu": np.zeros(8, np.float32)}}


def _tmp_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() else []


def _orbax_threads() -> list[threading.Thread]:
    """Threads of Orbax's still alive: a failed save must leave none waiting on a signal."""
    names = ("jaxnet_npz_save", "json_ch_save", "async_save", "save_finalize", "_target_setting_result")
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


def _fails_fast(ckpt: C.Checkpointer, state: dict, step: int) -> tuple[str, float]:
    """Saves ``step`` and waits; returns the CheckpointError's message and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(C.CheckpointError) as info:
        C.save(ckpt, step, state, meta={"step": step})
        C.wait(ckpt)
    took = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message and took < FAST, (took, message)
    return message, took


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

    for code, text in [(errno.ENOSPC, r"No space left on device \[ENOSPC\] at .*free some space"),
                       (errno.EACCES, r"Permission denied \[EACCES\] at .*make it writable"),
                       (errno.EROFS, r"Read-only file system \[EROFS\] at .*read-only")]:
        monkeypatch.setattr(C.os, "fsync", fail(code))
        with pytest.raises(C.CheckpointError, match=text) as info:
            C.probe_writable(tmp_path / "ok")
        monkeypatch.undo()
        assert str(tmp_path / "ok") in str(info.value) and "\n" not in str(info.value)
        assert list((tmp_path / "ok").iterdir()) == []  # the probe file is gone


def test_probe_writable_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with _read_only(folder):
        with pytest.raises(C.CheckpointError, match=rf"cannot write checkpoints to {folder}: Read-only file "
                                                    r"system \[EROFS\]"):
            C.probe_writable(folder)


# --- saves that cannot succeed -----------------------------------------------------------------


def test_a_file_in_the_way_fails_at_once_and_keeps_the_old_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _state()
    ckpt = C.create_checkpoint_manager(directory)
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


def test_a_read_only_disk_fails_at_once_and_keeps_the_old_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _state()
    ckpt = C.create_checkpoint_manager(directory)
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


def test_a_full_disk_fails_at_once_removes_the_partial_save_and_keeps_the_old_one(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    state = _state()
    with _tmpfs(directory, "200k"):
        ckpt = C.create_checkpoint_manager(directory)
        C.save(ckpt, 1, state, meta={"step": 1})
        C.wait(ckpt)
        free = shutil.disk_usage(directory).free
        with caplog.at_level(logging.DEBUG):
            message, _ = _fails_fast(ckpt, state, 2)
        assert message.startswith(f"saving checkpoint step 2 to {directory} failed: No space left on device "
                                  "[ENOSPC] at ")
        assert "the partial save was removed, the newest checkpoint is still step 1; free some space" in message
        assert _tmp_dirs(directory) == [] and shutil.disk_usage(directory).free == free
        assert [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname] == []  # muted
        assert _orbax_threads() == []
        C.close(ckpt)
        assert _restores(directory, 1, state)


def test_disk_full_in_the_background_is_raised_once_and_the_next_save_works(tmp_path, monkeypatch, capfd):
    # ENOSPC in the middle of writing the arrays, injected: the partial file and
    # folder are removed, retention keeps every earlier step, and after the
    # failure (raised once, by wait) saving works again.
    directory = tmp_path / "checkpoints"
    ckpt = C.create_checkpoint_manager(directory, max_to_keep=2)
    for step in (1, 2):
        C.save(ckpt, step, _state(step), meta={"step": step})
    C.wait(ckpt)
    real = C._StateHandler._write

    async def disk_full(self, path, arrays):
        with open(os.fspath(path), "wb") as f:
            f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C._StateHandler, "_write", disk_full)
    C.save(ckpt, 3, _state(3), meta={"step": 3})  # returns: the failure is in the background
    message, _ = _fails_fast_wait(ckpt)
    assert message.startswith(f"saving checkpoint step 3 to {directory} failed: No space left on device [ENOSPC]")
    assert "the partial save was removed, the newest checkpoint is still step 2" in message
    assert _tmp_dirs(directory) == [] and C.steps(ckpt) == [1, 2]  # step 1 is not retired by a failed save
    monkeypatch.setattr(C._StateHandler, "_write", real)
    C.save(ckpt, 3, _state(3), meta={"step": 3})
    C.close(ckpt)  # no second report of the old failure
    assert C.steps(C.create_checkpoint_manager(directory, read_only=True)) == [2, 3]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR:absl" not in err, err[-2000:]


def _fails_fast_wait(ckpt: C.Checkpointer) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(C.CheckpointError) as info:
        C.wait(ckpt)
    took = time.monotonic() - start
    assert "\n" not in str(info.value) and took < FAST, took
    return str(info.value), took


def test_check_saves_raises_a_background_failure_without_waiting_for_the_next_save(tmp_path, monkeypatch):
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.check_saves(ckpt)  # nothing pending: nothing to say

    async def disk_full(self, path, arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C._StateHandler, "_write", disk_full)
    C.save(ckpt, 1, _state(), meta={})
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
    ckpt = C.create_checkpoint_manager(directory)
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


def test_the_process_exits_within_seconds_after_a_failed_save(tmp_path):
    # The 300-s hang was at exit: Orbax's writer threads waited for a signal
    # that the failed folder creation never sent, and Python joins them.
    proc = subprocess.Popen([sys.executable, "-c", _FAILING_RUN, str(tmp_path / "checkpoints")],
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


# --- a live run's save in progress -------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from jaxnet.checkpoint.lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("LOCKED", flush=True)
    time.sleep(600)
""")


def test_unfinished_saves_of_a_live_run_are_kept(tmp_path, caplog):
    workdir = tmp_path / "w"
    directory = workdir / "checkpoints"
    in_progress = directory / "7.orbax-checkpoint-tmp-1234"
    in_progress.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
            C.close(C.create_checkpoint_manager(directory))
        assert in_progress.is_dir()
        assert f"in use by PID {holder.pid}" in caplog.text
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        C.close(C.create_checkpoint_manager(directory, clean_unfinished=False))
        assert in_progress.is_dir()  # never, when asked not to
        C.close(C.create_checkpoint_manager(directory))  # the holder is dead: a killed process's leftover
        assert not in_progress.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_unfinished_saves_are_removed_under_this_process_own_lock(tmp_path):
    workdir = tmp_path / "w"
    leftover = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-99"
    leftover.mkdir(parents=True)
    with L.WorkdirLock(workdir):
        C.close(C.create_checkpoint_manager(workdir / "checkpoints"))
    assert not leftover.exists()


# --- non-finite checkpoints --------------------------------------------------------------------


def _nan_state() -> dict:
    state = _state(2.0)
    state["params"]["w"][5] = np.nan
    return state


def test_a_nan_state_is_flagged_and_restore_latest_good_passes_over_it(tmp_path, caplog):
    ckpt = C.create_checkpoint_manager(tmp_path, best_metric="acc")
    C.save(ckpt, 1, _state(), meta={"step": 1}, metrics={"acc": 0.5})
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        C.save(ckpt, 2, _nan_state(), meta={"step": 2}, metrics={"acc": 0.9})
        C.wait(ckpt)
    assert "checkpoint step 2 holds non-finite values (NaN/inf) in params/w" in caplog.text
    assert C._read_record(ckpt, 1)["finite"] is True
    assert C._read_record(ckpt, 2)["finite"] is False
    assert C.best(ckpt) == 1  # never ranked, whatever its metric
    assert C.resolve_step(ckpt, "latest") == 1 and C.resolve_step(ckpt, "best") == 1
    assert C.resolve_step(ckpt, 2) == 2  # asked for by number: as it is
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        restored, meta = C.restore_latest_good(ckpt, _state())
    assert meta == {"step": 1} and np.all(np.asarray(restored["params"]["w"]) == 1.0)
    assert ("skipping checkpoint step 2: checkpoint step 2 holds non-finite values (NaN/inf) in params/w"
            in caplog.text)
    assert C.steps(ckpt) == [1] and (tmp_path / C.QUARANTINE_DIR / "2").is_dir()
    C.close(ckpt)


def test_inf_in_the_optimizer_state_is_finite_enough(tmp_path):
    # optax's reduce_on_plateau starts with best_value=inf; NaN there still counts.
    state = _state()
    state["opt_state"]["best_value"] = np.asarray(np.inf, np.float32)
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, state, meta={})
    bad = {**state, "opt_state": {**state["opt_state"], "mu": np.full(8, np.nan, np.float32)}}
    C.save(ckpt, 2, bad, meta={})
    C.wait(ckpt)
    assert C._read_record(ckpt, 1)["finite"] is True
    assert C._read_record(ckpt, 2)["nonfinite"] == "opt_state/mu"
    C.close(ckpt)


@pytest.mark.parametrize("array_format", ["npz", "orbax"])
def test_checkpoints_saved_without_the_flag_are_checked(tmp_path, monkeypatch, array_format, caplog):
    # Checkpoints written before the flag existed: their arrays are read and checked.
    real = integrity.finish_record

    def old_record(header, state):
        return real({k: v for k, v in header.items() if k not in ("finite", "nonfinite")}, state)

    monkeypatch.setattr(integrity, "finish_record", old_record)
    monkeypatch.setattr(C, "_nonfinite_leaf", lambda state: None)  # saving checked nothing
    good = {**_state(), "half": jnp.ones(4, jnp.bfloat16)}
    bad = {**_nan_state(), "half": jnp.ones(4, jnp.bfloat16)}
    bad_half = {**_state(), "half": jnp.asarray([1, np.inf, 1, 1], jnp.bfloat16)}
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format, best_metric="acc", max_to_keep=5)
    C.save(ckpt, 1, good, meta={"step": 1}, metrics={"acc": 0.1})
    C.save(ckpt, 2, bad_half, meta={"step": 2}, metrics={"acc": 0.8})
    C.save(ckpt, 3, bad, meta={"step": 3}, metrics={"acc": 0.9})
    C.wait(ckpt)
    monkeypatch.undo()
    assert "finite" not in C._read_record(ckpt, 3)
    assert C.best(ckpt) == 3  # Orbax ranks it: the old behaviour
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        assert C.resolve_step(ckpt, "latest") == 1
        assert C.resolve_step(ckpt, "best") == 1
    assert "checkpoint step 2 holds non-finite values (NaN/inf) in half" in caplog.text
    assert "checkpoint step 3 holds non-finite values (NaN/inf) in params/w" in caplog.text
    restored, meta = C.restore_latest_good(ckpt, good)
    assert meta == {"step": 1} and C.steps(ckpt) == [1]
    C.close(ckpt)


def test_no_finite_checkpoint_at_all(tmp_path):
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, _nan_state(), meta={})
    C.wait(ckpt)
    with pytest.raises(C.CheckpointError, match=r"holds finite values: checkpoint step 1 holds non-finite"):
        C.resolve_step(ckpt, "latest")
    with pytest.raises(C.CheckpointError, match=r"no sound checkpoint .* step 1 holds non-finite .*another"):
        C.restore_latest_good(ckpt, _state())
    C.close(ckpt)


# --- damaged Orbax metadata --------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"garbage{", b"\xff\xfe\x00binary", b"", b"\x00" * 64])
def test_garbage_step_metadata_is_damage_without_raw_log_lines(tmp_path, caplog, capfd, garbage):
    ckpt = C.create_checkpoint_manager(tmp_path)
    for step in (1, 2):
        C.save(ckpt, step, _state(step), meta={"step": step})
    C.close(ckpt)
    (tmp_path / "2" / C.STEP_METADATA_FILE).write_bytes(garbage)
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        ckpt = C.create_checkpoint_manager(tmp_path)
        with pytest.raises(C.CheckpointError, match=r"checkpoint step 2 is damaged: .*2/_CHECKPOINT_METADATA "
                                                    r"is not valid JSON"):
            C.restore(ckpt, _state(), step=2)
        with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
            restored, meta = C.restore_latest_good(ckpt, _state())
        C.close(ckpt)
    assert meta == {"step": 1} and (tmp_path / C.QUARANTINE_DIR / "2").is_dir()
    assert "skipping checkpoint step 2: checkpoint step 2 is damaged" in caplog.text
    assert [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname] == []
    err = capfd.readouterr().err
    assert "absl" not in err and "Metadata file" not in err, err


def test_step_metadata_that_stops_orbax_opening_the_folder(tmp_path, caplog):
    # JSON, but not an object: Orbax raises for the whole folder, not just the step.
    ckpt = C.create_checkpoint_manager(tmp_path)
    for step in (1, 2):
        C.save(ckpt, step, _state(step), meta={"step": step})
    C.close(ckpt)
    (tmp_path / "2" / C.STEP_METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(C.CheckpointError, match=r"checkpoint step 2 is damaged: .*holds no JSON object, and "
                                                r"Orbax cannot open .*; move .*2 aside"):
        C.create_checkpoint_manager(tmp_path, read_only=True)
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        ckpt = C.create_checkpoint_manager(tmp_path)  # for writing: moved aside, as a resume would
    assert "checkpoint step(s) 2 are damaged" in caplog.text
    assert C.steps(ckpt) == [1] and (tmp_path / C.QUARANTINE_DIR / "2" / C.STEP_METADATA_FILE).is_file()
    _, meta = C.restore_latest_good(ckpt, _state())
    C.close(ckpt)
    assert meta == {"step": 1}
