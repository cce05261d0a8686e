"""What the command-line tests share: running ``main`` in-process and reading its one-line errors."""

from __future__ import annotations

import json

from jaxnet.cli import main

COMMON = ["--no-download", "--no-progress", "--json"]  # offline, quiet, a JSON summary


def run_main(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """``jaxnet ARGV`` in this process: ``(exit status, the --json summary or None, stderr)``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else None), err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """The one ``jaxnet: error:`` line of a failed command (status 2, no traceback), holding every needle."""
    lines = [line for line in err.strip().splitlines() if line.startswith("jaxnet: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
