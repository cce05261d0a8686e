"""The airbench94 CIFAR-10 net (Jordan, arXiv 2404.00498) as a Flax NNX module, and its whitening init.

A residual-free VGG-like net that reaches 94% in under 10 epochs with the
recipe of :mod:`jaxnet.speedrun`: a 2x2 patch-whitening convolution (frozen,
initialised from the training images' patch covariance by
:func:`init_whitening`), three groups of two 3x3 convolutions with
max-pooling, BatchNorm and GELU, a global max-pool and a bias-free linear
head whose logits are scaled by 1/9. Convolutions start as PyTorch's default
with their first ``in_channels`` filters set to identity (Dirac) kernels.

Attribute names follow the PyTorch twin in :mod:`jaxnet.bench.speed_torch`
(``whiten``, ``groups.0.conv1``, ``groups.0.norm1``, ..., ``head``), so
``jaxnet.interop.to_torch_state_dict`` of this model loads into it strictly.
The parameters the recipe keeps fixed (the whitening kernel and every
BatchNorm ``scale``, which stays 1) are ordinary ``nnx.Param`` here; the
optimizer's parameter groups (:mod:`jaxnet.param_groups`) freeze them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.layers import BatchNorm2d, Conv2d, Linear, flatten, max_pool2d

__all__ = ["WIDTHS", "CifarSpeedNet", "ConvGroup", "dirac_kernel", "init_whitening", "whitening_filters"]

WIDTHS = (64, 256, 256)  # output channels of the three conv groups in the published net
WHITEN_PATCH = 2  # the whitening convolution's kernel size


def dirac_kernel(kernel: jax.Array) -> jax.Array:
    """``kernel`` with its first ``min(in_channels, out_channels)`` output filters set to identity kernels.

    Counterpart of ``torch.nn.init.dirac_(w[:w.size(1)])`` on an OIHW weight:
    filter ``i`` becomes 1 at the centre tap ``(kh // 2, kw // 2)`` of input
    channel ``i`` and 0 elsewhere; the other filters are kept.

    Args:
        kernel: ``(kh, kw, in_channels, out_channels)`` (HWIO).

    Returns:
        The new kernel, same shape and dtype.

    Raises:
        ConfigError: for a kernel that is not 4-D.

    >>> k = dirac_kernel(jnp.ones((3, 3, 2, 4)))
    >>> k[1, 1, :, :2].tolist(), float(k[0, 0, 0, 0]), float(k[0, 0, 0, 3])
    ([[1.0, 0.0], [0.0, 1.0]], 0.0, 1.0)
    """
    if kernel.ndim != 4:
        raise ConfigError(f"dirac_kernel needs an HWIO kernel (kh, kw, in, out), got shape {kernel.shape}")
    kh, kw, cin, cout = kernel.shape
    k = min(cin, cout)
    identity = jnp.zeros((kh, kw, cin, k), kernel.dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, k, dtype=kernel.dtype))
    return kernel.at[:, :, :, :k].set(identity)


def whitening_filters(
    images: np.ndarray | jax.Array, patch: int = WHITEN_PATCH, eps: float = 5e-4, *, chunk: int = 500
) -> np.ndarray:
    """Convolution filters that whiten the ``patch x patch`` patches of ``images``.

    With ``P`` the ``(n, patch*patch*C)`` matrix of every stride-1 patch of
    every image (flattened in (row, column, channel) order), ``Cov = P^T P / n``
    (not centred) and its eigendecomposition ``Cov = V diag(lam) V^T``, the
    filters are ``V[:, k] / sqrt(lam[k] + eps)`` for ``k`` in descending order
    of ``lam``, followed by their negatives: ``2 * patch*patch*C`` filters
    whose responses on those patches are uncorrelated with variance
    ``lam / (lam + eps)``. Computed in float64 on the host, ``chunk`` images at a time.

    Args:
        images: ``(N, H, W, C)`` images, normalized as the net sees them
            (airbench uses the first 5000 training images).
        patch: patch size (the convolution's kernel size).
        eps: added to each eigenvalue, so near-constant directions are not blown up.
        chunk: images per block of the covariance sum (bounds host memory).

    Returns:
        ``(patch, patch, C, 2*patch*patch*C)`` float32 HWIO kernel.

    Raises:
        ConfigError: for images that are not 4-D or smaller than the patch.

    >>> w = whitening_filters(np.random.default_rng(0).normal(size=(8, 6, 6, 3)))
    >>> w.shape
    (2, 2, 3, 24)
    """
    x = np.asarray(images)
    if x.ndim != 4 or min(x.shape[1:3]) < patch or patch < 1:
        raise ConfigError(f"whitening_filters needs (N, H, W, C) images of at least {patch}x{patch}, got {x.shape}")
    n, h, w, c = x.shape
    dim = patch * patch * c
    cov, count = np.zeros((dim, dim)), 0
    for start in range(0, n, chunk):
        xb = x[start : start + chunk].astype(np.float64)
        # (B, h', w', patch*patch, C): tap (a, b) of every patch, then flattened to (a, b, c) order.
        taps = np.stack(
            [xb[:, a : h - patch + 1 + a, b : w - patch + 1 + b, :] for a in range(patch) for b in range(patch)],
            axis=-2,
        )
        flat = taps.reshape(-1, dim)
        cov += flat.T @ flat
        count += flat.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(cov / count)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = (eigenvectors / np.sqrt(eigenvalues + eps)).reshape(patch, patch, c, dim)
    return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def init_whitening(model: CifarSpeedNet, images: np.ndarray | jax.Array, eps: float = 5e-4) -> None:
    """Sets ``model.whiten``'s kernel to :func:`whitening_filters` of ``images`` (in place).

    Counterpart of airbench's ``init_whitening_conv(model[0], train_images)``.

    Args:
        model: the net; its whitening layer must have ``2 * patch*patch*C`` filters.
        images: ``(N, H, W, C)`` normalized training images.
        eps: see :func:`whitening_filters`.

    Raises:
        ConfigError: for images whose channels do not match the layer.
    """
    layer = model.whiten
    if np.shape(images)[-1] != layer.in_channels:
        raise ConfigError(
            f"the whitening layer takes {layer.in_channels} channels, the images have shape "
            f"{np.shape(images)}; pass (N, H, W, {layer.in_channels}) images"
        )
    filters = whitening_filters(images, layer.kernel_size[0], eps)
    layer.kernel[...] = jax.device_put(jnp.asarray(filters), layer.kernel[...].sharding)


def _conv3x3(cin: int, cout: int, rngs: nnx.Rngs) -> Conv2d:
    conv = Conv2d(cin, cout, 3, padding="same", bias=False, rngs=rngs)
    conv.kernel[...] = dirac_kernel(conv.kernel[...])
    return conv


class ConvGroup(nnx.Module):
    """conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU.

    Args:
        cin, cout: input and output channels.
        momentum: BatchNorm momentum in PyTorch's convention (weight of the new batch).
        eps: BatchNorm epsilon.
        rngs: random streams for the convolutions' initialization.
    """

    def __init__(self, cin: int, cout: int, *, momentum: float, eps: float, rngs: nnx.Rngs):
        self.conv1 = _conv3x3(cin, cout, rngs)
        self.norm1 = BatchNorm2d(cout, momentum=momentum, eps=eps)
        self.conv2 = _conv3x3(cout, cout, rngs)
        self.norm2 = BatchNorm2d(cout, momentum=momentum, eps=eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, cin) -> (B, H // 2, W // 2, cout)``."""
        x = max_pool2d(self.conv1(x), 2)
        x = jax.nn.gelu(self.norm1(x), approximate=False)  # torch.nn.GELU() is the exact (erf) form
        return jax.nn.gelu(self.norm2(self.conv2(x)), approximate=False)


class CifarSpeedNet(nnx.Module):
    """airbench94's net for ``(B, 32, 32, 3)`` normalized images; returns ``(B, 10)`` logits.

    whiten conv 2x2 (3 -> 24, valid, bias), GELU, three :class:`ConvGroup`
    (31 -> 15 -> 7 -> 3 pixels), max-pool 3 (-> 1x1), flatten, Linear(w3, 10,
    no bias), times ``logit_scale``.

    Args:
        widths: output channels of the three groups; the published net's
            ``(64, 256, 256)``, smaller for tests and smoke runs.
        batchnorm_momentum: PyTorch's convention; airbench's "0.6" is ``1 - 0.6 = 0.4`` here.
        eps: BatchNorm epsilon (airbench: 1e-12).
        logit_scale: multiplies the logits (airbench: 1/9).
        num_classes: outputs of the head.
        rngs: random streams for parameter initialization.

    Raises:
        ConfigError: unless ``widths`` is three positive ints.

    >>> CifarSpeedNet(widths=(8, 16, 16), rngs=nnx.Rngs(0))(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    """

    torch_flatten_inputs: ClassVar[Mapping[str, tuple[int, int, int]]] = MappingProxyType({})  # 1x1 maps

    def __init__(
        self,
        *,
        widths: Sequence[int] = WIDTHS,
        batchnorm_momentum: float = 0.4,
        eps: float = 1e-12,
        logit_scale: float = 1 / 9,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        widths = tuple(widths)
        if len(widths) != 3 or not all(isinstance(w, (int, np.integer)) and w > 0 for w in widths):
            raise ConfigError(f"widths must be three positive ints (one per conv group), e.g. {WIDTHS}; got {widths}")
        whiten_width = 2 * 3 * WHITEN_PATCH**2
        self.whiten = Conv2d(3, whiten_width, WHITEN_PATCH, padding=0, bias=True, rngs=rngs)
        self.whiten.kernel[...] = dirac_kernel(self.whiten.kernel[...])  # replaced by init_whitening
        self.whiten.bias = nnx.Param(jnp.zeros((whiten_width,), jnp.float32))
        channels = (whiten_width, *widths)
        self.groups = nnx.List(
            [
                ConvGroup(cin, cout, momentum=batchnorm_momentum, eps=eps, rngs=rngs)
                for cin, cout in zip(channels[:-1], channels[1:])
            ]
        )
        self.head = Linear(widths[-1], num_classes, bias=False, rngs=rngs)
        self.logit_scale = float(logit_scale)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Maps ``(B, 32, 32, 3)`` images to ``(B, num_classes)`` logits; ``rngs`` is unused (no dropout)."""
        del rngs
        x = jax.nn.gelu(self.whiten(x), approximate=False)  # (B, 31, 31, 24)
        for group in self.groups:
            x = group(x)  # (B, 15, 15, w1), (B, 7, 7, w2), (B, 3, 3, w3)
        x = flatten(max_pool2d(x, 3))  # (B, w3)
        return self.head(x) * jnp.asarray(self.logit_scale, x.dtype)
