"""Safe, atomic extraction of ``.tar.gz`` archives.

A tar member can be named ``../../.bashrc`` or ``/etc/cron.d/x``, be a link
to a file outside the target, or be a device node. :func:`safe_extract`
checks every member before writing anything, extracts with the standard
library's ``"data"`` filter as a second line of defence, and writes into a
temporary folder beside the target that is renamed into place only once
everything is out, so an interrupted extraction never leaves a half-filled
target.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import shutil
import tarfile
import tempfile

from jaxnet.data.safe_io import data_errors
from jaxnet.errors import DataError

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 4 << 30  # 4 GiB of declared content


def _inside(name: str) -> bool:
    """Whether a relative POSIX path stays inside the folder it is joined to."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in posixpath.normpath(name.replace("\\", "/")).split("/")


def check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Refuses a member that could write outside the target or is not plain data.

    Args:
      member: the tar header.
      archive: archive path, named in the error.

    Raises:
      DataError: absolute path, ``..`` component, link leaving the target,
        device file, FIFO or other special member.
    """
    where = f"{archive}: member {member.name!r}"
    if not _inside(member.name):
        raise DataError(f"{where} has an absolute path or a '..' component; refusing to extract")
    if member.issym():
        # A symlink's target is relative to the folder holding the link.
        target = posixpath.join(posixpath.dirname(member.name), member.linkname)
        if member.linkname.startswith("/") or not _inside(target):
            raise DataError(f"{where} is a symlink to {member.linkname!r}, outside the target")
    elif member.islnk():
        # A hard link's target is relative to the archive root.
        if not _inside(member.linkname):
            raise DataError(f"{where} is a hard link to {member.linkname!r}, outside the target")
    elif not (member.isreg() or member.isdir()):
        raise DataError(f"{where} is a device, FIFO or other special file; refusing to extract")


def safe_extract(
    archive: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> pathlib.Path:
    """Extracts a ``.tar``/``.tar.gz`` into a new folder ``target``, atomically.

    The safe counterpart of ``tarfile.open(archive).extractall(target)`` (and
    of ``torchvision.datasets.utils.extract_archive``). Members are checked
    first (see :func:`check_member`), then extracted into a temporary folder
    next to ``target`` with ``filter="data"``, which is renamed to ``target``
    at the end. On any error the temporary folder is removed and ``target``
    is left as it was (absent).

    Args:
      archive: the archive to read.
      target: folder to create; it must not exist yet.
      max_members: largest number of members accepted.
      max_total_bytes: largest sum of declared member sizes accepted.

    Returns:
      ``target`` as a ``pathlib.Path``.

    Raises:
      DataError: the archive is unreadable, too large, or has an unsafe member;
        or ``target`` already exists.

    >>> safe_extract("cifar-10-python.tar.gz", "cifar10")  # doctest: +SKIP
    PosixPath('cifar10')
    """
    archive, target = pathlib.Path(archive), pathlib.Path(target)
    if target.exists() or target.is_symlink():
        raise DataError(f"{target} already exists; remove it or extract {archive} elsewhere")
    target.parent.mkdir(parents=True, exist_ok=True)
    with data_errors(archive, "extracting"), tarfile.open(archive, mode="r:*") as tar:
        members, total = [], 0
        for member in tar:
            check_member(member, str(archive))
            members.append(member)
            total += max(member.size, 0)
            if len(members) > max_members or total > max_total_bytes:
                raise DataError(
                    f"{archive}: more than {max_members} members or {max_total_bytes:,} "
                    "bytes of content; refusing to extract"
                )
        partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            if hasattr(tarfile, "data_filter"):  # the extraction filters (3.12, backported)
                tar.extractall(partial, members=members, filter="data")
            else:
                tar.extractall(partial, members=members)
            partial.chmod(0o755)  # mkdtemp creates it private (0o700)
            try:
                os.rename(partial, target)  # atomic on one file system
            except OSError as e:
                raise DataError(
                    f"{target} could not be created ({e}); another process may have "
                    "extracted it meanwhile, use that copy or remove it and retry"
                ) from e
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target
