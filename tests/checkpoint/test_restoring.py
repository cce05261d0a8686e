"""Tests of jaxnet.checkpoint.restoring: exact round trips, targets, verification of files, records and arrays."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxnet import checkpoint as C
from tests.checkpoint.helpers import equal_trees, flip_middle_byte, largest_file, train_state, truncate

# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_round_trip_is_exact_and_keeps_optax_types(tmp_path, array_format):
    state = train_state()
    meta = {
        "epoch": 1,
        "batch_in_epoch": 7,
        "seed": 0,
        "config": {"model": "mlp128"},
        "train_sums": {"loss": float(np.float32(0.1) * 3), "accuracy": 0.1 + 0.2},
    }
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format)
    C.save(ckpt, 3, state, meta=meta)
    C.wait(ckpt)
    restored, restored_meta = C.restore(ckpt, state)
    C.close(ckpt)
    assert equal_trees(restored, state)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # ScaleByAdamState, not a list
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored_meta == meta  # floats survive JSON bit for bit
    assert restored_meta["train_sums"]["accuracy"] == 0.1 + 0.2


def test_restore_into_abstract_targets(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    for target in (jax.eval_shape(lambda: state), shapes):
        restored, meta = C.restore(ckpt, target, step=1)
        assert isinstance(jax.tree.leaves(restored)[0], jax.Array)
        assert equal_trees(restored.params, state.params)
        assert int(restored.step) == 1 and meta == {"epoch": 1}
    C.close(ckpt)


def test_restore_variables_needs_no_optimizer(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory, read_only=True)
    params, model_state, meta = C.restore_variables(ckpt, state.params, state.model_state)
    assert equal_trees(params, state.params) and meta == {"epoch": 2}
    C.close(ckpt)


def test_the_record_is_public_and_verified(saved):
    directory, state = saved
    ckpt = C.create_checkpoint_manager(directory, read_only=True)
    record = C.read_record(ckpt, 2)
    assert record["meta"] == {"epoch": 2} and record["finite"] is True
    assert record["state_sha256"]["params"] == C.params_sha256(state.params)
    C.close(ckpt)


def test_restoring_into_another_model_is_a_mismatch_not_damage(saved):
    directory, _ = saved
    other = train_state("mlp")
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointMismatchError, match=r"step 2 does not fit: its params part has 4 arrays"):
        C.restore(ckpt, other)
    with pytest.raises(C.CheckpointMismatchError):
        C.restore_latest_good(ckpt, other)
    assert C.steps(ckpt) == [1, 2]  # nothing moved aside
    C.close(ckpt)


# --- damage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, expected",
    [
        (flip_middle_byte, "changed after it was written"),
        (truncate, "truncated"),
        (os.remove, "is missing"),
    ],
)
def test_damaged_data_file_is_named(saved, damage, expected):
    directory, state = saved
    victim = largest_file(directory / "2")
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
    flip_middle_byte(largest_file(directory / "2" / "state"))
    ckpt = C.create_checkpoint_manager(directory)
    # In an .npz the zip's CRC-32s already name the file; in Orbax's format the array digests do.
    with pytest.raises(C.CheckpointError, match=r"step 2 is damaged: .*2/state"):
        C.restore(ckpt, state)
    C.close(ckpt)


# --- sharded states ----------------------------------------------------------------------------


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_sharded_run_resumes_bit_identical_with_its_sharding(fsdp, tmp_path):
    # 8 (fake) devices in one process: saved from host copies, restored onto the mesh.
    from jaxnet import create_model, create_optimizer, fit
    from jaxnet.data import load_dataset

    data = load_dataset("mnist", download=False)
    data = dataclasses.replace(
        data,
        train_images=data.train_images[:1024],
        train_labels=data.train_labels[:1024],
        test_images=data.test_images[:256],
        test_labels=data.test_labels[:256],
    )
    kw = dict(batch_size=64, devices=8, fsdp=fsdp, progress=False)
    whole = fit(create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=2, **kw)
    fit(create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=1, workdir=tmp_path, **kw)
    resumed = fit(
        create_model("mlp128"), data, create_optimizer("adam", 1e-3), epochs=2, workdir=tmp_path, resume=True, **kw
    )
    assert resumed.summary["resumed_from_step"] == 16
    assert resumed.summary["params_sha256"] == whole.summary["params_sha256"]
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
