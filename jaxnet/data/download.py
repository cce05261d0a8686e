"""Checksummed downloads of the official data files, over HTTPS.

A file is streamed into a temporary file in the destination folder while its
SHA-256 and MD5 are computed; only when the size cap held and the checksums
match is it moved into place with ``os.replace``, so a partial or tampered
download never takes the real file's name.

The checksum tables below are the official ones: MNIST's SHA-256 and sizes
as listed in tensorflow-datasets' ``url_checksums/mnist.txt`` and its MD5 as
in torchvision's ``MNIST.resources``; CIFAR-10's MD5 from its home page (as
in torchvision) and SHA-256 as pinned by Keras' ``cifar10.load_data``. Both
digests are verified when both are known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, BinaryIO

from jaxnet.errors import ConfigError, DataError

DEFAULT_TIMEOUT_S = 10.0  # connect and per-read socket timeout
DNS_TIMEOUT_S = 5.0  # name lookup is not covered by the socket timeout
DEFAULT_MAX_BYTES = 512 * 2**20  # CIFAR-10's archive is 170 MB
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Resource:
    """One official file: its name, mirrors (tried in order) and checksums."""

    filename: str  # name in the destination folder
    urls: tuple[str, ...]  # mirrors, tried in order
    sha256: str | None  # hex digest, verified when given
    md5: str | None  # hex digest, verified when given
    size: int | None = None  # bytes, if known


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def _mnist(filename: str, sha256: str, md5: str, size: int) -> Resource:
    return Resource(filename, tuple(m + filename for m in _MNIST_MIRRORS), sha256, md5, size)


MNIST_RESOURCES: tuple[Resource, ...] = (
    _mnist(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        9912422,
    ),
    _mnist(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "d53e105ee54ea40749a09fcbcd1e9432",
        28881,
    ),
    _mnist(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "9fb629c4189551a2d022fa330f9573f3",
        1648877,
    ),
    _mnist(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ec29112dd5afa0611ce80d1b7f02629c",
        4542,
    ),
)

CIFAR10_RESOURCES: tuple[Resource, ...] = (
    Resource(
        "cifar-10-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "c58f30108f718f92721af3b95e74349a",
        170498071,
    ),
)


class _RefuseDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from HTTPS to plain HTTP (unless allowed)."""

    def __init__(self, allow_http: bool) -> None:
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        _check_scheme(newurl, self.allow_http)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_scheme(url: str, allow_http: bool) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and allow_http):
        return parts
    if parts.scheme == "http":
        raise DataError(
            f"{url}: refusing plain HTTP; use the https:// URL, or pass allow_http=True for a trusted local server"
        )
    raise DataError(
        f"{url}: unsupported URL scheme {parts.scheme!r}; only https:// (and http:// "
        "with allow_http=True) can be downloaded"
    )


def _resolves(host: str, port: int, timeout: float) -> bool:
    """Whether ``host`` resolves within ``timeout`` s (offline machines can hang here)."""
    done, found = threading.Event(), []

    def lookup() -> None:
        try:
            found.append(bool(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError:  # socket.gaierror: unknown host, no network
            found.append(False)
        finally:
            done.set()

    threading.Thread(target=lookup, daemon=True).start()
    return done.wait(timeout) and found == [True]


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    md5: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_http: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> pathlib.Path:
    """Downloads ``url`` to ``dest``, verifying its checksum before it lands.

    Counterpart of ``torchvision.datasets.utils.download_url`` (which checks
    MD5 only). The body is streamed to a temporary file in ``dest``'s folder;
    if it grows past ``max_bytes`` or a digest differs, the temporary file is
    deleted and ``dest`` is untouched; otherwise it is renamed to ``dest``.

    Args:
      url: an ``https://`` URL (``http://`` only with ``allow_http=True``).
      dest: path of the file to create or replace.
      sha256: expected SHA-256 hex digest.
      md5: expected MD5 hex digest; at least one of the two is required.
      max_bytes: largest body accepted.
      allow_http: accept plain HTTP (tests against 127.0.0.1 use it).
      timeout: socket timeout in seconds for connecting and for each read.

    Returns:
      ``dest`` as a ``pathlib.Path``.

    Raises:
      ConfigError: no checksum was given.
      DataError: refused scheme, network or HTTP error, size cap exceeded, or
        checksum mismatch (URL, expected and actual digests are named).

    >>> download("https://example.org/f.gz", "f.gz", sha256="ab12...")  # doctest: +SKIP
    """
    if not sha256 and not md5:
        raise ConfigError(f"download({url!r}) needs sha256= or md5= to verify the file")
    parts = _check_scheme(url, allow_http)
    dest = pathlib.Path(dest)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    no_proxy = not urllib.request.getproxies().get(parts.scheme)
    if no_proxy and not _resolves(parts.hostname or "", port, DNS_TIMEOUT_S):
        raise DataError(f"{url}: cannot resolve {parts.hostname} (offline?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digests = _fetch(url, out, max_bytes, allow_http, timeout)
            out.flush()
            os.fsync(out.fileno())
        for name, expected in (("sha256", sha256), ("md5", md5)):
            actual = digests[name].hexdigest()
            if expected and actual != expected.lower():
                raise DataError(
                    f"{url}: {name.upper()} mismatch: expected {expected}, got {actual}; "
                    "the partial download was deleted. Retry later, or fetch the file "
                    f"by hand and put it at {dest}"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _fetch(url: str, out: BinaryIO, max_bytes: int, allow_http: bool, timeout: float) -> dict[str, Any]:
    """Streams ``url`` into ``out``; returns the running sha256/md5 hash objects."""
    opener = urllib.request.build_opener(_RefuseDowngrade(allow_http))
    request = urllib.request.Request(url, headers={"User-Agent": "jaxnet-data/0.1"})
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    total = 0
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise DataError(f"{url}: server announces {int(declared):,} bytes, over the {max_bytes:,}-byte limit")
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise DataError(f"{url}: body exceeds the {max_bytes:,}-byte limit")
                out.write(chunk)
                for h in digests.values():
                    h.update(chunk)
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"{url}: cannot connect ({e.reason})") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, short bodies
        raise DataError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    return digests


def fetch_resources(
    resources: Sequence[Resource],
    folder: str | os.PathLike[str],
    *,
    allow_http: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[pathlib.Path]:
    """Downloads every resource missing from ``folder``, trying mirrors in order.

    Files already in ``folder`` are kept as they are. The first resource that
    fails on every mirror stops the whole fetch (when one file cannot be
    reached, offline, the rest would fail the same way).

    Args:
      resources: what to fetch, e.g. :data:`MNIST_RESOURCES` (a test passes
        its own table).
      folder: destination folder, created if needed.
      allow_http: accept plain-HTTP mirrors.
      timeout: socket timeout per connection and read, seconds.
      max_bytes: size cap per file.

    Returns:
      The paths of all resources, in order.

    Raises:
      DataError: a resource failed on every mirror (each mirror's error is given).
    """
    folder = pathlib.Path(folder)
    paths = []
    for res in resources:
        path = folder / res.filename
        if not path.is_file():
            errors = []
            for url in res.urls:
                try:
                    download(
                        url,
                        path,
                        sha256=res.sha256,
                        md5=res.md5,
                        max_bytes=max_bytes,
                        allow_http=allow_http,
                        timeout=timeout,
                    )
                    break
                except DataError as e:
                    errors.append(str(e))
            else:
                raise DataError(f"could not download {res.filename}: " + " | ".join(errors))
        paths.append(path)
    return paths
