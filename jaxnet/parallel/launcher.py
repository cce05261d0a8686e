"""``jaxnet launch``: start several local processes of one run (``torchrun`` counterpart).

::

    jaxnet launch --nproc 2 --devices-per-proc 4 -- train --model mlp --batch-size 64
    jaxnet launch --nproc 2 -- path/to/script.py --its-args

starts ``--nproc`` processes of ``jaxnet train ...`` (or of a Python script),
each with ``JAXNET_COORDINATOR_ADDRESS=127.0.0.1:PORT``,
``JAXNET_NUM_PROCESSES`` and ``JAXNET_PROCESS_ID`` set, so that
:func:`jaxnet.parallel.multiprocess.initialize_from_env` joins them into one run.
``--devices-per-proc D`` gives each process ``D`` simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``, CPU platform) to
rehearse a multi-host run on one machine.

The launcher watches its children: when one exits with an error, it stops
the others and reports which process died and how, instead of leaving them
blocked in a collective that can never complete. Each process waits at most
``JAXNET_INIT_TIMEOUT`` seconds (default 300) for the others to join, and
Ctrl-C stops them all, also while they wait.

Several hosts use the same variables, one process per host (or per GPU)::

    # on every host; host0 runs process 0 and the coordinator
    JAXNET_COORDINATOR_ADDRESS=host0:12355 JAXNET_NUM_PROCESSES=2 \\
    JAXNET_PROCESS_ID=<0 or 1> jaxnet train --model mlp ...

    # SLURM: JAX reads SLURM_* itself
    srun --nodes=2 --ntasks-per-node=1 jaxnet train --model mlp ...
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.parallel.multiprocess import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

POLL_SECONDS = 0.1
# Between SIGTERM and SIGKILL when stopping the survivors. JAX's preemption
# notifier catches SIGTERM in a process that joined a run, so keep it short.
GRACE_SECONDS = 2.0
# After SIGTERM or Ctrl-C reaches the launcher: how long the processes get to finish their step and
# write their checkpoint (they stop together) before they are killed.
STOP_GRACE_SECONDS = 120.0


class _Stopping(Exception):
    """SIGTERM reached the launcher."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """How a launched run ended."""

    returncodes: tuple[int | None, ...]  # per process; None: still running when stopped
    failed_rank: int | None  # the first process to fail, None if all succeeded
    seconds: float  # wall time of the run


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for the coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(argv: Sequence[str]) -> list[str]:
    """The command each process runs: ``python -m jaxnet ARGS`` or ``python SCRIPT.py ARGS``.

    Raises:
        ConfigError: if ``argv`` is empty.

    >>> child_command(["train", "--model", "mlp"])[1:]
    ['-m', 'jaxnet', 'train', '--model', 'mlp']
    """
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("jaxnet launch needs a command after '--', e.g. jaxnet launch --nproc 2 -- train --model mlp")
    if argv[0].endswith(".py"):
        return [sys.executable, *argv]
    return [sys.executable, "-m", "jaxnet", *argv]


def child_env(
    rank: int, nproc: int, port: int, *, devices_per_proc: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of process ``rank``: the ``JAXNET_*`` variables (and simulated CPU devices)."""
    env = dict(os.environ if base is None else base)
    env.update({COORDINATOR_ENV: f"127.0.0.1:{port}", NUM_PROCESSES_ENV: str(nproc), PROCESS_ID_ENV: str(rank)})
    if devices_per_proc is not None:
        flags = " ".join(
            f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
        )
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_proc}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(
    procs: list[subprocess.Popen], signum: int = signal.SIGTERM, grace: float = GRACE_SECONDS
) -> list[int | None]:
    """Sends ``signum`` to the running processes, then SIGKILL to those still alive after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def launch(
    argv: Sequence[str],
    *,
    nproc: int,
    devices_per_proc: int | None = None,
    port: int | None = None,
    timeout: float | None = None,
) -> LaunchResult:
    """Runs ``argv`` in ``nproc`` local processes joined into one JAX run, and waits for them.

    Counterpart of ``torchrun --nproc-per-node N``. Children inherit stdout
    and stderr.

    Args:
        argv: a jaxnet command (``["train", ...]``) or ``["script.py", ...]``.
        nproc: number of processes.
        devices_per_proc: simulated CPU devices per process (None: the platform's own).
        port: coordinator port on 127.0.0.1 (default: a free one).
        timeout: stop all processes after this many seconds (None: no limit).

    Returns:
        A :class:`LaunchResult`.

    Raises:
        ConfigError: bad counts or an empty command.
        JaxnetError: a process failed (the others were stopped) or the run
            timed out; the message names the process and its exit status.
    """
    if nproc < 1 or (devices_per_proc is not None and devices_per_proc < 1):
        raise ConfigError(f"--nproc ({nproc}) and --devices-per-proc ({devices_per_proc}) must be at least 1")
    command = child_command(argv)
    port = free_port() if port is None else port
    start = time.monotonic()
    procs: list[subprocess.Popen] = []

    def on_sigterm(signum: int, frame: object) -> None:
        raise _Stopping(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(command, env=child_env(rank, nproc, port, devices_per_proc=devices_per_proc)))
        while True:
            codes = [p.poll() for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c is not None and c != 0), None)
            if failed is not None:
                _stop(procs)
                rank, code = failed
                stopped = [r for r, c in enumerate(codes) if c is None]
                raise JaxnetError(
                    f"process {rank} of {nproc} {_describe(code)}; stopped the other "
                    f"processes still running ({', '.join(map(str, stopped)) or 'none'}). "
                    f"See process {rank}'s messages above"
                )
            if all(c == 0 for c in codes):
                return LaunchResult(tuple(codes), None, time.monotonic() - start)
            if timeout is not None and time.monotonic() - start > timeout:
                _stop(procs)
                running = [r for r, c in enumerate(codes) if c is None]
                raise JaxnetError(f"processes {running} still running after {timeout:g} s; stopped them all")
            time.sleep(POLL_SECONDS)
    except (_Stopping, KeyboardInterrupt) as exc:  # a scheduler's SIGTERM, or Ctrl-C: let them save first
        signum = exc.signum if isinstance(exc, _Stopping) else signal.SIGINT
        codes = _stop(procs, signum, STOP_GRACE_SECONDS)  # they finish their step and save first
        name = signal.Signals(signum).name
        raise LaunchStopped(name, 128 + signum, codes) from None
    except BaseException:
        _stop(procs)  # any error: never leave children behind
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class LaunchStopped(KeyboardInterrupt):
    """The launcher was stopped by SIGTERM or Ctrl-C; each process got the signal and was waited for."""

    def __init__(self, signal_name: str, exit_status: int, returncodes: Sequence[int | None]):
        self.exit_status, self.returncodes = exit_status, tuple(returncodes)
        codes = ", ".join(f"process {r}: {c}" for r, c in enumerate(returncodes))
        super().__init__(f"stopped by {signal_name}; passed it on to the processes and waited for them ({codes})")


# Its command line (run_launch, register_cli, main) moved to jaxnet.cli.launch;
# the old names still resolve here, imported on first use.
_CLI_NAMES = ("run_launch", "register_cli", "main")


def __getattr__(name: str) -> object:
    if name in _CLI_NAMES:
        from jaxnet.cli import launch as cli_launch

        return getattr(cli_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # python -m jaxnet.parallel.launcher ARGS: jaxnet launch ARGS
    from jaxnet.cli.launch import main

    sys.exit(main())
