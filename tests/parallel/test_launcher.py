"""``jaxnet launch``: the children's command and environment, and a dying process stopping the run."""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.parallel import launcher as launch

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def test_child_command_and_env():
    command = launch.child_command(["--", "train", "--model", "mlp"])
    assert command == [sys.executable, "-m", "jaxnet", "train", "--model", "mlp"]
    assert launch.child_command(["run.py", "x"]) == [sys.executable, "run.py", "x"]
    with pytest.raises(ConfigError, match="needs a command after '--'"):
        launch.child_command(["--"])
    env = launch.child_env(
        1,
        2,
        4321,
        devices_per_proc=4,
        base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo", "PATH": "/bin"},
    )
    assert env["JAXNET_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert (env["JAXNET_NUM_PROCESSES"], env["JAXNET_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


def test_launch_rejects_bad_counts():
    with pytest.raises(ConfigError, match="must be at least 1"):
        launch.launch(["x.py"], nproc=0)


def test_a_dying_process_stops_the_run_with_a_clear_error(tmp_path):
    start = time.monotonic()
    expected = r"process 1 of 2 exited with status 3; stopped the other processes still running \(0\)"
    with pytest.raises(JaxnetError, match=expected):
        launch.launch([str(WORKER), str(tmp_path), "die"], nproc=2, devices_per_proc=4, timeout=120)
    assert time.monotonic() - start < 60
