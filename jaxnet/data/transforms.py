"""Image transforms as pure JAX functions, for use inside the compiled step.

torchvision applies transforms per example on the host, in DataLoader
workers. Here they run on whole NHWC batches on the device, inside ``jit``:
randomness comes from an explicit key, each example gets its own draw, and
shapes never change, so nothing recompiles. Apply ``augment`` to the uint8
batch first and ``normalize`` last, the order of a torchvision
``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
Normalize(mean, std)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxnet.errors import ConfigError


def _check_nhwc(images: jax.Array, fn: str) -> None:
    if jnp.ndim(images) != 4:
        raise ConfigError(
            f"{fn} expects a batch of images (N, H, W, C), got shape {jnp.shape(images)}; "
            "add a batch axis with images[None]"
        )


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``ToTensor`` + ``Normalize(mean, std)``: uint8 pixels to float32.

    For uint8 input: ``x = images / 255`` then ``(x - mean) / std`` per channel
    (the last axis). Floating input is taken to be in [0, 1] already and only
    normalized, as ``Normalize`` alone does.

    Args:
      images: ``(..., C)`` uint8 (or float) images, channels last.
      mean: ``C`` per-channel means, in units of pixel/255.
      std: ``C`` per-channel standard deviations (non-zero).

    Returns:
      float32 images of the same shape.

    Raises:
      ConfigError: ``mean``/``std`` length differs from the channel count, or
        a zero std.

    >>> normalize(jnp.full((1, 1, 1, 1), 255, jnp.uint8), (0.5,), (0.5,)).item()
    1.0
    """
    channels = jnp.shape(images)[-1]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"normalize got {len(mean)} means and {len(std)} stds for {channels} channels "
            f"(images of shape {jnp.shape(images)}); give one value per channel"
        )
    if any(s == 0.0 for s in std):
        raise ConfigError(f"normalize got a zero std {std}; every std must be non-zero")
    x = jnp.asarray(images)
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0
    else:
        x = x.astype(jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """``RandomCrop(H, padding=padding)`` for each example of an NHWC batch.

    Each image is zero-padded by ``padding`` pixels on every side and an
    ``H x W`` window is cut at an offset drawn uniformly in
    ``0 .. 2 * padding`` along each axis, independently per example.

    Args:
      key: PRNG key.
      images: ``(N, H, W, C)`` images of any dtype.
      padding: pixels of zero padding per side (>= 0).

    Returns:
      The cropped batch, same shape and dtype.

    Raises:
      ConfigError: not a 4-D batch, or a negative padding.

    >>> random_crop(jax.random.key(0), jnp.ones((2, 32, 32, 3))).shape
    (2, 32, 32, 3)
    """
    _check_nhwc(images, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding must be a non-negative int, got {padding!r}")
    n, h, w, c = jnp.shape(images)
    p = padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # (N, H+2p, W+2p, C)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * p + 1)  # (N, 2): row, column
    zero = jnp.zeros((), offsets.dtype)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], zero), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """``RandomHorizontalFlip(p=0.5)`` for each example of an NHWC batch.

    Args:
      key: PRNG key.
      images: ``(N, H, W, C)`` images.

    Returns:
      The batch with each image mirrored left-right with probability 1/2.

    Raises:
      ConfigError: not a 4-D batch.

    >>> random_flip(jax.random.key(0), jnp.ones((2, 4, 4, 1))).shape
    (2, 4, 4, 1)
    """
    _check_nhwc(images, "random_flip")
    flip = jax.random.bernoulli(key, 0.5, (jnp.shape(images)[0],))  # (N,)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """The CIFAR recipe: :func:`random_crop` then :func:`random_flip`.

    Counterpart of ``Compose([RandomCrop(32, padding=4),
    RandomHorizontalFlip()])``; apply before :func:`normalize`.

    Args:
      key: PRNG key (split internally for the two draws).
      images: ``(N, H, W, C)`` images.
      padding: crop padding per side.

    Returns:
      The augmented batch, same shape and dtype.

    Raises:
      ConfigError: not a 4-D batch, or a negative padding.

    >>> augment(jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8)).dtype
    dtype('uint8')
    """
    crop_key, flip_key = jax.random.split(key)
    return random_flip(flip_key, random_crop(crop_key, images, padding))


_crop_and_flip = augment  # make_image_transform's keyword argument hides the name


def make_image_transform(
    mean: Sequence[float], std: Sequence[float], *, augment: bool = False
) -> Callable[[jax.Array, jax.Array, bool], jax.Array]:
    """A run's on-device preprocessing: ``ToTensor`` + ``Normalize`` (+ crop/flip when training).

    What ``jaxnet.fit`` builds from a data set's statistics, what the train
    and eval steps take as ``transform=`` and what an exported model carries
    inside (applied with ``train=False``).

    Args:
      mean, std: per-channel statistics in units of pixel/255.
      augment: apply :func:`augment` (random crop, padding 4, and horizontal
        flip) to training batches, the torchvision CIFAR recipe.

    Returns:
      ``transform(key, images, train) -> float32 images``; ``key`` is used only
      when ``augment`` and ``train`` are both true.

    >>> transform = make_image_transform((0.5,), (0.5,))
    >>> transform(jax.random.key(0), jnp.full((1, 2, 2, 1), 255, jnp.uint8), False).max().item()
    1.0
    """

    def transform(key: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        if augment and train:
            images = _crop_and_flip(key, images)
        return normalize(images, mean, std)

    return transform
