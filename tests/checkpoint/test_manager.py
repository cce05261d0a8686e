"""Tests of jaxnet.checkpoint.manager and .folder: opening a folder, retention, the handle, bad settings."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import folder
from jaxnet.errors import ConfigError, JaxnetError
from tests.checkpoint.helpers import train_state

# --- retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, best_step", [("max", 3), ("min", 5)])
def test_keeps_last_k_and_best_k(tmp_path, mode, best_step):
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path, max_to_keep=2, best_metric="acc", best_mode=mode, keep_best=1)
    for step, acc in [(1, 0.5), (2, None), (3, 0.9), (4, None), (5, 0.3), (6, None), (7, None)]:
        C.save(ckpt, step, state, meta={"step": step}, metrics=None if acc is None else {"acc": acc, "loss": 1.0})
    C.wait(ckpt)
    assert C.steps(ckpt) == sorted({6, 7, best_step})  # newest two, plus the best
    assert C.latest(ckpt) == 7 and C.best(ckpt) == best_step
    _, meta = C.restore(ckpt, state, step="best")
    assert meta == {"step": best_step}
    C.close(ckpt)
    # A fresh manager (a new process) sees the same ranking, read from disk.
    again = C.create_checkpoint_manager(tmp_path, best_metric="acc", best_mode=mode, read_only=True)
    assert C.best(again) == best_step
    C.close(again)


def test_checkpoints_without_the_metric_do_not_break_ranking(tmp_path):
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path, max_to_keep=1, best_metric="acc", keep_best=1)
    C.save(ckpt, 1, state, meta={}, metrics={"loss": 0.5})  # no "acc"
    C.save(ckpt, 2, state, meta={}, metrics={"acc": float("nan")})
    assert C.best(ckpt) is None
    with pytest.raises(C.CheckpointError, match="ranked by acc"):
        C.restore(ckpt, state, step="best")
    C.save(ckpt, 3, state, meta={}, metrics={"acc": np.float32(0.25)})
    C.save(ckpt, 4, state, meta={})
    C.wait(ckpt)
    assert C.best(ckpt) == 3 and C.steps(ckpt) == [3, 4]
    C.close(ckpt)


def test_without_best_metric_best_is_none(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory)
    assert C.best(ckpt) is None and C.latest(ckpt) == 2
    C.close(ckpt)


# --- the handle --------------------------------------------------------------------------------


def test_the_handle_is_not_orbax_checkpointer_and_keeps_its_old_name(tmp_path):
    ckpt = C.create_checkpoint_manager(tmp_path)
    assert type(ckpt) is C.CheckpointFolder and C.Checkpointer is C.CheckpointFolder
    assert not isinstance(ckpt, ocp.Checkpointer) and isinstance(ckpt.manager, ocp.CheckpointManager)
    assert not type(ckpt).__dataclass_params__.frozen  # it says what it is: `pending` changes with every save
    assert [f.name for f in dataclasses.fields(folder.PendingSave)] == ["step", "handover", "reported"]
    assert (ckpt.pending.step, ckpt.pending.handover, ckpt.pending.reported) == (None, None, [])
    assert ckpt.array_format == "orbax" and C.ARRAY_FORMATS[0] == "orbax"  # the default
    C.save(ckpt, 1, train_state(), meta={})
    C.wait(ckpt)
    assert (ckpt.pending.step, ckpt.pending.handover) == (None, None)  # nothing in progress once waited for
    C.close(ckpt)


# --- errors on bad use -------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    state = train_state()
    with pytest.raises(ConfigError, match="max_to_keep"):
        C.create_checkpoint_manager(tmp_path, max_to_keep=0)
    with pytest.raises(ConfigError, match="best_mode"):
        C.create_checkpoint_manager(tmp_path, best_mode="highest")
    with pytest.raises(ConfigError, match="array_format must be 'npz' or 'orbax', got 'pt'"):
        C.create_checkpoint_manager(tmp_path, array_format="pt")
    with pytest.raises(C.CheckpointError, match="no checkpoint folder"):
        C.create_checkpoint_manager(tmp_path / "absent", read_only=True)
    ckpt = C.create_checkpoint_manager(tmp_path)
    with pytest.raises(C.CheckpointError, match="no checkpoint in"):
        C.restore(ckpt, state)
    assert C.restore_latest_good(ckpt, state) is None
    with pytest.raises(ConfigError, match="JSON"):
        C.save(ckpt, 1, state, meta={"sum": jnp.zeros(())})
    with pytest.raises(ConfigError, match="step"):
        C.save(ckpt, -1, state, meta={})
    C.save(ckpt, 1, state, meta={})
    with pytest.raises(C.CheckpointError, match="step 1 already exists"):
        C.save(ckpt, 1, state, meta={})
    with pytest.raises(C.CheckpointError, match=r"no checkpoint step 9 .* available: \[1\]"):
        C.restore(ckpt, state, step=9)
    C.close(ckpt)
    assert issubclass(C.CheckpointError, JaxnetError)


def test_unwritable_checkpoint_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(C.CheckpointError, match="file.txt"):
        C.create_checkpoint_manager(tmp_path / "file.txt" / "sub")
