"""Multi-process runs: the environment, each process's part of the data, joining, and 2 x 4 devices == 1 x 8.

Joining never hangs silently: a deadline, progress lines, Ctrl-C, SLURM
checks. The waiting tests start one process of a 2-process run alone, in a
subprocess, on a free port of 127.0.0.1: nobody else ever joins.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxnet.data import iterate_batches
from jaxnet.errors import ConfigError
from jaxnet.parallel import launcher as launch
from jaxnet.parallel import multiprocess as distributed
from jaxnet.parallel import sharding
from tests.helpers import import_file

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ENV = {"JAXNET_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAXNET_NUM_PROCESSES": "2", "JAXNET_PROCESS_ID": "1"}
TRAIN = [sys.executable, "-m", "jaxnet", "train", "--model", "mlp", "--no-download", "--epochs", "1"]
TIMEOUT = 4  # JAXNET_INIT_TIMEOUT of the lone processes, seconds
STARTUP = 30  # generous bound on starting Python and importing JAX on 2 busy cores
SLURM_STEP = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


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


def load_worker():
    return import_file(WORKER, "multiprocess_worker")


# --- the environment -----------------------------------------------------------------------


def test_config_from_env():
    assert distributed.config_from_env({}) is None
    config = distributed.config_from_env(ENV)
    assert config == distributed.DistributedConfig("127.0.0.1:1234", 2, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"JAXNET_PROCESS_ID": ""}, "JAXNET_PROCESS_ID missing; set all three"),
        ({"JAXNET_PROCESS_ID": "2"}, r"JAXNET_PROCESS_ID=2 must be in \[0, JAXNET_NUM_PROCESSES\)"),
        ({"JAXNET_NUM_PROCESSES": "two"}, "JAXNET_NUM_PROCESSES must be an integer, got 'two'"),
        ({"JAXNET_COORDINATOR_ADDRESS": "localhost"}, "must be HOST:PORT"),
    ],
)
def test_config_from_env_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        distributed.config_from_env({**ENV, **change})


def test_initialize_from_env_single_process_is_a_no_op():
    assert distributed.initialize_from_env({}) is None
    one = {**ENV, "JAXNET_NUM_PROCESSES": "1", "JAXNET_PROCESS_ID": "0"}
    assert distributed.initialize_from_env(one).num_processes == 1
    assert not jax.distributed.is_initialized()
    assert distributed.is_main_process()


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


@pytest.mark.parametrize(
    "env, message",
    [
        # sbatch/salloc without srun: the allocation's variables, not the step's
        (
            {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"},
            r"^SLURM_NTASKS=2 asks for 2 processes, but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set, "
            r".*start each task with srun \(srun jaxnet train \.\.\.\), or unset SLURM_NTASKS to run a single process$",
        ),
        ({**SLURM_STEP, "SLURM_LOCALID": ""}, r"SLURM_LOCALID is not set"),
        (
            {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "abc"},
            r"^SLURM_NTASKS must be an integer, got 'abc': start the tasks with srun .*unset SLURM_NTASKS",
        ),
        ({**SLURM_STEP, "SLURM_PROCID": "x"}, r"SLURM_PROCID must be an integer, got 'x'"),
        ({**SLURM_STEP, "SLURM_JOB_ID": "j7"}, r"SLURM_JOB_ID must be an integer, got 'j7'"),
        ({**SLURM_STEP, "SLURM_PROCID": "2"}, r"SLURM_PROCID=2 must be in \[0, SLURM_NTASKS=2\)"),
    ],
)
def test_a_partial_or_malformed_slurm_environment_is_one_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.slurm_tasks_from_env(env)
    with pytest.raises(ConfigError, match=message):  # before JAX is touched
        distributed.initialize_from_env(env)


@pytest.mark.parametrize(
    "env", [{"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "abc"}]
)
def test_the_cli_reports_a_partial_slurm_environment_in_one_line(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXNET_"))}
    done = subprocess.run(TRAIN, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("jaxnet: error: SLURM_NTASKS"), done.stderr


# --- per-process data ----------------------------------------------------------------------


def test_process_slices_tile_the_global_batch():
    # DistributedSampler's contract: the processes' parts are disjoint and together
    # are the global batch, in the order the global array is assembled.
    labels = np.arange(100)
    for batch in iterate_batches(np.arange(100), labels, 24, shuffle=True, seed=1, drop_last=True):
        parts = [distributed.process_batch_slice(batch["image"], p, 3) for p in range(3)]
        assert all(len(p) == 8 for p in parts)
        assert np.array_equal(np.concatenate(parts), batch["image"])
    with pytest.raises(ConfigError, match="global batch size 10 is not divisible by 4 processes"):
        distributed.process_batch_slice(np.arange(10), 0, 4)


def test_iterate_process_batches_in_one_process_is_iterate_batches():
    images, labels = np.arange(50)[:, None] * 10, np.arange(50)
    ours = list(distributed.iterate_process_batches(images, labels, 16, seed=2, epoch=3))
    ref = list(iterate_batches(images, labels, 16, shuffle=True, seed=2, epoch=3, drop_last=True))
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


def test_global_batch_from_local_in_one_process():
    mesh = sharding.make_mesh()
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
    out = distributed.global_batch_from_local(batch, mesh)
    assert out["image"].shape == (16, 3) and out["image"].sharding == sharding.batch_sharding(mesh)
    assert np.array_equal(np.asarray(out["image"]), batch["image"])
    with pytest.raises(ConfigError, match="holds 12 rows of the batch for 8 local devices"):
        distributed.global_batch_from_local({"x": np.zeros((12, 2))}, mesh)
    assert len(list(distributed.global_batches([batch] * 3, mesh))) == 3


# --- a lone process ------------------------------------------------------------------------


@pytest.mark.parametrize("process_id", [0, 1])  # 0 runs the coordination service, 1 only connects
def test_a_lone_process_stops_after_the_timeout_with_one_line(process_id):
    port = launch.free_port()
    start = time.monotonic()
    proc = subprocess.Popen(
        TRAIN,
        env=lone_env(process_id, port, JAXNET_INIT_TIMEOUT=str(TIMEOUT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert line.startswith(
        f"jaxnet: error: process {process_id} of 2 gave up after {TIMEOUT} s waiting at "
        f"127.0.0.1:{port} for the other 1 process to join: start all 2 processes"
    ), line
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
    done = subprocess.run(
        [sys.executable, "-c", code], env=lone_env(0, port), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False 1\n"  # detached: a single-process JAX still works
    *waiting, caught = done.stderr.splitlines()
    assert len(waiting) == 2, waiting  # after 1 and 2 s
    for line in waiting:
        assert re.fullmatch(rf"waiting for the other 1 of 2 processes at 127\.0\.0\.1:{port} \(\d s of 3 s\)", line)
    assert caught.startswith("caught process 0 of 2 gave up after 3 s"), caught
    assert time.monotonic() - start < 3 + STARTUP


# --- a dead process ---------------------------------------------------------------------


def test_without_the_launcher_the_survivor_stops_after_the_heartbeat_timeout(tmp_path):
    # Several hosts have no launcher watching: JAX's coordination service must
    # notice the missing heartbeats of the dead process and stop process 0.
    port = launch.free_port()
    env = [launch.child_env(r, 2, port, devices_per_proc=4) for r in range(2)]
    command = [sys.executable, str(WORKER), str(tmp_path), "die"]
    start = time.monotonic()
    survivor = subprocess.Popen(command, env=env[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert subprocess.run(command, env=env[1], capture_output=True, timeout=60).returncode == 3
        output, _ = survivor.communicate(timeout=60)
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
    assert survivor.returncode != 0
    assert "stopped sending heartbeats" in output
    assert time.monotonic() - start < 60


# --- two processes ----------------------------------------------------------------------


@pytest.mark.slow  # ~25 s on 2 idle cores: two JAX processes start and compile
def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    launch.launch([str(WORKER), str(tmp_path), "train"], nproc=2, devices_per_proc=4, timeout=300)
    result = dict(np.load(tmp_path / "result.npz"))
    assert int(result["num_devices"]) == 8 and int(result["num_processes"]) == 2
    assert (tmp_path / "process1.txt").read_text() == "4"  # process 1 saw 4 local devices, wrote no result
    assert len(list(tmp_path.iterdir())) == 2
    worker = load_worker()
    assert jax.device_count() == 8 and jax.process_count() == 1
    for layout in ("dp", "fsdp"):
        ref = worker.run_steps(fsdp=layout == "fsdp")
        assert int(result[f"{layout}:num_sharded"]) == int(ref["num_sharded"])
        for key, value in ref.items():
            got = result[f"{layout}:{key}"]
            err = np.linalg.norm(got - value) / max(np.linalg.norm(value), 1e-30)
            assert err <= 1e-5, (layout, key, err)
    assert int(result["fsdp:num_sharded"]) == 2 and int(result["dp:num_sharded"]) == 0


@pytest.mark.slow  # ~60 s: three 2-process runs, each starting and compiling JAX twice
def test_two_process_checkpoints_resume_bit_identical(tmp_path):
    # A data-parallel state spread over 2 processes goes to Orbax's own
    # format (each process writes its shards), and --resume continues exactly.
    def run(workdir, epochs, *extra):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "jaxnet",
                "launch",
                "--nproc",
                "2",
                "--devices-per-proc",
                "2",
                "--",
                "train",
                "--model",
                "mlp128",
                "--no-download",
                "--batch-size",
                "64",
                "--epochs",
                str(epochs),
                "--workdir",
                str(workdir),
                "--no-progress",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    first, _ = run(tmp_path / "a", 1)
    state_dir = tmp_path / "a" / "checkpoints" / str(first["steps"]) / "state"
    assert not (state_dir / "arrays.npz").exists() and (state_dir / "ocdbt.process_1").is_dir()
    # One process (jaxnet export) reads the 2-process checkpoint's variables; the digests are checked.
    from flax import nnx

    from jaxnet import checkpoint
    from jaxnet.models import create_model

    _, params, model_state = nnx.split(create_model("mlp128"), nnx.Param, ...)
    ckpt = checkpoint.create_checkpoint_manager(tmp_path / "a" / "checkpoints", read_only=True)
    _, _, meta = checkpoint.restore_variables(ckpt, params, model_state)
    checkpoint.close(ckpt)
    assert meta["epoch"] == 1
    resumed, err = run(tmp_path / "a", 2, "--resume")
    assert f"resuming from checkpoint step {first['steps']}" in err
    straight, _ = run(tmp_path / "b", 2)
    assert resumed["num_processes"] == 2
    assert resumed["params_sha256"] == straight["params_sha256"]
