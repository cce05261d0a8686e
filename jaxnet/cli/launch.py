"""``jaxnet launch``: one jaxnet command (or script) in several local processes joined into one run.

The launcher itself (starting, watching and stopping the processes) is
:mod:`jaxnet.parallel.launcher`; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxnet.cli.converters import add_command, port, positive_float, positive_int


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``launch`` subcommand to ``jaxnet``'s parser (``func=run_launch``, which returns None)."""
    from jaxnet.parallel.multiprocess import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

    p = add_command(
        subparsers,
        "launch",
        help="run a jaxnet command in several processes joined into one run (torchrun)",
        description=(
            "Start NPROC local processes of a jaxnet command (or a Python script), joined with "
            "jax.distributed through a coordinator on 127.0.0.1. If one process fails, the others "
            "are stopped and the failure is reported. For several hosts, set "
            f"{COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} on each host instead "
            "(or use srun under SLURM)."
        ),
        epilog="example: jaxnet launch --nproc 2 --devices-per-proc 4 -- train --model mlp --batch-size 64",
    )
    p.add_argument("--nproc", type=positive_int, required=True, help="number of processes")
    p.add_argument(
        "--devices-per-proc",
        type=positive_int,
        default=None,
        help="simulated CPU devices per process (CPU only; default: the real devices)",
    )
    p.add_argument("--port", type=port, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--timeout", type=positive_float, default=None, help="stop every process after this many seconds")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after '--': a jaxnet command (train ...) or a Python script (script.py ...)",
    )
    p.set_defaults(func=run_launch)
    return p


def run_launch(args: argparse.Namespace) -> None:
    """Runs ``jaxnet launch`` from parsed arguments; raises on failure (:func:`jaxnet.parallel.launcher.launch`)."""
    from jaxnet.parallel.launcher import launch

    launch(args.command, nproc=args.nproc, devices_per_proc=args.devices_per_proc, port=args.port, timeout=args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxnet.parallel.launcher ...``: ``jaxnet launch ...`` on its own; returns the exit status."""
    from jaxnet.cli import main as cli_main

    return cli_main(["launch", *(sys.argv[1:] if argv is None else argv)], commands=("launch",))
