"""Tests for jaxnet.data.transforms: torchvision's math, per-example randomness, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.data import augment, normalize, random_crop, random_flip
from jaxnet.errors import ConfigError


def _images(n=16, h=8, w=8, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8))


def test_normalize_equals_totensor_then_normalize():
    images = _images()
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    # torchvision: ToTensor divides by 255, Normalize does (x - mean) / std per channel.
    ref = (np.asarray(images, np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    out = jax.jit(normalize, static_argnums=(1, 2))(images, mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    assert float(normalize(jnp.full((1, 1, 1, 1), 255, jnp.uint8), (0.1307,), (0.3081,))[0, 0, 0, 0]) == pytest.approx(
        (1 - 0.1307) / 0.3081, rel=1e-6
    )


def test_normalize_floats_skips_the_255_division():
    x = jnp.full((1, 2, 2, 1), 0.5, jnp.float32)
    assert float(normalize(x, (0.5,), (0.5,))[0, 0, 0, 0]) == 0.0


def test_normalize_errors():
    with pytest.raises(ConfigError, match="1 means and 1 stds for 3 channels"):
        normalize(_images(), (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="zero std"):
        normalize(_images(c=1), (0.5,), (0.0,))


def test_random_crop_is_a_window_of_the_padded_image():
    images, p = _images(32), 4
    out = np.asarray(random_crop(jax.random.key(1), images, padding=p))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(np.asarray(images), ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = []
    for i in range(len(out)):
        hits = [
            (r, c)
            for r in range(2 * p + 1)
            for c in range(2 * p + 1)
            if np.array_equal(padded[i, r : r + 8, c : c + 8], out[i])
        ]
        assert hits, f"example {i} is not a window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # per-example offsets, not one for the batch
    assert np.array_equal(out, np.asarray(random_crop(jax.random.key(1), images, padding=p)))
    assert not np.array_equal(out, np.asarray(random_crop(jax.random.key(2), images, padding=p)))
    assert np.array_equal(np.asarray(random_crop(jax.random.key(1), images, padding=0)), np.asarray(images))


def test_random_crop_reaches_the_extreme_offsets():
    images = jnp.ones((400, 4, 4, 1), jnp.uint8)
    out = np.asarray(random_crop(jax.random.key(0), images, padding=1))
    # offset 0 puts padding in the first row, offset 2 in the last one
    assert (out[:, 0, 1, 0] == 0).any() and (out[:, -1, 1, 0] == 0).any() and (out[:, 1, 1, 0] == 1).all()


def test_random_flip_mirrors_about_half_of_the_examples():
    images = _images(200)
    out = np.asarray(random_flip(jax.random.key(3), images))
    x = np.asarray(images)
    same = np.array([np.array_equal(out[i], x[i]) for i in range(200)])
    mirrored = np.array([np.array_equal(out[i], x[i, :, ::-1]) for i in range(200)])
    assert (same | mirrored).all() and 60 < mirrored.sum() < 140
    assert np.array_equal(out, np.asarray(random_flip(jax.random.key(3), images)))


def test_augment_jits_keeps_shape_and_dtype_and_is_deterministic():
    images = _images(8, 32, 32, 3)
    f = jax.jit(augment)
    a, b = f(jax.random.key(5), images), f(jax.random.key(5), images)
    assert a.shape == images.shape and a.dtype == jnp.uint8
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(f(jax.random.key(6), images)))


def test_transforms_need_a_batch_axis():
    with pytest.raises(ConfigError, match=r"\(N, H, W, C\).*images\[None\]"):
        random_crop(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ConfigError, match="padding must be a non-negative int"):
        random_crop(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), padding=-1)
