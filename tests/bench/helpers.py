"""What the bench tests share: ``jaxnet bench ARGV`` run in this process, its output captured."""

from __future__ import annotations

import contextlib
import io

from jaxnet.cli import bench as cli


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``jaxnet`` with ``argv`` (e.g. ``["bench", "--quick"]``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()
