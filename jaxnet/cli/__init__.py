"""Command line: ``jaxnet COMMAND ...`` (also ``python -m jaxnet COMMAND ...``).

One parser family: each subcommand lives in a module of this package that
adds its parser (``register_cli``) and runs it (``args.func``):
:mod:`~jaxnet.cli.train` (``train``; its flags are
:mod:`~jaxnet.cli.train_args`, and ``--model cifar_speed``'s own run is
:mod:`~jaxnet.cli.speedrun`), :mod:`~jaxnet.cli.export` (``export``,
``predict``), :mod:`~jaxnet.cli.launch` (``launch``) and
:mod:`~jaxnet.cli.bench` (``bench``). Every flag's type is one of
:mod:`jaxnet.cli.converters`; ``train``'s ``--config`` file and recorded run
config are :mod:`jaxnet.cli.runconfig`.

Every user mistake (unknown names, bad values, missing or corrupt files) ends
in one line on stderr, ``jaxnet: error: ...``, and exit status 2, never a
traceback through JAX internals.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Collection, Iterator, Sequence

from jaxnet.cli import bench, export, launch, train
from jaxnet.cli.train import OPERATIONAL_FLAGS, parse_train_args, print_summary, run_train, strict_json
from jaxnet.errors import ConfigError, Interrupted, JaxnetError, TrainingDiverged

__all__ = [
    "COMMANDS",
    "OPERATIONAL_FLAGS",
    "PROG",
    "build_parser",
    "main",
    "parse_train_args",
    "run_train",
    "strict_json",
]

PROG = "jaxnet"
COMMANDS = ("train", "export", "predict", "launch", "bench")
_REGISTER = (
    (("train",), train.register_cli),
    (("export", "predict"), export.register_cli),
    (("launch",), launch.register_cli),
    (("bench",), bench.register_cli),
)


def build_parser(commands: Collection[str] = COMMANDS) -> argparse.ArgumentParser:
    """The ``jaxnet`` argument parser with its subcommands (all, or those named in ``commands``)."""
    from jaxnet import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="jaxnet: the PyTorch tutorials' training pipeline as pure, jit-compiled JAX.",
        epilog="Run 'jaxnet COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for names, register in _REGISTER:
        if any(name in commands for name in names):
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, commands: Collection[str] = COMMANDS) -> int:
    """Entry point of ``jaxnet`` and ``python -m jaxnet``; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        commands: the subcommands to offer (``python -m jaxnet.bench`` offers only ``bench``).
    """
    _limit_malloc_arenas()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    try:
        args = parse_train_args(parser, argv, args)
    except ConfigError as exc:  # a bad --config file
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _cli_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":  # under `jaxnet launch` (or SLURM): join the other processes first
            from jaxnet.parallel.multiprocess import initialize_from_env

            initialize_from_env()
        summary = args.func(args)
    except TrainingDiverged as exc:  # the run, not the command line, went wrong: no "error:", status 1
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (JaxnetError, OSError) as exc:  # bad names, values, files, folders
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted) or hasattr(exc, "exit_status"):  # the checkpoint is on disk
            print(f"{PROG}: {exc}", file=sys.stderr)  # (Interrupted; launch's LaunchStopped)
            return exc.exit_status
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if summary is not None:  # only train returns one; the other commands print their own output
        if jax_process_index() == 0:
            print_summary(summary, getattr(args, "json", False))
    return 0


def jax_process_index() -> int:
    """This process's rank (0 when JAX is not running several processes)."""
    import jax

    return jax.process_index()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests and notebooks swap it)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _cli_logging() -> Iterator[None]:
    """jaxnet's notices as ``jaxnet: ...`` lines on stderr; other libraries' chatter muted.

    Only while the command runs: the loggers are put back afterwards, so a
    program or test that calls :func:`main` keeps its own logging setup.
    """
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log = logging.getLogger("jaxnet")
    noisy = [logging.getLogger(name) for name in ("absl", "orbax", "tensorflow_datasets", "jax._src.xla_bridge")]
    saved = (log.level, log.propagate, [n.level for n in noisy])
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # Importing Orbax makes absl call logging.basicConfig(), a root handler
    # that would print every notice a second time.
    log.propagate = False
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        for logger, level in zip(noisy, saved[2]):
            logger.setLevel(level)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas, as ``MALLOC_ARENA_MAX=2`` does, unless the user set it.

    glibc gives threads their own arenas; the thread pools of XLA and of
    Orbax's asynchronous saves then fragment memory, and a long run's peak
    RSS creeps up with every checkpoint (measured: benchmarks/CHECKPOINTS.md,
    "Peak memory over a long run").
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to cap
        pass


if __name__ == "__main__":
    sys.exit(main())
