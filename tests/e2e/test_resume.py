"""End to end: ``jaxnet train --workdir W --resume`` after SIGKILLs ends bit-identical.

A small model trains for 2 epochs on the embedded MNIST sample, once without
interruption and once killed with SIGKILL at least 5 times -- some kills
while a checkpoint is being written, some at random moments -- and resumed
with ``--resume`` after each. The final ``params_sha256``, the metrics log
and the TensorBoard scalars must be identical. Also: a damaged latest
checkpoint is skipped (and said so), and wrong, missing or unwritable
workdirs get one-line errors without losing anything.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.helpers import one_line_error as _one_line_error
from tests.helpers import offline_env as _env

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TRAIN = [
    "train",
    "--model",
    "mlp128",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--checkpoint-every",
    "7",
    "--json",
    "--no-download",
    "--no-progress",
]
VOLATILE = ("seconds", "time", "compil", "rss")  # keys whose values differ between identical runs
TMP_MARK = ".orbax-checkpoint-tmp"


def _start(workdir: pathlib.Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jaxnet", *TRAIN, "--workdir", str(workdir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _tmp_dirs(workdir: pathlib.Path) -> set[str]:
    """Unfinished saves: the names of Orbax's temporary step folders."""
    folder = workdir / "checkpoints"
    return {p.name for p in folder.iterdir() if TMP_MARK in p.name} if folder.is_dir() else set()


def _stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(word in k for word in VOLATILE)} for r in records]


def _metrics(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return _stable([json.loads(line) for line in lines])


def _scalars(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not any(word in tag for word in VOLATILE)
    }


def _tree(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (workdir, summary, seconds)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    workdir = tmp_path / "w"
    t0 = time.monotonic()
    code, out, err = _finish(_start(workdir, _env(tmp_path)))
    assert code == 0, err[-3000:]
    summary = _summary(out)
    assert summary["steps"] == 2 * (6000 // 128)
    assert len(summary["params_sha256"]) == 64
    return workdir, summary, time.monotonic() - t0


def _wait_for_new_saves(proc: subprocess.Popen, workdir: pathlib.Path, old: set[str], count: int) -> None:
    """Polls until ``proc`` has started ``count`` saves (temporary step folders) not in ``old``."""
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and len(seen) < count:
        seen.update(_tmp_dirs(workdir) - old)
        time.sleep(0.0005)


# Where each kill lands. "save": while this process's second checkpoint is being
# written (the first is complete, so the run advances); "startup": while Python,
# JAX and the data load; "epoch_end": right after the end-of-epoch-1 checkpoint is
# committed (the epoch's log records must already be on disk); "training": a
# random moment after the first checkpoint of this process, i.e. in a step, an
# evaluation, a log write or a save.
KILL_PLAN = ("save", "startup", "save", "epoch_end", "save", "training")
EPOCH_END = 6000 // 128  # the step of the end-of-epoch-1 checkpoint


def test_sigkill_and_resume_is_bit_identical(reference, tmp_path):
    ref_workdir, ref_summary, _ = reference
    env, workdir, rng = _env(tmp_path), tmp_path / "w", random.Random(0)
    kills_during_save = 0
    for attempt, where in enumerate(KILL_PLAN):
        resume = ("--resume",) if (workdir / "config.json").is_file() else ()
        leftovers = _tmp_dirs(workdir)  # from earlier kills, not this process's saves
        proc = _start(workdir, env, *resume)
        if where == "save":
            _wait_for_new_saves(proc, workdir, leftovers, 2)
        elif where == "startup":
            time.sleep(rng.uniform(0.2, 1.5))
        elif where == "epoch_end":
            assert not (workdir / "checkpoints" / str(EPOCH_END)).exists(), "the run went too far"
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if (workdir / "checkpoints" / str(EPOCH_END)).is_dir():
                    break
                time.sleep(0.0005)
        else:
            _wait_for_new_saves(proc, workdir, leftovers, 1)
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        code, _, err = _finish(proc)
        # A signal from elsewhere (e.g. SIGTERM on a shared machine) is a kill too.
        assert code < 0, f"kill {attempt + 1} ({where}) came too late: the run exited with {code}\n{err[-3000:]}"
        kills_during_save += bool(_tmp_dirs(workdir) - leftovers)  # a save was cut short
    assert kills_during_save >= 2, f"only {kills_during_save} of the kills hit a save"

    code, out, err = _finish(_start(workdir, env, "--resume"))
    assert code == 0, err[-3000:]
    summary = _summary(out)
    resumed = re.search(r"resuming from checkpoint step (\d+)", err)
    assert resumed and int(resumed.group(1)) >= 7, err[-3000:]  # it continued, not restarted
    assert summary["params_sha256"] == ref_summary["params_sha256"]
    assert summary["steps"] == ref_summary["steps"]
    assert {k: v for k, v in summary.items() if k.startswith("test_")} == {
        k: v for k, v in ref_summary.items() if k.startswith("test_")
    }
    assert _metrics(workdir) == _metrics(ref_workdir)  # no gaps, no duplicates, same numbers
    assert _scalars(workdir) == _scalars(ref_workdir)  # TensorBoard: same points, none twice


def test_resume_skips_a_damaged_checkpoint_and_says_so(reference, tmp_path):
    import shutil

    ref_workdir, ref_summary, _ = reference
    workdir = tmp_path / "w"
    shutil.copytree(ref_workdir, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last = workdir / "checkpoints" / str(steps[-1])
    victim = max((p for p in last.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, err = _finish(_start(workdir, _env(tmp_path), "--resume"))
    assert code == 0, err[-3000:]
    assert f"skipping checkpoint step {steps[-1]}" in err and victim.name in err
    assert f"resuming from checkpoint step {steps[-2]}" in err
    assert err.count(f"skipping checkpoint step {steps[-1]}") == 1, err[-3000:]  # one notice, not two
    assert _summary(out)["params_sha256"] == ref_summary["params_sha256"]
    assert (workdir / "checkpoints" / "corrupt" / str(steps[-1])).is_dir()  # kept, not deleted
    assert _metrics(workdir) == _metrics(ref_workdir)


def test_workdir_errors_are_one_line_and_lose_nothing(reference, tmp_path):
    ref_workdir, _, _ = reference
    env = _env(tmp_path)
    before = _tree(ref_workdir)
    other = [*TRAIN, "--workdir", str(ref_workdir)]
    other[other.index("mlp128")] = "mlp512"
    proc = subprocess.run([sys.executable, "-m", "jaxnet", *other], capture_output=True, text=True, env=env)
    _one_line_error(proc.returncode, proc.stderr, "mlp128", "mlp512", "another --workdir")
    proc = subprocess.run([sys.executable, "-m", "jaxnet", *other, "--resume"], capture_output=True, text=True, env=env)
    _one_line_error(proc.returncode, proc.stderr, "mlp128", "mlp512")
    assert _tree(ref_workdir) == before

    code, _, err = _finish(_start(tmp_path / "absent", env, "--resume"))
    _one_line_error(code, err, "absent", "does not exist")
    assert not (tmp_path / "absent").exists()

    (tmp_path / "file.txt").write_text("x")
    code, _, err = _finish(_start(tmp_path / "file.txt" / "sub", env))
    _one_line_error(code, err, "file.txt", "writable --workdir")
