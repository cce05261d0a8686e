"""Tests of jaxnet.checkpoint.recovery: falling back to a sound step, damaged and non-finite steps, killed saves.

Nothing is ever deleted but the temporary folder of a save whose process is
gone: damaged or non-finite steps are moved to ``corrupt/``, and a live
run's save in progress is kept.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import integrity, saving
from jaxnet.checkpoint import lock as L
from jaxnet.models import create_model
from jaxnet.state import create_train_state
from tests.checkpoint.helpers import (
    all_files,
    dict_state,
    equal_trees,
    flip_middle_byte,
    largest_file,
    tmp_dirs,
    truncate,
)
from tests.helpers import REPO

# --- falling back to the newest sound step -----------------------------------------------------


def test_restore_latest_good_falls_back_and_loses_nothing(saved, caplog):
    directory, state = saved
    victim = largest_file(directory / "2")
    flip_middle_byte(victim)
    before = all_files(directory)
    ckpt = C.create_checkpoint_manager(directory)
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        restored, meta = C.restore_latest_good(ckpt, state)
    assert meta == {"epoch": 1} and int(restored.step) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxnet.checkpoint"]
    assert any("skipping checkpoint step 2" in w and victim.name in w for w in warnings)
    assert any("resuming from checkpoint step 1" in w for w in warnings)
    # The damaged step was moved aside, byte for byte, and step 2 can be saved again.
    after = all_files(directory)
    moved = {k.replace(f"{C.QUARANTINE_DIR}/2/", "2/", 1): v for k, v in after.items()}
    assert moved == before
    assert C.steps(ckpt) == [1]
    C.save(ckpt, 2, restored, meta={"epoch": 2})
    C.wait(ckpt)
    assert C.steps(ckpt) == [1, 2]
    C.close(ckpt)


def test_restore_latest_good_when_every_step_is_damaged(saved):
    directory, state = saved
    for step in (1, 2):
        truncate(largest_file(directory / str(step)))
    before = all_files(directory)
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=r"no sound checkpoint.*step 2 .*step 1 .*another --workdir"):
        C.restore_latest_good(ckpt, state)
    C.close(ckpt)
    assert all_files(directory) == before


# --- crash safety: a save killed midway -------------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys, optax
    from jaxnet import checkpoint as C
    from jaxnet.models import create_model
    from jaxnet.state import create_train_state
    _, state = create_train_state(create_model("mlp"), optax.adam(1e-3), seed=0)
    ckpt = C.create_checkpoint_manager(sys.argv[1], max_to_keep=2, array_format=sys.argv[2])
    for step in range(1, 100000):
        C.save(ckpt, step, state, meta={"step": step})
""")


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_a_save_killed_midway_is_invisible(tmp_path, array_format):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    leftovers: list[pathlib.Path] = []
    for _ in range(5):  # each try kills the saver while a save (not the first) is in flight
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(directory), array_format],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                finished = [p for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
                if finished and tmp_dirs(directory):
                    break
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        leftovers = tmp_dirs(directory)
        if leftovers:
            break
    assert leftovers, "never managed to kill the saver during a save"
    interrupted = int(leftovers[0].name.split(".")[0])
    ckpt = C.create_checkpoint_manager(directory)
    assert tmp_dirs(directory) == []  # the unfinished save is removed on opening
    assert C.latest(ckpt) is not None and interrupted not in C.steps(ckpt)
    _, state = create_train_state(create_model("mlp"), optax.adam(1e-3), seed=0)
    for step in C.steps(ckpt):
        assert (directory / str(step) / C.MANIFEST_FILE).is_file()  # committed with the step
        restored, meta = C.restore(ckpt, state, step=step)
        assert meta == {"step": step} and equal_trees(restored, state)
    C.save(ckpt, interrupted, state, meta={"step": interrupted})  # the interrupted step, anew
    C.wait(ckpt)
    assert interrupted in C.steps(ckpt)
    C.close(ckpt)


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
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
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
    state = dict_state(2.0)
    state["params"]["w"][5] = np.nan
    return state


def test_a_nan_state_is_flagged_and_restore_latest_good_passes_over_it(tmp_path, caplog):
    ckpt = C.create_checkpoint_manager(tmp_path, best_metric="acc")
    C.save(ckpt, 1, dict_state(), meta={"step": 1}, metrics={"acc": 0.5})
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        C.save(ckpt, 2, _nan_state(), meta={"step": 2}, metrics={"acc": 0.9})
        C.wait(ckpt)
    assert "checkpoint step 2 holds non-finite values (NaN/inf) in params/w" in caplog.text
    assert C.read_record(ckpt, 1)["finite"] is True
    assert C.read_record(ckpt, 2)["finite"] is False
    assert C.best(ckpt) == 1  # never ranked, whatever its metric
    assert C.resolve_step(ckpt, "latest") == 1 and C.resolve_step(ckpt, "best") == 1
    assert C.resolve_step(ckpt, 2) == 2  # asked for by number: as it is
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        restored, meta = C.restore_latest_good(ckpt, dict_state())
    assert meta == {"step": 1} and np.all(np.asarray(restored["params"]["w"]) == 1.0)
    assert "skipping checkpoint step 2: checkpoint step 2 holds non-finite values (NaN/inf) in params/w" in caplog.text
    assert C.steps(ckpt) == [1] and (tmp_path / C.QUARANTINE_DIR / "2").is_dir()
    C.close(ckpt)


def test_inf_in_the_optimizer_state_is_finite_enough(tmp_path):
    # optax's reduce_on_plateau starts with best_value=inf; NaN there still counts.
    state = dict_state()
    state["opt_state"]["best_value"] = np.asarray(np.inf, np.float32)
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, state, meta={})
    bad = {**state, "opt_state": {**state["opt_state"], "mu": np.full(8, np.nan, np.float32)}}
    C.save(ckpt, 2, bad, meta={})
    C.wait(ckpt)
    assert C.read_record(ckpt, 1)["finite"] is True
    assert C.read_record(ckpt, 2)["nonfinite"] == "opt_state/mu"
    C.close(ckpt)


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_checkpoints_saved_without_the_flag_are_checked(tmp_path, monkeypatch, array_format, caplog):
    # Checkpoints written before the flag existed: their arrays are read and checked.
    real = integrity.finish_record

    def old_record(header, state):
        return real({k: v for k, v in header.items() if k not in ("finite", "nonfinite")}, state)

    monkeypatch.setattr(integrity, "finish_record", old_record)
    monkeypatch.setattr(saving, "nonfinite_leaf", lambda state: None)  # saving checked nothing
    good = {**dict_state(), "half": jnp.ones(4, jnp.bfloat16)}
    bad = {**_nan_state(), "half": jnp.ones(4, jnp.bfloat16)}
    bad_half = {**dict_state(), "half": jnp.asarray([1, np.inf, 1, 1], jnp.bfloat16)}
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format, best_metric="acc", max_to_keep=5)
    C.save(ckpt, 1, good, meta={"step": 1}, metrics={"acc": 0.1})
    C.save(ckpt, 2, bad_half, meta={"step": 2}, metrics={"acc": 0.8})
    C.save(ckpt, 3, bad, meta={"step": 3}, metrics={"acc": 0.9})
    C.wait(ckpt)
    monkeypatch.undo()
    assert "finite" not in C.read_record(ckpt, 3)
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
        C.restore_latest_good(ckpt, dict_state())
    C.close(ckpt)


