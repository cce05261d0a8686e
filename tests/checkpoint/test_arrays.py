"""Tests of jaxnet.checkpoint.arrays: the arrays.npz format, read by NumPy alone, and folders mixing formats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import arrays
from tests.checkpoint.helpers import equal_trees, train_state


def test_a_rewritten_npz_with_valid_crcs_is_caught_by_the_array_digests(tmp_path):
    directory, state = tmp_path, train_state()
    ckpt = C.create_checkpoint_manager(directory, array_format="npz")
    C.save(ckpt, 2, state, meta={})
    C.close(ckpt)
    npz = directory / "2" / "state" / C.ARRAYS_FILE
    (directory / "2" / C.MANIFEST_FILE).unlink()
    with np.load(npz) as archive:
        saved = {key: archive[key] for key in archive.files}
    saved["params/linear1/bias/value"] = saved["params/linear1/bias/value"] + 1
    with open(npz, "wb") as f:
        np.savez(f, **saved)
    ckpt = C.create_checkpoint_manager(directory)
    with pytest.raises(C.CheckpointError, match=r"step 2 is damaged: the params arrays read from .*2/state/arrays.npz"):
        C.restore(ckpt, state)
    C.close(ckpt)


def test_npz_checkpoint_reads_with_numpy_alone(tmp_path):
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path, array_format="npz")
    C.save(ckpt, 3, state, meta={})
    C.close(ckpt)
    with np.load(tmp_path / "3" / "state" / C.ARRAYS_FILE, allow_pickle=False) as archive:
        kernel = archive["params/linear1/kernel/value"]
        assert len(archive.files) == len(jax.tree.leaves(state))
    np.testing.assert_array_equal(kernel, np.asarray(state.params["linear1"]["kernel"][...]))


def test_state_handler_works_in_orbax_synchronous_checkpointer(tmp_path):
    # The item handler also serves Orbax's synchronous Checkpointer (both formats).
    flat = {"params/w/value": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.asarray(4)}
    with ocp.Checkpointer(arrays.NpzHandler()) as checkpointer:
        checkpointer.save(tmp_path / "npz", args=arrays.NpzSave(flat))
        checkpointer.save(tmp_path / "orbax", args=ocp.args.StandardSave({"w": flat["params/w/value"]}))
        back = checkpointer.restore(tmp_path / "npz", args=arrays.NpzRestore())
        standard = checkpointer.restore(tmp_path / "orbax", args=ocp.args.StandardRestore())
    assert equal_trees(back, flat) and sorted(back) == sorted(flat)
    np.testing.assert_array_equal(standard["w"], flat["params/w/value"])


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_round_trip_keeps_ml_dtypes(tmp_path, array_format):
    # NumPy's .npy stores bfloat16/float8 as raw bytes ("|V2"); restore gives the target's dtype back.
    state = {
        "w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7,
        "f8": jnp.linspace(-2, 2, 5).astype(jnp.float8_e4m3fn),
        "b": jnp.array([True, False]),
    }
    ckpt = C.create_checkpoint_manager(tmp_path, array_format=array_format)
    C.save(ckpt, 1, state, meta={})
    restored, _ = C.restore(ckpt, jax.eval_shape(lambda: state))
    C.close(ckpt)
    assert (tmp_path / "1" / "state" / C.ARRAYS_FILE).is_file() == (array_format == "npz")
    assert {k: v.dtype for k, v in restored.items()} == {k: v.dtype for k, v in state.items()}
    assert equal_trees(restored, state)


def test_a_checkpoint_in_orbax_format_restores_into_a_run_that_writes_npz(tmp_path):
    # Checkpoints in Orbax's format (the default, and a multi-process run's)
    # and in .npz may share a folder: one manager reads both.
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path, array_format="orbax")
    C.save(ckpt, 1, state, meta={"epoch": 1})
    C.close(ckpt)
    assert not (tmp_path / "1" / "state" / C.ARRAYS_FILE).exists()
    # ... which plain Orbax reads, without jaxnet
    raw = ocp.StandardCheckpointer().restore(tmp_path / "1" / "state")
    np.testing.assert_array_equal(raw["params"]["linear1"]["kernel"]["value"], state.params["linear1"]["kernel"][...])
    ckpt = C.create_checkpoint_manager(tmp_path, array_format="npz")
    restored, meta = C.restore(ckpt, state)
    assert meta == {"epoch": 1} and equal_trees(restored, state)
    C.save(ckpt, 2, restored, meta={"epoch": 2})
    again, _ = C.restore(ckpt, state, step=2)
    C.close(ckpt)
    assert (tmp_path / "2" / "state" / C.ARRAYS_FILE).is_file() and equal_trees(again, state)


def test_an_npz_checkpoint_restores_into_a_run_that_writes_orbax(tmp_path):
    # Runs from before Orbax's format became the default wrote .npz: they resume
    # under the default, and the resumed run's steps are in Orbax's format.
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path, array_format="npz", best_metric="acc")
    C.save(ckpt, 1, state, meta={"epoch": 1}, metrics={"acc": 0.5})
    C.close(ckpt)
    ckpt = C.create_checkpoint_manager(tmp_path, best_metric="acc")
    restored, meta = C.restore_latest_good(ckpt, state)
    assert meta == {"epoch": 1} and equal_trees(restored, state)
    params, _, _ = C.restore_variables(ckpt, state.params, state.model_state, step="best")
    assert equal_trees(params, state.params)
    C.save(ckpt, 2, restored, meta={"epoch": 2}, metrics={"acc": 0.25})
    again, _ = C.restore(ckpt, state, step=2)
    assert C.best(ckpt) == 1 and C.resolve_step(ckpt, "best") == 1
    C.close(ckpt)
    assert (tmp_path / "1" / "state" / C.ARRAYS_FILE).is_file() and equal_trees(again, state)
    assert not (tmp_path / "2" / "state" / C.ARRAYS_FILE).exists()
    np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(tmp_path / "2" / "state")["step"], state.step)


def test_flat_names_round_trip_through_nest_and_fill():
    tree = {"params": {"fc1": {"kernel": np.ones((2, 3), np.float32)}}, "step": np.asarray(7)}
    flat = arrays.flat_arrays(tree)
    assert sorted(flat) == ["params/fc1/kernel", "step"]
    assert equal_trees(arrays.fill(tree, arrays.nest(flat), 1, "state"), tree)
    assert arrays.flat_arrays({"a/b": np.zeros(1)}) is None  # a "/" in a name: Orbax's format instead
    with pytest.raises(C.CheckpointMismatchError, match=r"step 1 has no state array \['extra'\]"):
        arrays.fill({**tree, "extra": np.zeros(1)}, arrays.nest(flat), 1, "state")
