"""``jaxnet launch`` (jaxnet.cli.launch): its parser, and the old names of the launcher module."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from jaxnet.cli import build_parser
from jaxnet.cli import launch as cli_launch
from jaxnet.parallel import launcher


def test_register_cli_parses_the_command_after_the_separator():
    parser = build_parser(("launch",))
    args = parser.parse_args(["launch", "--nproc", "2", "--devices-per-proc", "4", "--", "train", "--model", "mlp"])
    assert (args.nproc, args.devices_per_proc, args.func) == (2, 4, cli_launch.run_launch)
    assert launcher.child_command(args.command)[1:] == ["-m", "jaxnet", "train", "--model", "mlp"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "0"], "argument --nproc: expected a positive integer, got 0"),
        (["--nproc", "2", "--devices-per-proc", "none"], "expected a positive integer, got 'none'"),
        (["--nproc", "2", "--port", "99999"], "expected a port number in [1, 65535], got 99999"),
        (["--nproc", "2", "--timeout", "-5"], "expected a finite number >= 0, got -5"),
    ],
)
def test_bad_counts_are_usage_errors(argv, message):
    err = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err):
        build_parser(("launch",)).parse_args(["launch", *argv, "--", "train"])
    assert info.value.code == 2 and message in err.getvalue()


def test_the_launcher_module_keeps_its_command_line_names():
    import jaxnet.launch

    assert jaxnet.launch is launcher
    assert (launcher.run_launch, launcher.register_cli, launcher.main) == (
        cli_launch.run_launch,
        cli_launch.register_cli,
        cli_launch.main,
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        launcher.nothing  # noqa: B018


def test_python_m_launcher_is_jaxnet_launch():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxnet.parallel.launcher", "--nproc", "0", "--", "train"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "usage: jaxnet launch" in proc.stderr and "expected a positive integer, got 0" in proc.stderr
