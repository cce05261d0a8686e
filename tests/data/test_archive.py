"""Tests for jaxnet.data.archive.safe_extract: unsafe members refused, atomic result."""

from __future__ import annotations

import tarfile

import pytest

from jaxnet.data import safe_extract
from jaxnet.errors import DataError
from tests.data.builders import tar_gz


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_extracts_files_dirs_and_inner_links(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(
        tar_gz(
            {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"},
            extra=[_link("top/sub/to_a", "../a.txt"), _link("top/hard_b", "top/sub/b.txt", tarfile.LNKTYPE)],
        )
    )
    out = safe_extract(archive, tmp_path / "out")
    assert out == tmp_path / "out"
    assert (out / "top/a.txt").read_bytes() == b"alpha"
    assert (out / "top/sub/to_a").read_bytes() == b"alpha"  # relative link kept inside
    assert (out / "top/hard_b").read_bytes() == b"beta"
    assert _tree(tmp_path) == sorted(["a.tar.gz", "out", *(f"out/{p}" for p in _tree(out))])


@pytest.mark.parametrize(
    "members, extra, message",
    [
        ({"ok": b"1", "../escape": b"x"}, [], r"'\.\./escape' has an absolute path or a '\.\.'"),
        ({"ok": b"1", "a/../../escape": b"x"}, [], "absolute path or a '..'"),
        ({"/tmp/jaxnet_abs_escape": b"x"}, [], "absolute path"),
        ({"ok": b"1"}, [_link("evil", "/etc/passwd")], "symlink to '/etc/passwd', outside"),
        ({"ok": b"1"}, [_link("d/evil", "../../x")], r"symlink to '\.\./\.\./x', outside"),
        ({"ok": b"1"}, [_link("evil", "../x", tarfile.LNKTYPE)], "hard link to '../x', outside"),
    ],
)
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, members, extra, message):
    work = tmp_path / "work"
    work.mkdir()
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(members, extra=extra))
    with pytest.raises(DataError, match=message):
        safe_extract(archive, work / "target")
    assert _tree(tmp_path) == ["bad.tar.gz", "work"]  # no target, no temp folder, no escape


def test_device_file_is_refused(tmp_path):
    dev = tarfile.TarInfo("null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    archive = tmp_path / "dev.tar.gz"
    archive.write_bytes(tar_gz({"ok": b"1"}, extra=[dev]))
    with pytest.raises(DataError, match="'null' is a device, FIFO or other special file"):
        safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_existing_target_is_refused(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"a": b"1"}))
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match="already exists"):
        safe_extract(archive, tmp_path / "t")


def test_interrupted_extraction_leaves_no_target(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({f"f{i}": b"x" * 100 for i in range(5)}))
    real = tarfile.TarFile._extract_member
    calls = []

    def fail_on_third(self, tarinfo, *args, **kwargs):
        calls.append(tarinfo.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-extraction
        return real(self, tarinfo, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "_extract_member", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(archive, tmp_path / "t")
    assert len(calls) == 3 and _tree(tmp_path) == ["a.tar.gz"]


def test_corrupt_archive_is_a_data_error(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"a": b"1"})[:20])
    with pytest.raises(DataError, match=r"a\.tar\.gz: extracting failed"):
        safe_extract(archive, tmp_path / "t")
    assert _tree(tmp_path) == ["a.tar.gz"]


def test_member_count_cap(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({f"f{i}": b"" for i in range(5)}))
    with pytest.raises(DataError, match="more than 3 members"):
        safe_extract(archive, tmp_path / "t", max_members=3)
