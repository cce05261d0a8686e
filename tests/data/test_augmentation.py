"""The speedrun augmentations against numpy: flips, alternating flips, reflect-padded translations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet.data
from jaxnet.data.augmentation import alternating_flip, flip, flip_bits, random_translate, reflect_crop, translate
from jaxnet.errors import ConfigError


def numbered(n: int = 5, h: int = 6, w: int = 7, c: int = 2) -> np.ndarray:
    """Every pixel of every image distinct, so each output pixel says where it came from."""
    return np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)


def numpy_translate(x: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    return np.stack([padded[i, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets)])


def test_the_module_does_not_shadow_the_augment_function():
    assert callable(jaxnet.data.augment) and jaxnet.data.augment.__module__ == "jaxnet.data.transforms"


def test_flip_mirrors_only_the_masked_images():
    x = numbered()
    mask = np.array([True, False, True, False, False])
    out = np.asarray(flip(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_array_equal(out[mask], x[mask][:, :, ::-1])
    np.testing.assert_array_equal(out[~mask], x[~mask])


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_consecutive_epochs():
    x = jnp.asarray(numbered(n=64, h=2, w=3, c=1))
    bits = flip_bits(jax.random.key(0), 64)
    assert 16 < int(bits.sum()) < 48  # about half
    run = jax.jit(alternating_flip)  # the epoch is traced: one compile for every epoch
    flipped = []
    for epoch in range(4):
        out = np.asarray(run(x, bits, epoch))
        is_flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
        np.testing.assert_array_equal(is_flipped, np.asarray(bits) ^ (epoch % 2 == 1))
        flipped.append(is_flipped)
    assert np.all(flipped[0] ^ flipped[1]) and np.array_equal(flipped[0], flipped[2])


def test_translate_matches_numpy_reflect_padding_per_image():
    x = numbered()
    offsets = np.array([[0, 0], [4, 4], [1, 3], [2, 2], [4, 0]])
    out = translate(jnp.asarray(x), jnp.asarray(offsets), 2)
    np.testing.assert_array_equal(out, numpy_translate(x, offsets, 2))
    np.testing.assert_array_equal(out[3], x[3])  # offset (pad, pad) is the identity


def test_random_translate_draws_every_offset_per_image_and_keeps_the_dtype():
    x = np.random.default_rng(0).integers(0, 256, (400, 6, 6, 1), dtype=np.uint8)
    out = np.asarray(random_translate(jax.random.key(1), jnp.asarray(x), 2))
    assert out.dtype == np.uint8 and out.shape == x.shape
    seen = set()
    for i in range(len(x)):
        matches = [
            (r, c)
            for r in range(5)
            for c in range(5)
            if np.array_equal(out[i], numpy_translate(x[i : i + 1], np.array([[r, c]]), 2)[0])
        ]
        assert matches, f"image {i} is no window of its padded self"
        seen.update(matches)
    assert seen == {(r, c) for r in range(5) for c in range(5)}
    np.testing.assert_array_equal(random_translate(jax.random.key(1), jnp.asarray(x), 0), x)


def test_reflect_crop_is_translate_with_one_offset_for_all():
    x = numbered(n=3)
    for row, col in ((0, 0), (2, 2), (1, 1), (0, 2)):
        expected = numpy_translate(x, np.array([[row, col]] * 3), 1)
        np.testing.assert_array_equal(reflect_crop(jnp.asarray(x), 1, row, col), expected)


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match=r"\(N, H, W, C\)"):
        flip(jnp.zeros((4, 4, 3)), jnp.zeros(4, bool))
    with pytest.raises(ConfigError, match="smaller than the image size"):
        translate(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2), jnp.int32), 2)
    with pytest.raises(ConfigError, match=r"\(N, 2\)"):
        translate(jnp.zeros((2, 8, 8, 1)), jnp.zeros((3, 2), jnp.int32), 2)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 2\]"):
        reflect_crop(jnp.zeros((1, 8, 8, 1)), 1, 3, 0)
    with pytest.raises(ConfigError, match="non-negative int"):
        random_translate(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), -1)
