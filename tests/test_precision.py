"""Mixed precision: the dtype policy and GradScaler-style dynamic loss scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import precision
from jaxnet.errors import ConfigError
from jaxnet.models import create_model
from jaxnet.parallel import sharding
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_train_step
from jaxnet.train import make_image_transform
from tests.helpers import leafwise_rel_err, mnist_batch, rel_err, trees_equal

TRANSFORM = make_image_transform((0.1307,), (0.3081,))
LOSS = loss_for_output("logits")


# --- the dtype policy --------------------------------------------------------------------


def test_get_policy_names_and_errors():
    assert precision.get_policy("fp32").compute_dtype == jnp.float32
    assert precision.get_policy("bf16").compute_dtype == jnp.bfloat16
    assert precision.get_policy("fp16").needs_loss_scaling
    assert not precision.get_policy("bf16").needs_loss_scaling
    with pytest.raises(ConfigError, match=r"unknown precision 'fp8'; expected one of \('fp32', 'bf16', 'fp16'\)"):
        precision.get_policy("fp8")


@pytest.mark.parametrize("name, dtype", [("bf16", jnp.bfloat16), ("fp16", jnp.float16)])
def test_policy_computes_in_low_precision_and_keeps_params_fp32(name, dtype):
    policy = precision.get_policy(name)
    transform, loss_fn = precision.apply_policy(policy, TRANSFORM, LOSS)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), optax.adam(1e-3), seed=0)
    batch = mnist_batch()
    inputs = transform(jax.random.PRNGKey(0), jnp.asarray(batch["image"]), True)
    assert inputs.dtype == dtype
    model = create_model("mlp512", seed=0)
    assert model(inputs).dtype == dtype  # the layers compute in the input's dtype
    assert loss_fn(model(inputs), jnp.asarray(batch["label"])).dtype == jnp.float32
    step = make_train_step(graphdef, optax.adam(1e-3), loss_fn, transform=transform)
    new_state, m = step(state, batch)
    assert m["loss"].dtype == jnp.float32
    for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    # Close to the float32 step, but not equal: the matmuls really ran in low precision.
    _, state32 = create_train_state(create_model("mlp512", seed=0), optax.adam(1e-3), seed=0)
    _, m32 = make_train_step(graphdef, optax.adam(1e-3), LOSS, transform=TRANSFORM)(state32, batch)
    assert abs(float(m["loss"]) - float(m32["loss"])) < 2e-2
    assert float(m["loss"]) != float(m32["loss"])


def test_fp32_policy_is_the_plain_step():
    graphdef, state = create_train_state(create_model("mlp512", seed=0), optax.sgd(0.1), seed=0)
    transform, loss_fn = precision.apply_policy(precision.get_policy("fp32"), TRANSFORM, LOSS)
    a, ma = make_train_step(graphdef, optax.sgd(0.1), loss_fn, transform=transform, donate=False)(state, mnist_batch())
    b, mb = make_train_step(graphdef, optax.sgd(0.1), LOSS, transform=TRANSFORM, donate=False)(state, mnist_batch())
    assert trees_equal(a.params, b.params) and float(ma["loss"]) == float(mb["loss"])


# --- dynamic loss scaling ----------------------------------------------------------------


def test_loss_scaling_skips_non_finite_gradients_and_halves_the_scale():
    params = {"w": jnp.ones(3, jnp.float32)}
    tx = precision.dynamic_loss_scaling(optax.adam(0.1), init_scale=1024.0)
    state = tx.init(params)
    assert float(state.loss_scale) == 1024.0
    bad = {"w": jnp.array([1.0, jnp.inf, 2.0], jnp.float32) * 1024.0}
    updates, new = tx.update(bad, state, params)
    assert trees_equal(optax.apply_updates(params, updates), params)  # step skipped
    assert float(new.loss_scale) == 512.0 and int(new.good_steps) == 0
    assert trees_equal(new.inner_state, state.inner_state)  # Adam's moments and count untouched
    nan = {"w": jnp.array([jnp.nan, 0.0, 0.0], jnp.float32)}
    _, newer = tx.update(nan, new, params)
    assert float(newer.loss_scale) == 256.0


def test_loss_scaling_unscales_finite_gradients():
    params = {"w": jnp.array([1.0, -2.0, 3.0], jnp.float32)}
    grads = {"w": jnp.array([0.5, 0.25, -1.0], jnp.float32)}
    inner = optax.adam(0.1)
    tx = precision.dynamic_loss_scaling(inner, init_scale=2.0**16)
    scaled = jax.tree.map(lambda g: g * 2.0**16, grads)
    updates, state = tx.update(scaled, tx.init(params), params)
    ref_updates, ref_state = inner.update(grads, inner.init(params), params)
    assert rel_err(updates, ref_updates) <= 1e-6
    assert rel_err(state.inner_state[0].mu, ref_state[0].mu) <= 1e-6
    assert int(state.good_steps) == 1 and float(state.loss_scale) == 2.0**16


def test_loss_scale_grows_after_the_interval_of_finite_steps():
    params = {"w": jnp.ones(2, jnp.float32)}
    tx = precision.dynamic_loss_scaling(optax.sgd(0.1), init_scale=8.0, growth_interval=3)
    state = tx.init(params)
    scales = []
    for _ in range(7):
        _, state = tx.update({"w": jnp.ones(2, jnp.float32)}, state, params)
        scales.append(float(state.loss_scale))
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    assert int(state.good_steps) == 1


@pytest.mark.parametrize(
    "kwargs", [{"init_scale": 0.0}, {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"growth_interval": 0}]
)
def test_loss_scaling_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError, match="loss scaling needs"):
        precision.dynamic_loss_scaling(optax.sgd(0.1), **kwargs)


def test_fp16_step_survives_an_injected_overflow():
    # A loss scale of 2**30 makes the float16 backward pass overflow (65504 is
    # float16's largest value): the step must be skipped and the scale halved,
    # exactly what GradScaler does, and the next, smaller scale must work.
    transform, loss_fn = precision.apply_policy(precision.get_policy("fp16"), TRANSFORM, LOSS)
    tx = precision.dynamic_loss_scaling(optax.sgd(0.01, momentum=0.9), init_scale=2.0**30)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    step = precision.make_loss_scaled_train_step(graphdef, tx, loss_fn, transform=transform, donate=False)
    new_state, m = step(state, mnist_batch())
    assert trees_equal(new_state.params, state.params)
    assert float(new_state.opt_state.loss_scale) == 2.0**29
    assert float(m["loss_scale"]) == 2.0**30
    assert np.isfinite(float(m["loss"])) and 2.0 < float(m["loss"]) < 2.7  # unscaled, about log(10)
    assert int(new_state.step) == 1
    for _ in range(30):  # halves until the gradients fit, then trains
        new_state, m = step(new_state, mnist_batch())
    scale = float(new_state.opt_state.loss_scale)
    assert scale < 2.0**29
    assert not trees_equal(new_state.params, state.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_state.params))


def test_loss_scaled_step_equals_plain_step_in_fp32():
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    ref, mref = make_train_step(graphdef, tx, LOSS, transform=TRANSFORM)(state, mnist_batch())
    scaled_tx = precision.dynamic_loss_scaling(tx)
    _, state = create_train_state(create_model("mlp512", seed=0), scaled_tx, seed=0)
    new, m = precision.make_loss_scaled_train_step(graphdef, scaled_tx, LOSS, transform=TRANSFORM)(state, mnist_batch())
    assert rel_err(m["loss"], mref["loss"]) <= 1e-6
    assert leafwise_rel_err(new.params, ref.params) <= 1e-5


def test_loss_scaled_step_needs_the_scaling_optimizer():
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    step = precision.loss_scaled_train_step_fn(graphdef, tx, LOSS, transform=TRANSFORM)
    expected = r"not a DynamicScaleState; build the optimizer as dynamic_loss_scaling\(tx\)"
    with pytest.raises(ConfigError, match=expected):
        step(state, mnist_batch())


def test_loss_scaled_step_runs_sharded():
    transform, loss_fn = precision.apply_policy(precision.get_policy("fp16"), TRANSFORM, LOSS)
    tx = precision.dynamic_loss_scaling(optax.sgd(0.01), init_scale=2.0**30)
    graphdef, state = create_train_state(create_model("mlp512", seed=0), tx, seed=0)
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=True)
    step_fn = precision.loss_scaled_train_step_fn(graphdef, tx, loss_fn, transform=transform)
    step = sharding.make_sharded_train_step(graphdef, tx, loss_fn, mesh, shardings, step_fn=step_fn, donate=False)
    sharded = sharding.shard_state(state, shardings)
    new, _ = step(sharded, mnist_batch())
    assert float(new.opt_state.loss_scale) == 2.0**29
    assert trees_equal(new.params, state.params)


# --- fit(precision=...) --------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_fit_in_fp16_scales_the_loss_in_step_and_scan_mode(scan):
    # precision="fp16" wraps the optimizer in dynamic_loss_scaling, which divides the
    # gradients by the scale: every step, a scanned epoch's too, must take the gradients
    # of the loss times that scale, or SGD would move the parameters 2**16 times too little.
    from jaxnet.train import fit

    batch = mnist_batch(256, seed=1)
    start = create_train_state(create_model("mlp128", seed=0), optax.sgd(0.1))[1].params
    moved = {}
    for name in ("fp32", "fp16"):
        result = fit(
            create_model("mlp128", seed=0),
            (batch["image"], batch["label"]),
            optax.sgd(0.1, momentum=0.9),
            epochs=1,
            batch_size=32,
            precision=name,
            scan=scan,
            progress=False,
        )
        assert result.summary["precision"] == name
        assert result.summary["mode"] == ("scan" if scan else "step")
        moved[name] = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), result.state.params, start)
    assert isinstance(result.state.opt_state, precision.DynamicScaleState)
    assert rel_err(moved["fp16"], moved["fp32"]) < 0.05


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_fit_in_low_precision_gives_a_loss_of_the_batch_float32_outputs(name):
    from jaxnet.train import fit

    seen = []

    def loss_of_batch(outputs, labels, batch):
        seen.append((outputs.dtype, sorted(batch)))
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

    batch = mnist_batch(128, seed=2)
    runs = [
        fit(
            create_model("mlp128", seed=0),
            (batch["image"], batch["label"]),
            optax.sgd(0.1),
            epochs=1,
            batch_size=32,
            precision=name,
            loss_fn=loss,
            progress=False,
        )
        for loss in (loss_of_batch, "cross_entropy")
    ]
    assert seen and all(dtype == jnp.float32 and "image" in keys and "label" in keys for dtype, keys in seen)
    assert runs[0].history[-1]["train_loss"] == pytest.approx(runs[1].history[-1]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_convnet_accuracy_within_0_3_points_of_fp32(shared_data):
    # One epoch of the MNIST ConvNet (PyTorch's MNIST example recipe, Adadelta
    # lr 1.0, batch 64) on the real 60k/10k split through fit, in float32 and
    # in bfloat16 compute. About 3 minutes per precision on 2 CPU cores.
    from jaxnet.data import load_dataset
    from jaxnet.optim import create_optimizer
    from jaxnet.train import fit

    data = load_dataset("mnist", data_dir=shared_data, download=False)
    assert data.num_train == 60000
    accuracy = {}
    for name in ("fp32", "bf16"):
        result = fit(
            create_model("convnet", seed=0),
            data,
            create_optimizer("adadelta", 1.0),
            epochs=1,
            batch_size=64,
            output="log_probs",
            seed=0,
            precision=name,
            progress=False,
        )
        assert result.summary["precision"] == name
        accuracy[name] = result.summary["test_accuracy"]
    print(f"test accuracy after one epoch: {accuracy}")
    assert accuracy["fp32"] > 0.97
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.003, accuracy
