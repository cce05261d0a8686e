"""Batch augmentation of the CIFAR-10 speedruns: reflect-padded translation and alternating flips.

Pure, jit-able functions of NHWC batches (any dtype, so uint8 pixels can be
augmented before :func:`jaxnet.data.transforms.normalize`, which commutes
with them). Randomness is explicit: a key, or per-image draws made once
(:func:`flip_bits`), so the PyTorch twin in :mod:`jaxnet.bench.speed_torch`
can be fed the very same offsets and bits.

The alternating flip (Jordan, arXiv 2404.00498, section 3.6) mirrors a
random half of the images in epoch 0 and, in every later epoch, exactly the
images that were not mirrored in the epoch before, so consecutive epochs
always see both orientations of each image. (This module is not named
``augment``: that is the name of :func:`jaxnet.data.augment`, which a
submodule of the same name would shadow.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnet.errors import ConfigError

__all__ = ["alternating_flip", "flip", "flip_bits", "random_translate", "reflect_crop", "translate"]


def _check_batch(images: jax.Array, fn: str) -> None:
    if jnp.ndim(images) != 4:
        raise ConfigError(
            f"{fn} expects a batch of images (N, H, W, C), got shape {jnp.shape(images)}; "
            "add a batch axis with images[None]"
        )


def _check_pad(pad: int, images: jax.Array, fn: str) -> None:
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"{fn} pad must be a non-negative int, got {pad!r}")
    if pad >= min(jnp.shape(images)[1:3]):
        raise ConfigError(
            f"{fn} pad {pad} must be smaller than the image size {jnp.shape(images)[1:3]} "
            "(reflection padding repeats no edge pixel)"
        )


def flip(images: jax.Array, mask: jax.Array) -> jax.Array:
    """Mirrors left-right the images whose ``mask`` entry is true.

    Args:
        images: ``(N, H, W, C)``.
        mask: ``(N,)`` bool.

    Returns:
        The batch, same shape and dtype.

    Raises:
        ConfigError: for a batch that is not 4-D.

    >>> flip(jnp.arange(4.0).reshape(2, 1, 2, 1), jnp.array([True, False]))[:, 0, :, 0].tolist()
    [[1.0, 0.0], [2.0, 3.0]]
    """
    _check_batch(images, "flip")
    return jnp.where(jnp.asarray(mask, bool)[:, None, None, None], images[:, :, ::-1, :], images)


def flip_bits(key: jax.Array, num_images: int) -> jax.Array:
    """One fair coin per image, drawn once per run: ``(num_images,)`` bool, for :func:`alternating_flip`."""
    return jax.random.bernoulli(key, 0.5, (num_images,))


def alternating_flip(images: jax.Array, bits: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """The alternating flip of epoch ``epoch``: image ``i`` is mirrored iff ``bits[i] XOR (epoch odd)``.

    Epoch 0 mirrors the images whose bit is set (a random half); each later
    epoch mirrors exactly those the epoch before did not.

    Args:
        images: ``(N, H, W, C)``.
        bits: ``(N,)`` bool, from :func:`flip_bits` (the same array every epoch).
        epoch: epoch number, a Python int or a traced integer.

    Returns:
        The batch, same shape and dtype.

    Raises:
        ConfigError: for a batch that is not 4-D.

    >>> x, bits = jnp.arange(4.0).reshape(2, 1, 2, 1), jnp.array([True, False])
    >>> alternating_flip(x, bits, 1)[:, 0, :, 0].tolist()
    [[0.0, 1.0], [3.0, 2.0]]
    """
    return flip(images, jnp.logical_xor(jnp.asarray(bits, bool), jnp.asarray(epoch) % 2 == 1))


def reflect_crop(images: jax.Array, pad: int, row: int, col: int) -> jax.Array:
    """The ``H x W`` window at ``(row, col)`` of the images reflect-padded by ``pad`` (one offset for all).

    ``(row, col) = (pad, pad)`` is the identity; ``(0, 0)`` shifts the
    content down-right by ``pad``. Padding is ``reflect`` (the edge pixel is
    not repeated), as ``torch.nn.functional.pad(x, (pad,) * 4, "reflect")``.

    Args:
        images: ``(N, H, W, C)``.
        pad: pixels of reflection padding per side.
        row, col: the window's top-left corner in the padded image, in ``[0, 2 * pad]``.

    Returns:
        The shifted batch, same shape and dtype.

    Raises:
        ConfigError: for a batch that is not 4-D, a bad ``pad`` or an offset outside ``[0, 2 * pad]``.

    >>> reflect_crop(jnp.arange(9.0).reshape(1, 3, 3, 1), 1, 0, 0)[0, :, :, 0].tolist()
    [[4.0, 3.0, 4.0], [1.0, 0.0, 1.0], [4.0, 3.0, 4.0]]
    """
    _check_batch(images, "reflect_crop")
    _check_pad(pad, images, "reflect_crop")
    if not (0 <= row <= 2 * pad and 0 <= col <= 2 * pad):
        raise ConfigError(f"reflect_crop offset ({row}, {col}) must lie in [0, {2 * pad}] (twice the pad)")
    _, h, w, _ = jnp.shape(images)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[:, row : row + h, col : col + w, :]


def translate(images: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    """Per-image translation: image ``i`` becomes the window at ``offsets[i]`` of its reflect-padded self.

    Args:
        images: ``(N, H, W, C)``.
        offsets: ``(N, 2)`` integer (row, column) corners in ``[0, 2 * pad]``
            (values outside are clamped, as ``lax.dynamic_slice`` does).
        pad: pixels of reflection padding per side.

    Returns:
        The translated batch, same shape and dtype.

    Raises:
        ConfigError: for a batch that is not 4-D, a bad ``pad`` or ``offsets`` of the wrong shape.
    """
    _check_batch(images, "translate")
    _check_pad(pad, images, "translate")
    n, h, w, c = jnp.shape(images)
    if jnp.shape(offsets) != (n, 2):
        raise ConfigError(f"translate needs (N, 2) = {(n, 2)} offsets, got shape {jnp.shape(offsets)}")
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")  # (N, H+2p, W+2p, C)
    offsets = jnp.asarray(offsets, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], zero), (h, w, c)))(padded, offsets)


def random_translate(key: jax.Array, images: jax.Array, pad: int = 2) -> jax.Array:
    """Random translation by up to ``pad`` pixels per axis, reflect-padded, drawn per image.

    :func:`translate` with offsets uniform in ``0 .. 2 * pad``, rows and
    columns independently (airbench's ``batch_crop`` of the padded images).

    Args:
        key: PRNG key.
        images: ``(N, H, W, C)``.
        pad: the largest shift, in pixels.

    Returns:
        The translated batch, same shape and dtype.

    Raises:
        ConfigError: for a batch that is not 4-D or a bad ``pad``.

    >>> random_translate(jax.random.key(0), jnp.ones((2, 32, 32, 3), jnp.uint8)).shape
    (2, 32, 32, 3)
    """
    _check_batch(images, "random_translate")
    offsets = jax.random.randint(key, (jnp.shape(images)[0], 2), 0, 2 * pad + 1)
    return translate(images, offsets, pad)
