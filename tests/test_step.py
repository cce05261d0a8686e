"""The pure step: correctness against a hand-written update, purity, no recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnet.compilation import CompileCounter
from jaxnet.state import TrainState, create_train_state, merge_model
from jaxnet.step import (
    loss_for_output,
    make_eval_step,
    make_predict_fn,
    make_scan_epoch,
    make_train_step,
    train_step_fn,
)


class TinyNet(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, on (B, 4, 4, 1) images."""

    def __init__(self, *, dropout: float = 0.5, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(16, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, *, rngs=None):
        x = x.reshape(x.shape[0], -1)
        x = self.drop(jax.nn.relu(self.bn(self.fc1(x))), rngs=rngs)
        return self.fc2(x)


def _batch(seed: int = 0, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
        "label": rng.integers(0, 3, size=n).astype(np.int32),
    }


def _setup(tx=None, dropout=0.5, seed=0):
    tx = tx or optax.sgd(0.1)
    graphdef, state = create_train_state(TinyNet(dropout=dropout, rngs=nnx.Rngs(seed)), tx, seed=seed)
    return graphdef, state, tx


def test_one_step_equals_manual_sgd_update():
    graphdef, state, tx = _setup(dropout=0.0)
    batch = _batch()
    loss_fn = loss_for_output("logits")

    def reference_loss(params):
        model = nnx.merge(graphdef, params, state.model_state, copy=True)
        model.train()
        return loss_fn(model(jnp.asarray(batch["image"])), jnp.asarray(batch["label"]))

    ref_loss, grads = jax.value_and_grad(reference_loss)(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    step = make_train_step(graphdef, tx, loss_fn, donate=False)
    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(new_state.step) == 1


def test_training_reduces_loss_and_updates_batch_stats():
    graphdef, state, tx = _setup(tx=optax.adam(1e-2))
    step = make_train_step(graphdef, tx, loss_for_output("logits"))
    batch = _batch()
    mean_before = np.asarray(state.model_state["bn"]["mean"][...])
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(np.asarray(state.model_state["bn"]["mean"][...]), mean_before)
    assert int(state.step) == 60


def test_state_structure_and_dtypes_are_preserved():
    graphdef, state, tx = _setup()
    step = make_train_step(graphdef, tx, loss_for_output("logits"), donate=False)
    new_state, _ = step(state, _batch())
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_second_call_does_not_recompile():
    graphdef, state, tx = _setup()
    step = make_train_step(graphdef, tx, loss_for_output("logits"))
    state, _ = step(state, _batch(0))
    with CompileCounter() as counter:
        for i in range(1, 4):
            state, _ = step(state, _batch(i))
        jax.block_until_ready(state)
    assert counter.compiles == 0
    assert counter.traces == 0
    assert step._cache_size() == 1
    # A new shape is a new program: the counter sees it.
    with CompileCounter() as counter:
        state, _ = step(state, _batch(9, n=5))
    assert counter.compiles >= 1


def test_state_is_donated():
    graphdef, state, tx = _setup()
    step = make_train_step(graphdef, tx, loss_for_output("logits"))
    old_leaf = jax.tree.leaves(state.params)[0]
    step(state, _batch())
    assert old_leaf.is_deleted()


def test_same_seed_same_result_and_dropout_changes_per_step():
    graphdef, state_a, tx = _setup(seed=3)
    _, state_b, _ = _setup(seed=3)
    step = make_train_step(graphdef, tx, loss_for_output("logits"), donate=False)
    out_a, m_a = step(state_a, _batch())
    out_b, m_b = step(state_b, _batch())
    for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
        np.testing.assert_array_equal(a, b)
    # Same params, same batch, but step 1 instead of 0: a different dropout mask.
    shifted = state_a.replace(step=jnp.ones((), jnp.int32))
    _, m_c = step(shifted, _batch())
    assert float(m_c["loss"]) != float(m_a["loss"])


def test_scan_epoch_equals_step_loop():
    graphdef, state, tx = _setup(tx=optax.adam(1e-2))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(40, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=40).astype(np.int32)
    idx = rng.permutation(40)[:36].reshape(6, 6).astype(np.int32)
    loss_fn = loss_for_output("logits")
    step = make_train_step(graphdef, tx, loss_fn, donate=False)
    looped = state
    step_losses = []
    for row in idx:
        looped, m = step(looped, {"image": images[row], "label": labels[row]})
        step_losses.append(float(m["loss"]))
    scan_epoch = make_scan_epoch(graphdef, tx, loss_fn, donate=False)
    scanned, per_step = scan_epoch(state, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(idx))
    np.testing.assert_allclose(per_step["loss"], step_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(looped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_step_gives_per_example_losses_and_is_deterministic():
    graphdef, state, _ = _setup()
    loss_fn = loss_for_output("logits")
    eval_step = make_eval_step(graphdef, loss_fn)
    batch = _batch(n=8)
    full = eval_step(state, batch)
    again = eval_step(state, batch)
    np.testing.assert_array_equal(full["outputs"], again["outputs"])  # dropout off in eval
    assert full["loss"].shape == (8,)
    np.testing.assert_allclose(jnp.mean(full["loss"]), loss_fn(full["outputs"], batch["label"]), rtol=1e-6)


def test_predict_matches_merged_model_in_eval_mode():
    graphdef, state, _ = _setup()
    predict = make_predict_fn(graphdef)
    x = _batch()["image"]
    model = merge_model(graphdef, state)
    np.testing.assert_allclose(predict(state, x), model(jnp.asarray(x)), rtol=1e-6)


def test_unknown_output_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model output kind 'probs'"):
        loss_for_output("probs")


def test_train_step_fn_is_pure_python_function():
    graphdef, state, tx = _setup()
    fn = train_step_fn(graphdef, tx, loss_for_output("logits"))
    assert isinstance(state, TrainState)
    jaxpr = jax.make_jaxpr(fn)(state, _batch())
    assert "dot_general" in str(jaxpr)  # forward and backward in one program
