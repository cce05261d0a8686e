"""Test-time augmentation equals the mean of the views' logits, each view computed separately."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.cifar_speed import CifarSpeedNet
from jaxnet.state import TrainState
from jaxnet.step import make_predict_fn
from jaxnet.tta import make_tta_predict, tta_accuracy, tta_logits, tta_views


def linear_model(seed: int = 0):
    """Logits that depend on where every pixel is, so flips and shifts change them."""
    w = jax.random.normal(jax.random.key(seed), (8 * 8 * 3, 5))
    return lambda x: x.reshape(x.shape[0], -1) @ w


def views_by_hand(x: np.ndarray) -> dict[str, np.ndarray]:
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    t1, t2 = padded[:, 0:8, 0:8], padded[:, 2:10, 2:10]
    return {"x": x, "fx": x[:, :, ::-1], "t1": t1, "ft1": t1[:, :, ::-1], "t2": t2, "ft2": t2[:, :, ::-1]}


def test_tta_logits_are_the_mean_of_the_views_logits():
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    net = linear_model()
    f = {k: np.asarray(net(jnp.asarray(v)), np.float64) for k, v in views_by_hand(x).items()}
    mirror = {k: 0.5 * f[k] + 0.5 * f["f" + k] for k in ("x", "t1", "t2")}
    expected = {0: f["x"], 1: mirror["x"], 2: 0.5 * mirror["x"] + 0.5 * (mirror["t1"] + mirror["t2"]) / 2}
    for level, want in expected.items():
        got = tta_logits(net, jnp.asarray(x), level)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.allclose(expected[0], expected[2])  # the views do differ
    assert sum(w for w, _ in tta_views(jnp.asarray(x), 2)) == 1.0


def model_and_predict():
    model = CifarSpeedNet(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=(), model_state=rest, rng=jax.random.PRNGKey(0)
    )
    transform = lambda key, images, train: images.astype(jnp.float32) / 255.0  # noqa: E731
    return make_predict_fn(graphdef, transform=transform), state


def test_tta_accuracy_counts_every_image_once_with_a_padded_last_batch():
    predict, state = model_and_predict()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(make_tta_predict(predict, 2)(state, jnp.asarray(images)))
    labels = np.argmax(logits, axis=1)
    labels[[0, 4, 10]] = (labels[[0, 4, 10]] + 1) % 10  # three wrong on purpose, one in the last batch
    assert tta_accuracy(predict, state, images, labels, level=2, batch_size=4) == pytest.approx(8 / 11)
    # the uint8 views are the views of the normalized images: TTA commutes with normalization
    direct = tta_logits(lambda x: predict(state, x), jnp.asarray(images), 2)
    np.testing.assert_allclose(direct, logits, rtol=1e-5, atol=1e-6)


def test_unknown_levels_and_empty_splits_are_refused():
    predict, state = model_and_predict()
    with pytest.raises(ConfigError, match="tta level"):
        tta_views(jnp.zeros((1, 4, 4, 1)), 3)
    with pytest.raises(ConfigError, match="tta level"):
        make_tta_predict(predict, -1)
    with pytest.raises(ConfigError, match="as many images as labels"):
        tta_accuracy(predict, state, np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, np.int32))
