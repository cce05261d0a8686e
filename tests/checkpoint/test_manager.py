"""Tests of jaxnet.checkpoint: exact round trips, retention, crash safety, damage, workdirs."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxnet import checkpoint as C
from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.models import create_model
from jaxnet.state import create_train_state
from tests.helpers import REPO



def _state(model: str = "mlp128", tx=None, seed: int = 0):
    tx = tx or optax.adam(1e-3)
    _, state = create_train_state(create_model(model, seed=seed), tx, seed=seed)
    # Make the optimizer state non-trivial, so that a wrong restore would show.
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=jnp.asarray(3, jnp.int32), params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


def _all_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file() and p.name != C.MANIFEST_FILE),
               key=lambda p: p.stat().st_size)


@pytest.fixture(params=["npz", "orbax"])
def saved(request, tmp_path):
    """A folder with checkpoints at steps 1 and 2 (closed, so every save is finished).

    In both formats: ``arrays.npz`` (what a single process writes) and
    Orbax's own (what a state spread over processes gets, and what every
    checkpoint from before the .npz format holds).
    """
    state = _state()
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt", array_format=request.param)
    for step in (1, 2):
        C.save(ckpt, step, state.replace(step=jnp.asarray(step, jnp.int32)), meta={"epoch": step})
    C.close(ckpt)
    return tmp_path / "ckpt", state


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_is_exact_and_keeps_optax_types(tmp_path):
    state = _state()
    meta = {"epoch": 1, "batch_in_epoch": 7, "seed": 0, "config": {"model": "mlp128"},
            "train_sums": {"loss": float(np.float32(0.1) * 3), "accuracy": 0.1 + 0.2}}
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 3, state, meta=meta)
    C.wait(ckpt)
    restored, restored_meta = C.restore(ckpt, state)
    C.close(ckpt)
    assert _equal_trees(restored, state)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # ScaleByAdamState, not a list
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored_meta == meta  # floats survive JSON bit for bit
    assert restored_meta["train_sums"]["accuracy"] == 0.1 + 0.2


def test_restore_into_abstract_targets(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory)
    for target in (jax.eval_shape(lambda: state), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)):
        restored, meta = C.restore(ckpt, target, step=1)
        assert isinstance(jax.tree.leaves(restored)[0], jax.Array)
        assert _equal_trees(restored.params, state.params)
        assert int(restored.step) == 1 and meta == {"epoch": 1}
    C.close(ckpt)


def test_save_returns_before_the_state_is_reused(tmp_path):
    # The training loop donates the state right after saving it: the checkpoint
    # must hold the values at save time, not whatever the buffers hold later.
    state = _state("mlp")
    expected = C.params_sha256(state)
    ckpt = C.create_checkpoint_manager(tmp_path, async_save=True)
    C.save(ckpt, 3, state, meta={})
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = bump(state)
    C.wait(ckpt)
    restored, _ = C.restore(ckpt, state)
    C.close(ckpt)
    assert C.params_sha256(restored) == expected


def test_save_digests_and_hands_over_off_the_calling_thread(tmp_path, monkeypatch):
    # The loop is blocked only for the host copy: digesting and Orbax's
    # synchronous part run on jaxnet's worker thread. Hold that thread and
    # check that save() has returned, and that meta changed afterwards (fit
    # appends to its history list) does not reach the record.
    from jaxnet.checkpoint import integrity

    release, threads = threading.Event(), []
    real = integrity.finish_record

    def held(header, state):
        threads.append(threading.current_thread().name)
        assert release.wait(30)
        return real(header, state)

    monkeypatch.setattr(integrity, "finish_record", held)
    state = _state()
    history = [{"epoch": 1}]
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 4, state, meta={"history": history})
    history.append({"epoch": 2})  # the caller moves on while the worker is held
    assert ckpt.submitting and not ckpt.submitting[0].done()
    release.set()
    C.wait(ckpt)
    assert threads and threads[0].startswith("jaxnet-checkpoint")
    restored, meta = C.restore(ckpt, state)
    C.close(ckpt)
    assert meta == {"history": [{"epoch": 1}]} and _equal_trees(restored, state)


def test_a_failed_background_save_is_raised_by_the_next_call_and_loses_nothing(tmp_path, monkeypatch):
    state = _state()
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, state, meta={"epoch": 1})
    C.wait(ckpt)
    before = _all_files(tmp_path / "1")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    C.save(ckpt, 2, state, meta={"epoch": 2})  # returns: the failure happens in the background
    with pytest.raises(C.CheckpointError, match="saving checkpoint step 2 .*No space left on device"):
        C.wait(ckpt)
    monkeypatch.undo()
    assert C.steps(ckpt) == [1] and _all_files(tmp_path / "1") == before
    C.save(ckpt, 2, state, meta={"epoch": 2})  # the next save works again
    C.close(ckpt)
    assert C.steps(C.create_checkpoint_manager(tmp_path, read_only=True)) == [1, 2]


def test_restore_variables_needs_no_optimizer(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory, read_only=True)
    params, model_state, meta = C.restore_variables(ckpt, state.params, state.model_state)
    assert _equal_trees(params, state.params) and meta == {"epoch": 2}
    C.close(ckpt)


def test_sync_save_writes_the_manifest_immediately(tmp_path):
    ckpt = C.create_checkpoint_manager(tmp_path, async_save=False)
    C.save(ckpt, 5, _state(), meta={})
    assert (tmp_path / "5" / C.MANIFEST_FILE).is_file()
    C.close(ckpt)


# --- retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, best_step", [("max", 3), ("min", 5)])
def test_keeps_last_k_and_best_k(tmp_path, mode, best_step):
    state = _state()
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
    state = _state()
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


# --- errors on bad use -------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    state = _state()
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


def test_restoring_into_another_model_is_a_mismatch_not_damage(saved):
    directory, _ = saved
    other = _state("mlp")
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointMismatchError, match=r"step 2 does not fit: its params part has 4 arrays"):
        C.restore(ckpt, other)
    with pytest.raises(C.CheckpointMismatchError):
        C.restore_latest_good(ckpt, other)
    assert C.steps(ckpt) == [1, 2]  # nothing moved aside
    C.close(ckpt)


def test_unwritable_checkpoint_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(C.CheckpointError, match="file.txt"):
        C.create_checkpoint_manager(tmp_path / "file.txt" / "sub")


# --- damage ------------------------------------------------------------------------------------


def _flip_middle_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, expected", [
    (_flip_middle_byte, "changed after it was written"),
    (_truncate, "truncated"),
    (os.remove, "is missing"),
])
def test_damaged_data_file_is_named(saved, damage, expected):
    directory, state = saved
    victim = _largest_file(directory / "2")
    damage(victim)
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=expected) as info:
        C.restore(ckpt, state)
    message = str(info.value)
    assert "step 2" in message and str(victim) in message and "\n" not in message
    C.close(ckpt)


def test_damaged_record_is_named(saved):
    directory, state = saved
    record = directory / "2" / "meta" / "metadata"
    record.write_text(record.read_text().replace('"epoch": 2', '"epoch": 7'))
    (directory / "2" / C.MANIFEST_FILE).unlink()  # only the record's own digest can tell
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=r"step 2 is damaged: .*meta does not match"):
        C.restore(ckpt, state)
    C.close(ckpt)


def test_damage_in_a_step_without_manifest_is_caught_by_the_array_digests(saved):
    # Should writing the file manifest fail, the digests saved with the arrays
    # still catch damage.
    directory, state = saved
    (directory / "2" / C.MANIFEST_FILE).unlink()
    _flip_middle_byte(_largest_file(directory / "2" / "state"))
    ckpt = C.create_checkpoint_manager(directory)
    # In an .npz the zip's CRC-32s already name the file; in Orbax's format the array digests do.
    with pytest.raises(C.CheckpointError, match=r"step 2 is damaged: .*2/state"):
        C.restore(ckpt, state)
    C.close(ckpt)


def test_a_rewritten_npz_with_valid_crcs_is_caught_by_the_array_digests(tmp_path):
    directory, state = tmp_path, _state()
    ckpt = C.create_checkpoint_manager(directory)
    C.save(ckpt, 2, state, meta={})
    C.close(ckpt)
    npz = directory / "2" / "state" / C.ARRAYS_FILE
    (directory / "2" / C.MANIFEST_FILE).unlink()
    with np.load(npz) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["params/linear1/bias/value"] = arrays["params/linear1/bias/value"] + 1
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=r"step 2 is damaged: the params arrays read from .*2/state/arrays.npz"):
        C.restore(ckpt, state)
    C.close(ckpt)


def test_npz_checkpoint_reads_with_numpy_alone(tmp_path):
    state = _state()
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 3, state, meta={})
    C.close(ckpt)
    with np.load(tmp_path / "3" / "state" / C.ARRAYS_FILE, allow_pickle=False) as archive:
        kernel = archive["params/linear1/kernel/value"]
        assert len(archive.files) == len(jax.tree.leaves(state))
    np.testing.assert_array_equal(kernel, np.asarray(state.params["linear1"]["kernel"][...]))


def test_state_handler_works_in_orbax_synchronous_checkpointer(tmp_path):
    # The item handler also serves Orbax's synchronous Checkpointer (both formats).
    arrays = {"params/w/value": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.asarray(4)}
    with ocp.Checkpointer(C._StateHandler()) as checkpointer:
        checkpointer.save(tmp_path / "npz", args=C._NpzSave(arrays))
        checkpointer.save(tmp_path / "orbax", args=ocp.args.StandardSave({"w": arrays["params/w/value"]}))
        back = checkpointer.restore(tmp_path / "npz", args=C._NpzRestore())
        standard = checkpointer.restore(tmp_path / "orbax", args=ocp.args.StandardRestore())
    assert _equal_trees(back, arrays) and sorted(back) == sorted(arrays)
    np.testing.assert_array_equal(standard["w"], arrays["params/w/value"])


def test_npz_round_trip_keeps_ml_dtypes(tmp_path):
    # NumPy's .npy stores bfloat16/float8 as raw bytes ("|V2"); restore gives the target's dtype back.
    state = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7,
             "f8": jnp.linspace(-2, 2, 5).astype(jnp.float8_e4m3fn), "b": jnp.array([True, False])}
    ckpt = C.create_checkpoint_manager(tmp_path)
    C.save(ckpt, 1, state, meta={})
    restored, _ = C.restore(ckpt, jax.eval_shape(lambda: state))
    C.close(ckpt)
    assert (tmp_path / "1" / "state" / C.ARRAYS_FILE).is_file()
    assert {k: v.dtype for k, v in restored.items()} == {k: v.dtype for k, v in state.items()}
    assert _equal_trees(restored, state)


def test_a_checkpoint_in_orbax_format_restores_into_a_run_that_writes_npz(tmp_path):
    # Checkpoints written before the .npz format (and by multi-process runs)
    # are in Orbax's format; one manager reads them and then writes .npz.
    state = _state()
    ckpt = C.create_checkpoint_manager(tmp_path, array_format="orbax")
    C.save(ckpt, 1, state, meta={"epoch": 1})
    C.close(ckpt)
    assert not (tmp_path / "1" / "state" / C.ARRAYS_FILE).exists()
    # ... which plain Orbax reads, without jaxnet
    raw = ocp.StandardCheckpointer().restore(tmp_path / "1" / "state")
    np.testing.assert_array_equal(raw["params"]["linear1"]["kernel"]["value"], state.params["linear1"]["kernel"][...])
    ckpt = C.create_checkpoint_manager(tmp_path)
    restored, meta = C.restore(ckpt, state)
    assert meta == {"epoch": 1} and _equal_trees(restored, state)
    C.save(ckpt, 2, restored, meta={"epoch": 2})
    again, _ = C.restore(ckpt, state, step=2)
    C.close(ckpt)
    assert (tmp_path / "2" / "state" / C.ARRAYS_FILE).is_file() and _equal_trees(again, state)


def test_restore_latest_good_falls_back_and_loses_nothing(saved, caplog):
    directory, state = saved
    victim = _largest_file(directory / "2")
    _flip_middle_byte(victim)
    before = _all_files(directory)
    ckpt = C.create_checkpoint_manager(directory)
    with caplog.at_level(logging.WARNING, logger="jaxnet.checkpoint"):
        restored, meta = C.restore_latest_good(ckpt, state)
    assert meta == {"epoch": 1} and int(restored.step) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxnet.checkpoint"]
    assert any("skipping checkpoint step 2" in w and victim.name in w for w in warnings)
    assert any("resuming from checkpoint step 1" in w for w in warnings)
    # The damaged step was moved aside, byte for byte, and step 2 can be saved again.
    after = _all_files(directory)
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
        _truncate(_largest_file(directory / str(step)))
    before = _all_files(directory)
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=r"no sound checkpoint.*step 2 .*step 1 .*another --workdir"):
        C.restore_latest_good(ckpt, state)
    C.close(ckpt)
    assert _all_files(directory) == before


# --- crash safety ------------------------------------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys, optax
    from jaxnet import checkpoint as C
    from jaxnet.models import create_model
    from jaxnet.state import create_train_state
    _, state = create_train_state(create_model("mlp"), optax.adam(1e-3), seed=0)
    ckpt = C.create_checkpoint_manager(sys.argv[1], max_to_keep=2)
    for step in range(1, 100000):
        C.save(ckpt, step, state, meta={"step": step})
""")


