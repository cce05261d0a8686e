"""Tests of jaxnet.checkpoint.saving: the host copy, the hand-over off the training thread, the manifest."""

from __future__ import annotations

import threading

import jax
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import integrity
from tests.checkpoint.helpers import all_files, equal_trees, train_state


def test_save_returns_before_the_state_is_reused(tmp_path):
    # The training loop donates the state right after saving it: the checkpoint
    # must hold the values at save time, not whatever the buffers hold later.
    state = train_state("mlp")
    expected = C.params_sha256(state)
    ckpt = C.create_checkpoint_manager(tmp_path, async_save=True)
    C.save(ckpt, 3, state, meta={})
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = bump(state)
    C.wait(ckpt)
    restored, _ = C.restore(ckpt, state)
    C.close(ckpt)
    assert C.params_sha256(restored) == expected


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_save_digests_and_hands_over_off_the_calling_thread(tmp_path, monkeypatch, array_format):
    # The loop is blocked only for the host copy: digesting and Orbax's
    # synchronous part run on jaxnet's worker thread. Hold that thread and
    # check that save() has returned, and that meta changed afterwards (fit
    # appends to its history list) does not reach the record.
    release, threads = threading.Event(), []
    real = integrity.finish_record

    def held(header, state):
        threads.append(threading.current_thread().name)
        assert release.wait(30)
        return real(header, state)

    monkeypatch.setattr(integrity, "finish_record", held)
    state = train_state()
    history = [{"epoch": 1}]
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format)
    C.save(ckpt, 4, state, meta={"history": history})
    history.append({"epoch": 2})  # the caller moves on while the worker is held
    assert ckpt.pending.handover is not None and not ckpt.pending.handover.done()
    release.set()
    C.wait(ckpt)
    assert threads and threads[0].startswith("jaxnet-checkpoint")
    restored, meta = C.restore(ckpt, state)
    C.close(ckpt)
    assert meta == {"history": [{"epoch": 1}]} and equal_trees(restored, state)


def test_a_failed_background_save_is_raised_by_the_next_call_and_loses_nothing(tmp_path, monkeypatch):
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, state, meta={"epoch": 1})
    C.wait(ckpt)
    before = all_files(tmp_path / "1")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    C.save(ckpt, 2, state, meta={"epoch": 2})  # returns: the failure happens in the background
    with pytest.raises(C.CheckpointError, match="saving checkpoint step 2 .*No space left on device"):
        C.wait(ckpt)
    monkeypatch.undo()
    assert C.steps(ckpt) == [1] and all_files(tmp_path / "1") == before
    C.save(ckpt, 2, state, meta={"epoch": 2})  # the next save works again
    C.close(ckpt)
    assert C.steps(C.create_checkpoint_manager(tmp_path, read_only=True)) == [1, 2]


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_sync_save_writes_the_manifest_immediately(tmp_path, array_format):
    ckpt = C.create_checkpoint_manager(tmp_path, async_save=False, array_format=array_format)
    C.save(ckpt, 5, train_state(), meta={})
    assert (tmp_path / "5" / C.MANIFEST_FILE).is_file()
    C.close(ckpt)
