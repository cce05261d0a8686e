"""Fault injection: preemption, divergence, non-finite checkpoints, as a training job meets them."""

from __future__ import annotations

import os
import signal

import numpy as np
import optax
import pytest
from flax import nnx

import jaxnet
from jaxnet import callbacks as jcb
from jaxnet import checkpoint
from jaxnet.checkpoint import workdir
from jaxnet.errors import ConfigError, Interrupted, TrainingDiverged
from jaxnet.optim import create_optimizer


class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x))))


def tabular(n: int = 320) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, np.digitize(x[:, 0], [-0.5, 0.5]).astype(np.int32)


def fit(tx=None, **kw):
    x, y = tabular()
    kw = {"epochs": 3, "batch_size": 16, "progress": False, "log_every": 5, **kw}
    return jaxnet.fit(Net(rngs=nnx.Rngs(0)), (x, y), tx or create_optimizer("adam", 1e-2), **kw)


class SendSignal(jcb.Callback):
    def __init__(self, sig: int, at_step: int, times: int = 1):
        self.sig, self.at_step, self.times = sig, at_step, times

    def on_train_batch_end(self, run, step, logs):
        if step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)


def steps_in(path) -> list[int]:
    ckpt = checkpoint.create_checkpoint_manager(workdir.checkpoint_directory(path), read_only=True)
    try:
        return checkpoint.steps(ckpt)
    finally:
        checkpoint.close(ckpt)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_saves_and_resume_is_exact(tmp_path, sig, status):
    w = tmp_path / "w"
    with pytest.raises(Interrupted) as info:
        fit(workdir=w, callbacks=[SendSignal(sig, at_step=25)])
    assert info.value.exit_status == status and info.value.step == 25 and info.value.checkpoint_step == 25
    assert (
        str(info.value) == f"stopped by {signal.Signals(sig).name} at step 25; checkpoint saved; continue with --resume"
    )
    assert 25 in steps_in(w)  # mid-epoch: epoch 2, batch 5; durable before the exception
    resumed = fit(workdir=w, resume=True)
    assert resumed.summary["resumed_from_step"] == 25
    assert resumed.summary["params_sha256"] == fit().summary["params_sha256"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back


def test_second_signal_during_the_stop_is_noted_not_obeyed(tmp_path, capfd):
    with pytest.raises(Interrupted):
        fit(workdir=tmp_path / "w", callbacks=[SendSignal(signal.SIGTERM, at_step=10, times=2)])
    assert "already stopping" in capfd.readouterr().err
    assert 10 in steps_in(tmp_path / "w")


def test_signals_left_alone_when_switched_off():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
    try:
        old_term = signal.getsignal(signal.SIGTERM)
        fit(
            epochs=1,
            handle_signals=False,
            callbacks=[
                type(
                    "Probe",
                    (jcb.Callback,),
                    {
                        "on_epoch_end": lambda self, run, e, logs: seen.append(
                            signal.getsignal(signal.SIGTERM) is old_term
                        )
                    },
                )()
            ],
        )
        assert seen == [True]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_divergence_stops_with_the_first_bad_step_and_writes_no_nan_checkpoint(tmp_path):
    w = tmp_path / "w"
    with pytest.raises(TrainingDiverged) as info:
        fit(optax.sgd(1e6), workdir=w)
    assert info.value.last_finite_checkpoint is None and info.value.step >= 1
    assert str(info.value).startswith(f"training diverged at step {info.value.step} (loss ")
    assert steps_in(w) == []


def test_divergence_in_epoch_two_keeps_epoch_one(tmp_path):
    w = tmp_path / "w"
    steps_per_epoch = 320 // 16
    # finite through epoch 1, then the learning rate explodes
    schedule = lambda count: jax_where(count < steps_per_epoch, 1e-2, 1e6)  # noqa: E731
    with pytest.raises(TrainingDiverged) as info:
        fit(optax.sgd(schedule), workdir=w, epochs=4)
    assert info.value.last_finite_checkpoint == steps_per_epoch
    assert info.value.step > steps_per_epoch
    assert steps_in(w) == [steps_per_epoch]  # nothing after the divergence
    resumed_from = checkpoint.create_checkpoint_manager(workdir.checkpoint_directory(w), read_only=True)
    try:
        assert checkpoint.resolve_step(resumed_from, "latest") == steps_per_epoch
    finally:
        checkpoint.close(resumed_from)


def jax_where(cond, a, b):
    import jax.numpy as jnp

    return jnp.where(cond, a, b)


def test_on_nan_continue_trains_on_without_nan_checkpoints(tmp_path, caplog):
    w = tmp_path / "w"
    result = fit(optax.sgd(1e6), workdir=w, on_nan="continue")
    assert result.summary["steps"] == 3 * 20
    assert not np.isfinite(result.history[-1]["train_loss"])
    assert steps_in(w) == []
    assert "not finite" in caplog.text
    with pytest.raises(ConfigError, match="on_nan"):
        fit(on_nan="ignore")


def test_metrics_count_nan_outputs_as_wrong():
    import jax.numpy as jnp

    from jaxnet import metrics

    logits = jnp.array([[jnp.nan] * 10, [0.0] * 9 + [jnp.nan], [5.0] + [0.0] * 9])
    labels = jnp.array([3, 9, 0])
    m = metrics.metrics_update(metrics.metrics_init(10, k=5), logits, labels)
    out = metrics.metrics_compute(m)
    assert out["accuracy"] == pytest.approx(1 / 3) and out["top5_accuracy"] == pytest.approx(1 / 3)
    assert int(np.asarray(m.confusion).sum()) == 3


# -- the same through the command line, as a scheduler and an operator meet them ----------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from tests.helpers import offline_env as _env  # noqa: E402
from tests.helpers import run_jaxnet  # noqa: E402

TRAIN = [
    "train",
    "--model",
    "mlp128",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--json",
    "--no-download",
    "--no-progress",
]


def _jaxnet(tmp_path, *args, timeout=600) -> tuple[int, str, str]:
    proc = run_jaxnet(*args, env=_env(tmp_path), timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _strict(line: str) -> dict:
    def reject(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=reject)


@pytest.mark.slow
def test_cli_sigterm_mid_epoch_then_resume_loses_no_step(tmp_path):
    w = tmp_path / "w"
    code, out, err = _jaxnet(tmp_path, *TRAIN)
    assert code == 0, err[-3000:]
    reference = _strict(out.strip().splitlines()[-1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxnet", *TRAIN, "--workdir", str(w), "--checkpoint-every", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    metrics, deadline = w / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait for training to be under way
        if metrics.is_file() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("jaxnet: stopped by SIGTERM")]
    assert len(lines) == 1 and lines[0].endswith("checkpoint saved; continue with --resume"), err[-3000:]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert 0 < step < reference["steps"] and step in steps_in(w) and "Traceback" not in err
    code, out, err = _jaxnet(tmp_path, *TRAIN, "--workdir", str(w), "--checkpoint-every", "500", "--resume")
    assert code == 0, err[-3000:]
    resumed = _strict(out.strip().splitlines()[-1])
    assert resumed["resumed_from_step"] == step
    assert resumed["params_sha256"] == reference["params_sha256"] and resumed["steps"] == reference["steps"]


@pytest.mark.slow
def test_cli_divergence_in_epoch_two_keeps_epoch_one_and_export_picks_it(tmp_path):
    w = tmp_path / "w"
    args = [
        *TRAIN,
        "--epochs",
        "3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--schedule",
        "exponential",
        "--gamma",
        "1000000",
        "--workdir",
        str(w),
    ]
    code, out, err = _jaxnet(tmp_path, *args)
    assert code == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    steps_per_epoch = 6000 // 64
    assert line.startswith("jaxnet: training diverged at step ") and "(loss " in line, err[-3000:]
    assert line.endswith(f"last finite checkpoint: step {steps_per_epoch}") and "Traceback" not in err
    assert steps_in(w) == [steps_per_epoch]
    code, out, err = _jaxnet(
        tmp_path, "export", "--workdir", str(w), "--out", str(tmp_path / "m.jaxexport"), "--step", "latest"
    )
    assert code == 0, err[-3000:]
    assert f"checkpoint step {steps_per_epoch}" in out
    for line in (w / "metrics.jsonl").read_text().splitlines():
        _strict(line)


@pytest.mark.slow
def test_cli_json_is_strict_when_training_goes_on_through_nan(tmp_path):
    code, out, err = _jaxnet(
        tmp_path, *TRAIN, "--epochs", "1", "--optimizer", "sgd", "--lr", "1e6", "--on-nan", "continue"
    )
    assert code == 0, err[-3000:]
    summary = _strict(out.strip().splitlines()[-1])  # no bare NaN
    assert summary["test_loss"] is None and summary["test_top5_accuracy"] < 1.0
    assert summary["test_accuracy"] <= 0.2


# -- the smaller items: each mistake one clear line ------------------------------------------------


def test_small_cli_items(capsys):
    from jaxnet import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--seed", "99999999999999999999999"])
    assert info.value.code == 2 and "expected a seed in [0, 4294967295]" in capsys.readouterr().err
    assert cli.main(["train", "--grad-accum", "100", "--no-download", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "93 batches of 64, fewer than the 100 accumulated per step" in err and "larger than" not in err
    for command in (["train"], ["export"], ["predict"], ["bench"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        import re

        assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), command


def test_predict_takes_integer_pixels_and_advises_on_floats():
    from jaxnet.errors import DataError
    from jaxnet.export import as_pixels

    pixels = np.array([[0, 17, 255]], np.int64)
    assert as_pixels(pixels, "x.npy").dtype == np.uint8
    with pytest.raises(DataError, match=r"values in \[-1, 255\]"):
        as_pixels(np.array([-1, 255]), "x.npy")
    with pytest.raises(DataError, match=r"\(x \* 255\)\.round\(\).*x\.round\(\)"):
        as_pixels(np.zeros(3, np.float32), "x.npy")


@pytest.mark.slow
def test_two_process_run_stopped_by_sigterm_saves_together_and_resumes_exactly(tmp_path):
    """A scheduler's SIGTERM to the launcher: both processes stop at one step, save, and resume exactly."""
    env = {**_env(tmp_path)}
    train = [
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
        "2",
        "--no-progress",
        "--json",
        "--checkpoint-every",
        "1000",
    ]
    w = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxnet", *train, "--workdir", str(w)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics, deadline = w / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("jaxnet: stopped by SIGTERM at step")]
    assert len(stops) >= 1 and "Traceback" not in err, err[-3000:]  # process 0 says it (each process may)
    assert len({line.split("at step ")[1].split(";")[0] for line in stops}) == 1  # the same step everywhere
    step = int(stops[0].split("at step ")[1].split(";")[0])
    assert step in steps_in(w)
    done = subprocess.run(
        [sys.executable, "-m", "jaxnet", *train, "--workdir", str(w), "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _strict(done.stdout.strip().splitlines()[-1])
    straight = subprocess.run(
        [sys.executable, "-m", "jaxnet", *train, "--workdir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed["resumed_from_step"] == step
    assert resumed["params_sha256"] == _strict(straight.stdout.strip().splitlines()[-1])["params_sha256"]


def _one_line(err: str, prefix: str = "jaxnet: error:") -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_cli_second_process_on_a_live_workdir_is_refused_and_the_first_unharmed(tmp_path):
    w = tmp_path / "w"
    args = [*TRAIN, "--epochs", "40", "--workdir", str(w), "--checkpoint-every", "20"]
    code, out, err = _jaxnet(tmp_path, *TRAIN, "--epochs", "40")
    reference = _strict(out.strip().splitlines()[-1])
    first = subprocess.Popen(
        [sys.executable, "-m", "jaxnet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and not (w / "config.json").is_file():
        time.sleep(0.01)  # it holds the lock; by the time the others start, it is saving checkpoints
    for extra in (("--resume",), ()):
        started = time.monotonic()
        code, _, err = _jaxnet(tmp_path, *args, *extra)
        line = _one_line(err)
        assert first.poll() is None, "the first run ended before the second started: make it longer"
        assert code == 2 and f"in use by PID {first.pid}" in line and "choose another --workdir" in line
        assert time.monotonic() - started < 60
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert _strict(out.strip().splitlines()[-1])["params_sha256"] == reference["params_sha256"]  # unharmed


def steps_in_safe(path) -> list[int]:
    folder = path / "checkpoints"
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


@pytest.mark.slow
def test_cli_checkpoint_folder_that_is_a_file_fails_at_once(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "checkpoints").write_text("not a folder")
    started = time.monotonic()
    code, _, err = _jaxnet(tmp_path, *TRAIN, "--workdir", str(w))
    assert code == 2 and time.monotonic() - started < 10 + 5  # + interpreter and JAX start-up
    assert "checkpoints" in _one_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_cli_full_or_read_only_disk_fails_at_once_with_one_line(tmp_path, fault):
    from tests.checkpoint.test_save_faults import _read_only, _tmpfs

    w = tmp_path / "w"
    if fault == "full":
        w.mkdir()
        context = _tmpfs(w, "600k")  # room for the run's small files, not for a checkpoint of its state
    else:
        (w / "checkpoints").mkdir(parents=True)
        context = _read_only(w / "checkpoints")
    with context:
        started = time.monotonic()
        code, _, err = _jaxnet(tmp_path, *TRAIN, "--workdir", str(w), timeout=120)
        seconds = time.monotonic() - started
        line = _one_line(err)
        assert code == 2 and seconds < 30, (seconds, err[-3000:])
        assert str(w) in line and ("No space left" in line or "Read-only" in line), line
        leftovers = [p.name for p in (w / "checkpoints").iterdir()] if (w / "checkpoints").is_dir() else []
        assert not [name for name in leftovers if "tmp" in name]  # the partial save was removed
