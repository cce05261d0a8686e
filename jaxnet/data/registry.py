"""``load_dataset``: one name in, an :class:`ArrayDataset` out.

Where the files come from, in order:

1. ``data_dir`` (or ``$JAXNET_DATA_DIR``): files must be in ``DIR/mnist/`` or
   ``DIR/cifar10/``, the official names; nothing is downloaded.
2. The cache, ``$XDG_CACHE_HOME/jaxnet`` or ``~/.cache/jaxnet``, same layout.
3. A checksummed download into the cache (``download=True``).
4. For MNIST only: the embedded sample (6,000 train / 1,000 test images of
   the official set, shipped inside the package), with a logged notice.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
import pathlib
from collections.abc import Sequence

from jaxnet.data import cifar, mnist
from jaxnet.data.dataset import ArrayDataset
from jaxnet.data.download import CIFAR10_RESOURCES, MNIST_RESOURCES, Resource, fetch_resources
from jaxnet.errors import ConfigError, DataError

logger = logging.getLogger("jaxnet.data")

DATASETS = ("mnist", "cifar10", "linear")  # plus any "tfds:NAME"
TFDS_PREFIX = "tfds:"
DATA_DIR_ENV = "JAXNET_DATA_DIR"
OFFICIAL_RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": MNIST_RESOURCES,
    "cifar10": CIFAR10_RESOURCES,
}


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/jaxnet``, or ``~/.cache/jaxnet`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxnet"


def _expected_files(name: str) -> str:
    if name == "mnist":
        return ", ".join(mnist.mnist_file_names())
    return f"{cifar.CIFAR10_ARCHIVE} (or its extracted {cifar.CIFAR10_FOLDER}/)"


def _has_files(name: str, folder: pathlib.Path) -> bool:
    if name == "mnist":
        return folder.is_dir() and not mnist.missing_mnist_files(folder)
    return folder.is_dir() and cifar.locate_cifar10(folder) is not None


def _read(name: str, folder: pathlib.Path) -> ArrayDataset:
    return mnist.read_mnist(folder) if name == "mnist" else cifar.read_cifar10(folder)


def load_embedded_mnist_sample() -> ArrayDataset:
    """The MNIST sample shipped in ``jaxnet/data/sample`` (first 6,000 / 1,000 images).

    Returns:
      An :class:`ArrayDataset` whose ``source`` says it is the sample.

    Raises:
      DataError: the package was installed without its sample files.
    """
    with importlib.resources.as_file(importlib.resources.files("jaxnet.data") / "sample") as folder:
        ds = mnist.read_mnist(folder)
    return dataclasses.replace(
        ds,
        source=(f"embedded MNIST sample: {ds.num_train} train / {ds.num_test} test images from the official MNIST set"),
    )


def load_official(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str],
    download: bool,
    resources: Sequence[Resource] | None = None,
    allow_http: bool = False,
) -> ArrayDataset:
    """Resolves and reads ``"mnist"`` or ``"cifar10"`` (see the module docstring).

    Args:
      name: ``"mnist"`` or ``"cifar10"``.
      data_dir: explicit data folder (files in ``data_dir/name/``), or None.
      cache_dir: cache folder (files in ``cache_dir/name/``).
      download: allow downloading into the cache.
      resources: the files and checksums to download; the official table
        when None (tests pass their own, served from 127.0.0.1).
      allow_http: accept plain-HTTP URLs in ``resources``.

    Returns:
      The data set; ``source`` names the files read, or the embedded sample.

    Raises:
      DataError: files missing from ``data_dir``, corrupt files, or (CIFAR-10)
        nothing cached and the download failed.
    """
    if data_dir is not None:
        folder = pathlib.Path(data_dir) / name
        if not _has_files(name, folder):
            missing = mnist.missing_mnist_files(folder) if name == "mnist" and folder.is_dir() else None
            raise DataError(
                f"no {name} files in {folder}: expected {_expected_files(name)}"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + ". Put the official files there, or omit --data-dir (and unset "
                f"{DATA_DIR_ENV}) to download them into the cache {default_cache_dir()}"
            )
        return _read(name, folder)
    folder = pathlib.Path(cache_dir) / name
    if _has_files(name, folder):
        return _read_cached(name, folder)
    reason = "downloading is off (--no-download / download=False)"
    if download:
        try:
            fetch_resources(resources or OFFICIAL_RESOURCES[name], folder, allow_http=allow_http)
            return _read_cached(name, folder)
        except DataError as e:
            reason = str(e)
    fix = (
        f"connect to the internet and rerun without --no-download (download=True in Python; the files are cached in "
        f"{folder}), or put {_expected_files(name)} in DIR/{name}/ and pass --data-dir DIR"
    )
    if name != "mnist":
        raise DataError(f"{name} is not available ({reason}). To get it, {fix}")
    sample = load_embedded_mnist_sample()
    logger.warning(
        "Using the embedded MNIST sample (%d train / %d test images), not the full set: %s. "
        "For the full 60,000 / 10,000: %s.",
        sample.num_train,
        sample.num_test,
        reason,
        fix,
    )
    return sample


def _read_cached(name: str, folder: pathlib.Path) -> ArrayDataset:
    try:
        return _read(name, folder)
    except DataError as e:
        raise DataError(f"{e} (cached copy: delete {folder} to download it again)") from e


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ArrayDataset:
    """Loads a data set by name: ``"mnist"``, ``"cifar10"``, ``"linear"`` or ``"tfds:NAME"``.

    Counterpart of ``torchvision.datasets.MNIST(root, download=True)`` and
    ``CIFAR10(...)`` for both splits at once. Files are taken from
    ``data_dir`` (or ``$JAXNET_DATA_DIR``), else the user cache, else
    downloaded over HTTPS with checksums; offline, MNIST falls back to an
    embedded 6,000 / 1,000-image sample and logs a warning on the
    ``jaxnet.data`` logger. ``"linear"`` is the autograd tutorial's generated
    regression set; ``"tfds:NAME"`` goes to :func:`jaxnet.data.tfds.load_tfds`.

    Args:
      name: data set name.
      data_dir: folder holding ``mnist/`` and ``cifar10/`` in the official
        formats (for ``tfds:`` names: the tensorflow-datasets data dir).
      download: allow downloading missing files.

    Returns:
      The data set: uint8 NHWC images, int32 labels, the tutorials'
      normalization constants, and a ``source`` naming what was read.

    Raises:
      ConfigError: unknown name (the valid names are listed).
      DataError: missing or corrupt files (named), or CIFAR-10 unavailable.

    >>> ds = load_dataset("mnist")  # doctest: +SKIP
    >>> ds.train_images.shape, ds.mean  # doctest: +SKIP
    ((60000, 28, 28, 1), (0.1307,))
    """
    if isinstance(name, str) and name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
        from jaxnet.data.tfds import load_tfds  # lazy: pulls in tensorflow-datasets

        return load_tfds(name[len(TFDS_PREFIX) :], data_dir=data_dir, download=download)
    if name not in DATASETS:
        raise ConfigError(
            f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}, or "
            f"{TFDS_PREFIX}NAME for a tensorflow-datasets set (e.g. tfds:fashion_mnist)"
        )
    if name == "linear":
        from jaxnet.data.synthetic import make_linear_regression

        return make_linear_regression()
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return load_official(name, data_dir=data_dir, cache_dir=default_cache_dir(), download=download)
