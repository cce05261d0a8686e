"""Tests of jaxnet.checkpoint.integrity: the params_sha256 definition, records and file manifests."""

from __future__ import annotations

import hashlib
import pathlib

import jax
import numpy as np
import optax
import pytest

from jaxnet.checkpoint import integrity as I
from jaxnet.errors import ConfigError
from jaxnet.models import create_model
from jaxnet.state import create_train_state


def _state():
    return create_train_state(create_model("mlp128"), optax.adam(1e-3), seed=0)[1]


def test_params_sha256_definition():
    params = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    manual = hashlib.sha256(params["a"].tobytes() + params["b"].tobytes()).hexdigest()  # tree order: a, b
    assert I.params_sha256(params) == manual
    state = _state()
    assert I.params_sha256(state.params) == I.params_sha256(jax.tree.map(np.asarray, state.params))
    leaves = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    leaves[0].view(np.uint32).flat[0] ^= 1  # one bit of one parameter
    changed = jax.tree.unflatten(jax.tree.structure(state.params), leaves)
    assert I.params_sha256(changed) != I.params_sha256(state.params)


def test_record_round_trip_and_tampering():
    state = _state()
    record = I.make_record(state, {"epoch": 1, "sums": {"loss": 0.1 + 0.2}}, {"acc": np.float32(0.5)})
    assert I.record_problem(record) is None
    assert record["metrics"] == {"acc": 0.5} and set(record["state_sha256"]) == {
        "step",
        "params",
        "opt_state",
        "model_state",
        "rng",
    }
    assert I.shapes_problem(record, state, ["params", "opt_state"]) is None
    assert I.digest_problem(record, state, ["params", "opt_state", "rng"]) is None
    tampered = {**record, "meta": {"epoch": 2, "sums": {"loss": 0.1 + 0.2}}}
    assert I.record_problem(tampered) == "does not match its recorded SHA-256"
    assert "no jaxnet record" in I.record_problem({"meta": {}})
    other = create_train_state(create_model("mlp"), optax.adam(1e-3))[1]
    assert I.shapes_problem(record, other, ["params"]).startswith("its params part has 4 arrays [")
    moved = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
    assert I.digest_problem(record, moved, ["step", "params"]) == "params"
    with pytest.raises(ConfigError, match="must be JSON"):
        I.make_record(state, {"x": np.zeros(2)}, None)
    with pytest.raises(ConfigError, match="must be a dict"):
        I.make_record(state, [1], None)


def test_manifest_names_the_damaged_file(tmp_path: pathlib.Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").write_bytes(bytes(range(200)))
    (tmp_path / "commit_success.txt").write_text("rewritten later by Orbax")
    assert I.manifest_problem(tmp_path) is None  # no manifest: nothing to check
    I.write_manifest(tmp_path, 7)
    assert I.manifest_problem(tmp_path) is None
    (tmp_path / "commit_success.txt").write_text("changed")  # not hashed
    assert I.manifest_problem(tmp_path) is None
    data = bytearray((tmp_path / "sub" / "data").read_bytes())
    data[100] ^= 1
    (tmp_path / "sub" / "data").write_bytes(bytes(data))
    changed = f"the bytes of {tmp_path / 'sub' / 'data'} changed after it was written (SHA-256 mismatch)"
    assert I.manifest_problem(tmp_path) == changed
    (tmp_path / "sub" / "data").write_bytes(bytes(50))
    assert "has 50 bytes, 200 were written" in I.manifest_problem(tmp_path)
    (tmp_path / "sub" / "data").unlink()
    assert I.manifest_problem(tmp_path).endswith("data is missing")
    (tmp_path / I.MANIFEST_FILE).write_text("{trunc")
    assert "is unreadable" in I.manifest_problem(tmp_path)
