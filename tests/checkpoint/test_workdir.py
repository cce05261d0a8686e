"""Tests of jaxnet.checkpoint.workdir: one run per workdir, clear refusals, logs rewound on resume."""

from __future__ import annotations

import json
import pathlib

import pytest

from jaxnet.checkpoint import workdir as W
from jaxnet.errors import ConfigError, DataError


def _all_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CONFIG = {"model": "mlp128", "dataset": "mnist", "lr": 0.001, "seed": 0, "epochs": 2}


def test_fresh_workdir_records_the_config(tmp_path):
    workdir = tmp_path / "run"
    assert W.check_workdir(workdir, CONFIG, resume=False) == workdir
    assert W.read_config(workdir) == CONFIG
    (workdir / "checkpoints" / "7").mkdir(parents=True)  # its first checkpoint
    W.check_workdir(workdir, CONFIG, resume=True)  # the same run continues


def test_another_run_in_the_same_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    W.check_workdir(workdir, CONFIG, resume=False)
    (workdir / "checkpoints" / "7").mkdir(parents=True)
    (workdir / "checkpoints" / "7" / "x").write_text("data")
    before = _all_files(workdir)
    other = {**CONFIG, "model": "convnet"}
    for resume in (False, True):
        with pytest.raises(ConfigError) as info:
            W.check_workdir(workdir, other, resume=resume)
        message = str(info.value)
        assert "model: 'mlp128' in the saved run, 'convnet' now" in message
        assert "another --workdir" in message and "dataset" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="already holds this run; pass --resume"):
        W.check_workdir(workdir, CONFIG, resume=False)
    assert _all_files(workdir) == before  # nothing lost or rewritten


def test_mutable_keys_may_change_on_resume(tmp_path):
    workdir = tmp_path / "run"
    W.check_workdir(workdir, CONFIG, resume=False)
    (workdir / "checkpoints" / "7").mkdir(parents=True)
    longer = {**CONFIG, "epochs": 4}
    with pytest.raises(ConfigError, match="epochs: 2 in the saved run, 4 now"):
        W.check_workdir(workdir, longer, resume=True)
    W.check_workdir(workdir, longer, resume=True, mutable_keys=("epochs",))
    assert W.read_config(workdir)["epochs"] == 4


def test_missing_workdir_with_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot resume: the workdir .*absent does not exist"):
        W.check_workdir(tmp_path / "absent", CONFIG, resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no jaxnet run"):
        W.check_workdir(tmp_path / "empty", CONFIG, resume=True)
    assert not (tmp_path / "absent").exists()


def test_unwritable_workdir(tmp_path):
    # Tests may run as root, where chmod does not stop writes; a path under a
    # regular file cannot be created by anyone.
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cannot write to the workdir .*file.txt/sub: Not a directory"):
        W.check_workdir(tmp_path / "file.txt" / "sub", CONFIG, resume=False)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        W.check_workdir(tmp_path / "file.txt", CONFIG, resume=False)
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_damaged_config_is_named(tmp_path):
    W.check_workdir(tmp_path, CONFIG, resume=False)
    (tmp_path / W.CONFIG_FILE).write_text("{not json")
    with pytest.raises(DataError, match="config.json is damaged"):
        W.check_workdir(tmp_path, CONFIG, resume=True)


def test_rewind_jsonl(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (5, 10, 15, 20)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 25, "spl')
    assert W.rewind_jsonl(log, 10) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:2]
    assert W.rewind_jsonl(log, 10) == 0
    assert W.rewind_jsonl(tmp_path / "absent.jsonl", 3) == 0


def test_resumable_keys_are_named_when_another_change_is_refused(tmp_path):
    assert W.RESUMABLE_KEYS == ("epochs",)
    workdir = tmp_path / "run"
    W.check_workdir(workdir, CONFIG, resume=False)
    (workdir / "checkpoints" / "7").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        W.check_workdir(workdir, {**CONFIG, "lr": 0.01, "seed": 1}, resume=True, mutable_keys=W.RESUMABLE_KEYS)
    message = str(info.value)
    assert "lr: 0.001 in the saved run, 0.01 now" in message and "seed: 0 in the saved run, 1 now" in message
    assert "only epochs may change on resume" in message and "\n" not in message
    W.check_workdir(workdir, {**CONFIG, "epochs": 5}, resume=True, mutable_keys=W.RESUMABLE_KEYS)


def test_has_checkpoint_counts_finished_steps_only(tmp_path):
    assert not W.has_checkpoint(tmp_path)
    folder = tmp_path / "checkpoints"
    (folder / "7.orbax-checkpoint-tmp-123").mkdir(parents=True)  # a save cut short
    (folder / "corrupt" / "5").mkdir(parents=True)  # a damaged step moved aside
    assert not W.has_checkpoint(tmp_path)
    (folder / "14").mkdir()
    assert W.has_checkpoint(tmp_path)


def test_run_stopped_before_its_first_checkpoint(tmp_path, caplog):
    workdir = tmp_path / "run"
    W.check_workdir(workdir, CONFIG, resume=False)  # the run crashed here, before saving anything
    (workdir / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)
    before = _all_files(workdir)
    for config in (CONFIG, {**CONFIG, "lr": 0.1}):  # a fresh run, the same or another
        with pytest.raises(ConfigError) as info:
            W.check_workdir(workdir, config, resume=False)
        message = str(info.value)
        assert "stopped before its first checkpoint" in message and "--resume" in message
        assert "remove the folder or choose another --workdir" in message and "\n" not in message
        assert ("lr: 0.001 in the saved run, 0.1 now" in message) == (config is not CONFIG)
    with pytest.raises(
        ConfigError,
        match=r"stopped before its first checkpoint.*and it had other settings "
        r"\(lr: 0.001 in the saved run, 0.1 now\).*remove the folder",
    ):
        W.check_workdir(workdir, {**CONFIG, "lr": 0.1}, resume=True, mutable_keys=W.RESUMABLE_KEYS)
    with pytest.raises(ConfigError, match=r"nothing to resume from\. Start it over with --resume-or-start"):
        W.check_workdir(workdir, CONFIG, resume=True, mutable_keys=W.RESUMABLE_KEYS)
    assert _all_files(workdir) == before
    (workdir / "metrics.jsonl").write_text('{"step": 3}\n')  # the stale logs of the attempt
    (workdir / "tensorboard").mkdir()
    with caplog.at_level("INFO", logger="jaxnet.checkpoint.workdir"):
        W.check_workdir(workdir, CONFIG, resume="auto", mutable_keys=W.RESUMABLE_KEYS)  # starts it over
    assert "starting it over from step 0" in caplog.text
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "tensorboard").exists()
    with pytest.raises(ConfigError, match="resume must be"):
        W.check_workdir(workdir, CONFIG, resume="yes")
