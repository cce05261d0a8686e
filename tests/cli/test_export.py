"""``jaxnet export`` and ``jaxnet predict`` (jaxnet.cli.export): a run's workdir to a file, and predictions."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import workdir as W
from jaxnet.cli import build_parser
from jaxnet.data.transforms import make_image_transform
from jaxnet.errors import ConfigError
from jaxnet.export import load_exported
from jaxnet.step import make_predict_fn
from tests.export.helpers import MNIST_MEAN, MNIST_STD, random_images, trained_state


def _parser() -> argparse.ArgumentParser:
    return build_parser(("export", "predict"))


@pytest.fixture
def workdir(tmp_path):
    """A run's workdir as jaxnet train leaves it: config.json and checkpoints at steps 10 and 20."""
    spec, graphdef, state = trained_state("mlp128")
    work = tmp_path / "run"
    W.check_workdir(
        work,
        {"model": "mlp128", "dataset": "mnist", "mean": list(MNIST_MEAN), "std": list(MNIST_STD), "seed": 0},
        resume=False,
    )
    ckpt = C.create_checkpoint_manager(W.checkpoint_directory(work), best_metric=C.DEFAULT_BEST_METRIC)
    C.save(ckpt, 10, state, meta={}, metrics={"test_accuracy": 0.9})
    later = state.replace(params=jax.tree.map(lambda p: p * 1.5, state.params))
    C.save(ckpt, 20, later, meta={}, metrics={"test_accuracy": 0.8})
    C.close(ckpt)
    return work, graphdef, {10: state, 20: later}


@pytest.mark.parametrize("step, expected", [("best", 10), ("latest", 20), ("20", 20)])
def test_cli_export_then_predict(workdir, tmp_path, capsys, step, expected):
    work, graphdef, states = workdir
    out = tmp_path / "model.jaxexport"
    args = _parser().parse_args(["export", "--workdir", str(work), "--out", str(out), "--step", step])
    assert args.func(args) is None
    assert f"checkpoint step {expected}" in capsys.readouterr().out
    model = load_exported(out)
    assert model.info["metadata"]["step"] == expected
    assert model.info["metadata"]["params_sha256"] == C.params_sha256(states[expected].params)
    images = random_images((28, 28, 1), n=5, seed=3)
    live = make_predict_fn(graphdef, transform=make_image_transform(MNIST_MEAN, MNIST_STD))
    np.testing.assert_array_equal(model(images), np.asarray(live(states[expected], images)))
    np.save(tmp_path / "five.npy", images)
    args = _parser().parse_args(["predict", "--model", str(out), str(tmp_path / "five.npy")])
    args.func(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    expected_classes = np.argmax(model(images), axis=-1)
    for i, line in enumerate(lines):
        name, cls, prob = line.split("\t")
        assert name == f"{tmp_path / 'five.npy'}[{i}]" and int(cls) == expected_classes[i] and 0 < float(prob) <= 1
    args = _parser().parse_args(["predict", "--json", "--model", str(out), str(tmp_path / "five.npy")])
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert [p["class"] for p in report["predictions"]] == expected_classes.tolist()


def test_cli_export_errors(workdir, tmp_path):
    work, _, _ = workdir
    parser = _parser()
    with pytest.raises(C.CheckpointError, match=r"no checkpoint step 99 .*available: \[10, 20\]"):
        args = parser.parse_args(["export", "--workdir", str(work), "--out", str(tmp_path / "m"), "--step", "99"])
        args.func(args)
    with pytest.raises(ConfigError, match="holds no jaxnet run"):
        args = parser.parse_args(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "m")])
        args.func(args)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="cannot write --out"):
        args = parser.parse_args(["export", "--workdir", str(work), "--out", str(tmp_path / "file.txt" / "m")])
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--workdir", str(work), "--out", "m", "--step", "newest"])
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--workdir", str(work), "--out", "m", "--platforms", "cpu,metal"])
