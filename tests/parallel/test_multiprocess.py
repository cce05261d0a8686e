"""Joining a multi-process run never hangs silently: a deadline, progress lines, Ctrl-C, SLURM checks.

The waiting tests start one process of a 2-process run alone, in a
subprocess, on a free port of 127.0.0.1: nobody else ever joins.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxnet.parallel import multiprocess as distributed
from jaxnet.parallel import launcher as launch
from jaxnet.errors import ConfigError

TRAIN = [sys.executable, "-m", "jaxnet", "train", "--model", "mlp", "--no-download", "--epochs", "1"]
TIMEOUT = 4  # JAXNET_INIT_TIMEOUT of the lone processes, seconds
STARTUP = 30  # generous bound on starting Python and importing JAX on 2 busy cores
SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


def lone_env(process_id: int, port: int, **extra: str) -> dict[str, str]:
    """Process ``process_id`` of 2, whose partner never comes."""
    env = launch.child_env(process_id, 2, port, devices_per_proc=1)
    env.pop(distributed.INIT_TIMEOUT_ENV, None)
    env.update(extra)
    return env


def wait_for_port(port: int, proc: subprocess.Popen, limit: float = STARTUP) -> None:
    """Returns once process 0's coordination service listens on ``port`` (it is then joining)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the coordinator never listened on {port}")


# --- the environment -----------------------------------------------------------------------


def test_init_timeout_from_env():
    assert distributed.init_timeout_from_env({}) == distributed.INIT_TIMEOUT_SECONDS == 300.0
    assert distributed.init_timeout_from_env({"JAXNET_INIT_TIMEOUT": " 12.5 "}) == 12.5
    for bad in ("abc", "0", "-3", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"JAXNET_INIT_TIMEOUT must be a positive number of seconds.*{bad!r}"):
            distributed.init_timeout_from_env({"JAXNET_INIT_TIMEOUT": bad})


def test_slurm_tasks_from_env():
    assert distributed.slurm_tasks_from_env({}) is None
    assert distributed.slurm_tasks_from_env({"SLURM_NTASKS": "4"}) is None  # not a SLURM job
    assert distributed.slurm_tasks_from_env({"SLURM_JOB_ID": "7"}) is None  # one task
    assert distributed.slurm_tasks_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.slurm_tasks_from_env(SLURM_STEP) == (2, 1)


@pytest.mark.parametrize("env, message", [
    # sbatch/salloc without srun: the allocation's variables, not the step's
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"},
     r"^SLURM_NTASKS=2 asks for 2 processes, but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set, "
     r".*start each task with srun \(srun jaxnet train \.\.\.\), or unset SLURM_NTASKS to run a single process$"),
    ({**SLURM_STEP, "SLURM_LOCALID": ""}, r"SLURM_LOCALID is not set"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "abc"},
     r"^SLURM_NTASKS must be an integer, got 'abc': start the tasks with srun .*unset SLURM_NTASKS"),
    ({**SLURM_STEP, "SLURM_PROCID": "x"}, r"SLURM_PROCID must be an integer, got 'x'"),
    ({**SLURM_STEP, "SLURM_JOB_ID": "j7"}, r"SLURM_JOB_ID must be an integer, got 'j7'"),
    ({**SLURM_STEP, "SLURM_PROCID": "2"}, r"SLURM_PROCID=2 must be in \[0, SLURM_NTASKS=2\)"),
])
def test_a_partial_or_malformed_slurm_environment_is_one_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.slurm_tasks_from_env(env)
    with pytest.raises(ConfigError, match=message):  # before JAX is touched
        distributed.initialize_from_env(env)


@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"},
                                 {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "abc"}])
def test_the_cli_reports_a_partial_slurm_environment_in_one_line(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXNET_"))}
    done = subprocess.run(TRAIN, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("jaxnet: error: SLURM_NTASKS"), done.stderr


# --- a lone process ------------------------------------------------------------------------


@pytest.mark.parametrize("process_id", [0, 1])  # 0 runs the coordination service, 1 only connects
def test_a_lone_process_stops_after_the_timeout_with_one_line(process_id):
    port = launch.free_port()
    start = time.monotonic()
    proc = subprocess.Popen(TRAIN, env=lone_env(process_id, port, JAXNET_INIT_TIMEOUT=str(TIMEOUT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        printed = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    exited = time.monotonic()
    assert proc.returncode == 2, line + rest
    assert rest == "", rest  # one line: no C++ errors, no traceback
    assert line.startswith(f"jaxnet: error: process {process_id} of 2 gave up after {TIMEOUT} s waiting at "
                           f"127.0.0.1:{port} for the other 1 process to join: start all 2 processes"), line
    assert "jaxnet launch --nproc 2" in line and "JAXNET_INIT_TIMEOUT=SECONDS" in line
    assert TIMEOUT <= exited - start < TIMEOUT + STARTUP
    assert exited - printed < 4  # no wait at interpreter shutdown (shutting the service down took 5 s)


def test_ctrl_c_while_waiting_ends_the_process_at_once():
    port = launch.free_port()
    proc = subprocess.Popen(TRAIN, env=lone_env(0, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        time.sleep(1.0)  # well inside the C++ wait
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    latency = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert err == "jaxnet: interrupted\n" and out == ""
    assert latency < 4, latency


def test_a_python_caller_sees_progress_then_a_config_error_and_can_go_on():
    code = (
        "import sys, jax\n"
        "from jaxnet import distributed\n"
        "from jaxnet.errors import ConfigError\n"
        "try:\n"
        "    distributed.initialize_from_env(init_timeout_seconds=3, progress_seconds=1)\n"
        "except ConfigError as exc:\n"
        "    print('caught', exc, file=sys.stderr)\n"
        "print(jax.distributed.is_initialized(), jax.process_count(), flush=True)\n"
    )
    port = launch.free_port()
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=lone_env(0, port), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False 1\n"  # detached: a single-process JAX still works
    *waiting, caught = done.stderr.splitlines()
    assert len(waiting) == 2, waiting  # after 1 and 2 s
    for line in waiting:
        assert re.fullmatch(rf"waiting for the other 1 of 2 processes at 127\.0\.0\.1:{port} \(\d s of 3 s\)", line)
    assert caught.startswith("caught process 0 of 2 gave up after 3 s"), caught
    assert time.monotonic() - start < 3 + STARTUP