def _tmp_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name] if directory.is_dir() else []


def test_a_save_killed_midway_is_invisible(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    leftovers: list[pathlib.Path] = []
    for _ in range(5):  # each try kills the saver while a save (not the first) is in flight
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                finished = [p for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
                if finished and _tmp_dirs(directory):
                    break
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        leftovers = _tmp_dirs(directory)
        if leftovers:
            break
    assert leftovers, "never managed to kill the saver during a save"
    interrupted = int(leftovers[0].name.split(".")[0])
    ckpt = C.create_checkpoint_manager(directory)
    assert _tmp_dirs(directory) == []  # the unfinished save is removed on opening
    assert C.latest(ckpt) is not None and interrupted not in C.steps(ckpt)
    _, state = create_train_state(create_model("mlp"), optax.adam(1e-3), seed=0)
    for step in C.steps(ckpt):
        assert (directory / str(step) / C.MANIFEST_FILE).is_file()  # committed with the step
        restored, meta = C.restore(ckpt, state, step=step)
        assert meta == {"step": step} and _equal_trees(restored, state)
    C.save(ckpt, interrupted, state, meta={"step": interrupted})  # the interrupted step, anew
    C.wait(ckpt)
    assert interrupted in C.steps(ckpt)
    C.close(ckpt)


# --- log noise ---------------------------------------------------------------------------------


def test_orbax_info_lines_stay_out_of_the_log(tmp_path, caplog):
    state = _state()
    with caplog.at_level(logging.DEBUG):
        ckpt = C.create_checkpoint_manager(tmp_path, best_metric="acc")
        C.save(ckpt, 1, state, meta={})  # no metric: Orbax would warn
        C.save(ckpt, 2, state, meta={}, metrics={"acc": 1.0})
        C.restore(ckpt, state)
        C.close(ckpt)
    noise = [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
    assert noise == []
    assert logging.getLogger().level == logging.WARNING  # the root logger is untouched


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_sharded_run_resumes_bit_identical_with_its_sharding(fsdp, tmp_path):
    # 8 (fake) devices in one process: saved from host copies, restored onto the mesh.
    import dataclasses

    from jaxnet import create_model, create_optimizer, fit
    from jaxnet.data import load_dataset

    data = load_dataset("mnist", download=False)
    data = dataclasses.replace(data, train_images=data.train_images[:1024], train_labels=data.train_labels[:1024],
                               test_images=data.test_images[:256], test_labels=data.test_labels[:256])
    kw = dict(batch_size=64, devices=8, fsdp=fsdp, progress=False)
    whole = fit(create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=2, **kw)
    fit(create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=1, workdir=tmp_path, **kw)
    resumed = fit(create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=2, workdir=tmp_path,
                  resume=True, **kw)
    assert resumed.summary["resumed_from_step"] == 16
    assert resumed.summary["params_sha256"] == whole.summary["params_sha256"]
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
