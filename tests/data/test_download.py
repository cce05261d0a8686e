"""Tests for jaxnet.data.download and the download path of load_dataset.

A local ``http.server`` on 127.0.0.1 (ephemeral port, in a thread) serves
files the tests generate; the checksum table is passed in, so nothing here
touches the network.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
import time

import numpy as np
import pytest

from jaxnet.data import download
from jaxnet.data.download import Resource, fetch_resources
from jaxnet.data.mnist import MNIST_FILES
from jaxnet.data.registry import load_official
from jaxnet.errors import ConfigError, DataError
from tests.data.builders import gz, idx_bytes, make_mnist_arrays


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect"))
            self.end_headers()
            return
        chunked = self.path.startswith("/nolength/")
        body = self.files.get(self.path.removeprefix("/nolength"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        if not chunked:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if chunked:  # HTTP/1.0: the end of the body is the end of the connection
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """Serves ``server.files`` (path -> bytes); yields an object with ``url(path)``."""
    handler = type("Handler", (_Handler,), {"files": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()

    class Server:
        files = handler.files

        @staticmethod
        def url(path):
            return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    yield Server
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url(path="/x"):
    with socket.socket() as s:  # bind then close: nothing listens on this port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_download_success_with_sha256_and_md5(server, tmp_path):
    body = gz(idx_bytes(make_mnist_arrays(3)[1]))
    server.files["/f.gz"] = body
    dest = download(
        server.url("/f.gz"),
        tmp_path / "d" / "f.gz",
        sha256=_sha(body),
        md5=hashlib.md5(body).hexdigest(),
        allow_http=True,
    )
    assert dest.read_bytes() == body
    assert [p.name for p in dest.parent.iterdir()] == ["f.gz"]  # no temp file left


def test_download_without_content_length_and_through_redirect(server, tmp_path):
    body = b"z" * 3_000_000
    server.files["/big"] = body
    for path in ("/nolength/big", "/redirect/big"):
        dest = download(server.url(path), tmp_path / "big", sha256=_sha(body), allow_http=True)
        assert dest.read_bytes() == body


def test_checksum_mismatch_deletes_the_file_and_names_url_and_hashes(server, tmp_path):
    body = b"tampered"
    server.files["/f.gz"] = body
    url, wanted = server.url("/f.gz"), "0" * 64
    with pytest.raises(DataError) as info:
        download(url, tmp_path / "f.gz", sha256=wanted, allow_http=True)
    assert f"{url}: SHA256 mismatch: expected {wanted}, got {_sha(body)}" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_size_cap_with_and_without_content_length(server, tmp_path):
    server.files["/big"] = b"x" * 5000
    with pytest.raises(DataError, match="announces 5,000 bytes, over the 1,000-byte limit"):
        download(server.url("/big"), tmp_path / "b", sha256="0" * 64, max_bytes=1000, allow_http=True)
    with pytest.raises(DataError, match="body exceeds the 1,000-byte limit"):
        download(server.url("/nolength/big"), tmp_path / "b", sha256="0" * 64, max_bytes=1000, allow_http=True)
    assert list(tmp_path.iterdir()) == []


def test_http_404(server, tmp_path):
    with pytest.raises(DataError, match=r"/missing\.gz: HTTP 404"):
        download(server.url("/missing.gz"), tmp_path / "m", md5="0" * 32, allow_http=True)
    assert list(tmp_path.iterdir()) == []


def test_plain_http_and_other_schemes_are_refused_by_default(server, tmp_path):
    server.files["/f"] = b"data"
    with pytest.raises(DataError, match="refusing plain HTTP.*allow_http=True"):
        download(server.url("/f"), tmp_path / "f", sha256=_sha(b"data"))
    with pytest.raises(DataError, match="unsupported URL scheme 'file'"):
        download("file:///etc/passwd", tmp_path / "f", sha256="0" * 64, allow_http=True)
    with pytest.raises(ConfigError, match="needs sha256= or md5="):
        download(server.url("/f"), tmp_path / "f", allow_http=True)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot connect"):
        download(_closed_port_url(), tmp_path / "f", sha256="0" * 64, allow_http=True)
    assert time.perf_counter() - start < 2.0


def test_fetch_resources_falls_back_to_the_next_mirror(server, tmp_path):
    body = b"payload"
    server.files["/m2/f"] = body
    res = Resource("f", (server.url("/m1/f"), server.url("/m2/f")), _sha(body), None)
    assert fetch_resources([res], tmp_path, allow_http=True) == [tmp_path / "f"]
    assert (tmp_path / "f").read_bytes() == body
    bad = Resource("g", (server.url("/m1/g"), _closed_port_url()), _sha(body), None)
    with pytest.raises(DataError, match=r"could not download g: .*HTTP 404.* \| .*cannot connect"):
        fetch_resources([bad], tmp_path, allow_http=True)


def _mnist_resources(server, n_train=12, n_test=6):
    """Serves a tiny MNIST and returns its checksum table."""
    table = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = make_mnist_arrays(n, seed=n)
        for stem, array in zip(MNIST_FILES[split], (images, labels)):
            body = gz(idx_bytes(array))
            server.files[f"/mnist/{stem}.gz"] = body
            table.append(Resource(f"{stem}.gz", (server.url(f"/mnist/{stem}.gz"),), _sha(body), None))
    return table


def test_load_official_downloads_into_the_cache_then_reuses_it(server, tmp_path):
    table = _mnist_resources(server)
    ds = load_official("mnist", data_dir=None, cache_dir=tmp_path, download=True, resources=table, allow_http=True)
    assert ds.num_train == 12 and ds.num_test == 6
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in ds.source
    server.files.clear()  # second load must not need the server
    again = load_official("mnist", data_dir=None, cache_dir=tmp_path, download=True, resources=table, allow_http=True)
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_offline_mnist_falls_back_to_the_sample_quickly_with_a_notice(tmp_path, caplog):
    table = [Resource(f"{s}.gz", (_closed_port_url(),), "0" * 64, None) for p in MNIST_FILES.values() for s in p]
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="jaxnet.data"):
        ds = load_official("mnist", data_dir=None, cache_dir=tmp_path, download=True, resources=table, allow_http=True)
    assert time.perf_counter() - start < 5.0
    assert ds.source.startswith("embedded MNIST sample: 6000 train / 1000 test")
    notice = [r.getMessage() for r in caplog.records if r.name == "jaxnet.data"]
    assert len(notice) == 1 and "\n" not in notice[0]
    assert "Using the embedded MNIST sample" in notice[0] and "--data-dir" in notice[0]
    assert list((tmp_path / "mnist").iterdir()) == []  # no partial download left


def test_offline_cifar10_raises_with_the_fix(tmp_path):
    table = [Resource("cifar-10-python.tar.gz", (_closed_port_url(),), "0" * 64, None)]
    with pytest.raises(DataError, match=r"cifar10 is not available .*cannot connect.*--data-dir DIR"):
        load_official("cifar10", data_dir=None, cache_dir=tmp_path, download=True, resources=table, allow_http=True)


def test_corrupt_cache_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for pair in MNIST_FILES.values():
        for stem in pair:
            (folder / f"{stem}.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*delete .*mnist to download it again"):
        load_official("mnist", data_dir=None, cache_dir=tmp_path, download=False)
