"""Multi-process runs: environment, per-process data, the launcher, and 2 x 4 devices == 1 x 8."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxnet.parallel import multiprocess as distributed
from jaxnet.parallel import launcher as launch
from jaxnet.parallel import sharding
from jaxnet.data import iterate_batches
from jaxnet.errors import ConfigError, JaxnetError

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ENV = {"JAXNET_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAXNET_NUM_PROCESSES": "2", "JAXNET_PROCESS_ID": "1"}


def load_worker():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- environment and per-process data ----------------------------------------------------


def test_config_from_env():
    assert distributed.config_from_env({}) is None
    config = distributed.config_from_env(ENV)
    assert config == distributed.DistributedConfig("127.0.0.1:1234", 2, 1)


@pytest.mark.parametrize(
    "change, message",
    [({"JAXNET_PROCESS_ID": ""}, "JAXNET_PROCESS_ID missing; set all three"),
     ({"JAXNET_PROCESS_ID": "2"}, r"JAXNET_PROCESS_ID=2 must be in \[0, JAXNET_NUM_PROCESSES\)"),
     ({"JAXNET_NUM_PROCESSES": "two"}, "JAXNET_NUM_PROCESSES must be an integer, got 'two'"),
     ({"JAXNET_COORDINATOR_ADDRESS": "localhost"}, "must be HOST:PORT")],
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


# --- the launcher ------------------------------------------------------------------------


def test_child_command_and_env():
    command = launch.child_command(["--", "train", "--model", "mlp"])
    assert command == [sys.executable, "-m", "jaxnet", "train", "--model", "mlp"]
    assert launch.child_command(["run.py", "x"]) == [sys.executable, "run.py", "x"]
    with pytest.raises(ConfigError, match="needs a command after '--'"):
        launch.child_command(["--"])
    env = launch.child_env(1, 2, 4321, devices_per_proc=4,
                           base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo", "PATH": "/bin"})
    assert env["JAXNET_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert (env["JAXNET_NUM_PROCESSES"], env["JAXNET_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


def test_register_cli_parses_the_command_after_the_separator():
    parser = argparse.ArgumentParser(prog="jaxnet")
    launch.register_cli(parser.add_subparsers(dest="command_name"))
    args = parser.parse_args(["launch", "--nproc", "2", "--devices-per-proc", "4", "--", "train", "--model", "mlp"])
    assert (args.nproc, args.devices_per_proc, args.func) == (2, 4, launch.run_launch)
    assert launch.child_command(args.command)[1:] == ["-m", "jaxnet", "train", "--model", "mlp"]


def test_launch_rejects_bad_counts():
    with pytest.raises(ConfigError, match="must be at least 1"):
        launch.launch(["x.py"], nproc=0)


def test_a_dying_process_stops_the_run_with_a_clear_error(tmp_path):
    start = time.monotonic()
    expected = r"process 1 of 2 exited with status 3; stopped the other processes still running \(0\)"
    with pytest.raises(JaxnetError, match=expected):
        launch.launch([str(WORKER), str(tmp_path), "die"], nproc=2, devices_per_proc=4, timeout=120)
    assert time.monotonic() - start < 60


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
            [sys.executable, "-m", "jaxnet", "launch", "--nproc", "2", "--devices-per-proc", "2", "--", "train",
             "--model", "mlp128", "--no-download", "--batch-size", "64", "--epochs", str(epochs),
             "--workdir", str(workdir), "--no-progress", "--json", *extra],
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
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