# --- damaged Orbax metadata --------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"garbage{", b"\xff\xfe\x00binary", b"", b"\x00" * 64])
def test_garbage_step_metadata_is_damage_without_raw_log_lines(tmp_path, caplog, capfd, garbage):
    ckpt = C.create_checkpoint_manager(tmp_path)
    for step in (1, 2):
        C.save(ckpt, step, dict_state(step), meta={"step": step})
    C.close(ckpt)
    (tmp_path / "2" / C.STEP_METADATA_FILE).write_bytes(garbage)
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        ckpt = C.create_checkpoint_manager(tmp_path)
        with pytest.raises(
            C.CheckpointError,
            match=r"checkpoint step 2 is damaged: .*2/_CHECKPOINT_METADATA "
            r"is not valid JSON",
        ):
            C.restore(ckpt, dict_state(), step=2)
        with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
            restored, meta = C.restore_latest_good(ckpt, dict_state())
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
        C.save(ckpt, step, dict_state(step), meta={"step": step})
    C.close(ckpt)
    (tmp_path / "2" / C.STEP_METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(
        C.CheckpointError,
        match=r"checkpoint step 2 is damaged: .*holds no JSON object, and "
        r"Orbax cannot open .*; move .*2 aside",
    ):
        C.create_checkpoint_manager(tmp_path, read_only=True)
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        ckpt = C.create_checkpoint_manager(tmp_path)  # for writing: moved aside, as a resume would
    assert "checkpoint step(s) 2 are damaged" in caplog.text
    assert C.steps(ckpt) == [1] and (tmp_path / C.QUARANTINE_DIR / "2" / C.STEP_METADATA_FILE).is_file()
    _, meta = C.restore_latest_good(ckpt, dict_state())
    C.close(ckpt)
    assert meta == {"step": 1}
