"""``jaxnet train --model cifar_speed``: airbench94's recipe from the command line, its refusals, its workdir.

One small run (a narrow net, 20 steps on a tiny CIFAR-10 in the official
layout, written here) serves every test that needs a trained model; the
refusals stop before any data is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest

from jaxnet.cli import build_parser, main
from jaxnet.cli import speedrun as cli_speedrun
from jaxnet.cli.train import _train_parser, print_summary
from jaxnet.data import cifar
from tests.cli.helpers import COMMON, one_line_error, run_main
from tests.data.builders import META, cifar_pickle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PER_BATCH, TEST_IMAGES = 100, 100  # 5 training batches: 500 images
SMALL = [
    "--model",
    "cifar_speed",
    "--epochs",
    "2",
    "--batch-size",
    "50",
    "--eval-batch-size",
    "100",
    "--model-kwargs",
    '{"widths": [8, 16, 16]}',
]
SUMMARY_KEYS = (
    "model",
    "dataset_source",
    "epochs",
    "steps",
    "train_seconds",
    "tta_seconds",
    "tta_level",
    "test_accuracy",
    "test_accuracy_no_tta",
    "final_loss",
    "epoch_losses",
    "params_sha256",
)


def write_tiny_cifar(root: pathlib.Path, seed: int = 0) -> None:
    """``root/cifar10/cifar-10-batches-py/`` with 500 training and 100 test images, each class its own colour."""
    folder = root / "cifar10" / cifar.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, (10, 3))
    for batch in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH):
        n = TEST_IMAGES if batch == cifar.TEST_BATCH else PER_BATCH
        labels = rng.integers(0, 10, n)
        noisy = palette[labels][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3))
        images = np.clip(noisy, 0, 255).astype(np.uint8)
        content = {
            b"batch_label": batch.encode(),
            b"labels": labels.tolist(),
            b"data": images.transpose(0, 3, 1, 2).reshape(n, -1),  # the official (N, 3072) channel-major rows
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / batch).write_bytes(cifar_pickle(content, "p4"))
    (folder / cifar.META).write_bytes(cifar_pickle(META, "p4"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("data")
    write_tiny_cifar(root)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[dict, pathlib.Path, str]:
    """One small run with ``--workdir``: ``(the --json summary, the workdir, stderr)``."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *SMALL, "--data-dir", str(data_dir), "--workdir", str(workdir), *COMMON])
    assert code == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue().strip().splitlines()[-1]), workdir, err.getvalue()


def test_small_run_trains_and_reports_the_recipes_numbers(trained, data_dir):
    summary, _, _ = trained
    assert all(key in summary for key in SUMMARY_KEYS), sorted(summary)
    assert summary["model"] == "cifar_speed" and str(data_dir) in summary["dataset_source"]
    assert summary["epochs"] == 2.0 and summary["steps"] == 2 * (5 * PER_BATCH // 50)
    assert summary["tta_level"] == 2 and summary["widths"] == [8, 16, 16] and summary["precision"] == "fp32"
    for key in ("test_accuracy", "test_accuracy_no_tta"):  # chance is 0.1; each class has its own colour
        assert 0.2 < summary[key] <= 1.0, summary[key]
    first, last = summary["epoch_losses"]
    assert np.isfinite([first, last]).all() and last < first, summary["epoch_losses"]
    assert summary["final_loss"] == last
    assert summary["train_seconds"] > 0 and summary["tta_seconds"] > 0 and summary["compilations"] > 0


def test_human_summary_has_the_tta_accuracy_line(trained, capsys):
    summary, _, _ = trained
    print_summary(summary, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert f"test accuracy: {100 * summary['test_accuracy']:.2f}%" in lines
    assert f"test accuracy without TTA: {100 * summary['test_accuracy_no_tta']:.2f}%" in lines
    assert lines[1].startswith("2.0 epochs, 20 steps in ") and "TTA level 2" in lines[1]


def test_workdir_exports_the_trained_model(trained, data_dir, tmp_path, capsys):
    from jaxnet.data import load_dataset
    from jaxnet.export import load_exported

    summary, workdir, _ = trained
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == "cifar_speed" and config["recipe"]["widths"] == [8, 16, 16]
    out = tmp_path / "model.jaxexport"
    assert main(["export", "--workdir", str(workdir), "--out", str(out), "--platforms", "cpu"]) == 0
    capsys.readouterr()
    assert load_exported(out).info["metadata"]["params_sha256"] == summary["params_sha256"]
    test = load_dataset("cifar10", data_dir=data_dir, download=False)
    np.save(tmp_path / "test.npy", test.test_images)
    code, predictions, err = run_main(capsys, "predict", "--model", str(out), str(tmp_path / "test.npy"), "--json")
    assert code == 0, err
    classes = [p["class"] for p in predictions["predictions"]]
    # the exported forward function is the trained net's: its accuracy is the run's own, without TTA
    assert np.mean(np.asarray(classes) == test.test_labels) == pytest.approx(summary["test_accuracy_no_tta"])


def test_a_workdir_holding_a_run_is_refused(trained, data_dir, capsys):
    _, workdir, _ = trained
    code, _, err = run_main(capsys, "train", *SMALL, "--data-dir", str(data_dir), "--workdir", str(workdir), *COMMON)
    one_line_error(code, err, f"the workdir {workdir} already holds a run", "choose another --workdir")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--optimizer", "adam"], ["the recipe fixes its optimizer and schedule", "drop --optimizer"]),
        (["--lr", "0.1"], ["SpeedrunRecipe.lr = 11.5 per 1024 examples", "drop --lr"]),
        (
            ["--momentum", "0.9", "--scan", "--val-split", "0.1", "--loss", "mse"],
            ["drop --momentum;", "drop --scan", "drop --val-split", "drop --loss"],
        ),
        (["--no-normalize", "--augment"], ["the recipe fixes its preprocessing", "drop --normalize, --augment"]),
        (["--grad-accum", "2", "--devices", "2", "--fsdp"], ["drop --grad-accum;", "drop --devices, --fsdp"]),
        (["--resume", "--workdir", "w", "--keep-checkpoints", "5"], ["cannot be resumed", "drop --resume, --keep"]),
        (["--on-nan", "continue"], ["drop --on-nan"]),
        (["--precision", "fp16"], ["--precision fp16 does not apply to --model cifar_speed", "fp32 or bf16"]),
        (["--dataset", "mnist"], ["trains on CIFAR-10", "not --dataset mnist"]),
        (["--model-kwargs", '{"depth": 3}'], ["takes only widths", "drop depth"]),
        (["--model-kwargs", '{"widths": [8, 16]}'], ["widths must be three positive integers", "[8, 16]"]),
    ],
)
def test_flags_of_other_recipes_are_refused_by_name(flags, needles, capsys):
    code, _, err = run_main(capsys, "train", "--model", "cifar_speed", *flags, *COMMON)
    one_line_error(code, err, "jaxnet: error:", *needles)


def test_a_config_file_flag_counts_as_given(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('model = "cifar_speed"\nschedule = "cosine"\n')
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "run.toml"), *COMMON)
    one_line_error(code, err, "the recipe fixes its optimizer and schedule", "drop --schedule")


def test_tta_is_refused_for_other_models(capsys):
    code, _, err = run_main(capsys, "train", "--model", "mlp", "--tta", "1", *COMMON)
    one_line_error(code, err, "--tta applies to --model cifar_speed only", "drop it")


def test_flags_map_onto_the_recipe():
    from jaxnet.speedrun import SpeedrunRecipe

    parser = build_parser()
    recipe = cli_speedrun.speedrun_recipe(parser.parse_args(["train", "--model", "cifar_speed"]))
    assert recipe == SpeedrunRecipe(eval_batch_size=1000)  # the recipe's own settings; --eval-batch-size's default
    assert recipe.epochs == 9.9 and recipe.tta_level == 2 and recipe.widths == (64, 256, 256)
    argv = ["train", "--model", "cifar_speed", "--epochs", "3", "--batch-size", "256", "--eval-batch-size", "500"]
    argv += ["--tta", "1", "--precision", "bf16", "--seed", "7", "--model-kwargs", '{"widths": [32, 64, 64]}']
    recipe = cli_speedrun.speedrun_recipe(parser.parse_args(argv))
    assert (recipe.epochs, recipe.batch_size, recipe.eval_batch_size) == (3.0, 256, 500)
    assert (recipe.tta_level, recipe.precision, recipe.widths) == (1, "bf16", (32, 64, 64))


def test_every_train_flag_is_taken_or_refused_with_a_reason():
    dests = {a.dest for a in _train_parser(build_parser())._actions} - {"help"}
    refused = [d for _, group in cli_speedrun.REFUSED_FLAGS for d in group]
    assert len(refused) == len(set(refused)) and not set(refused) & set(cli_speedrun.TAKEN_FLAGS)
    assert dests == set(cli_speedrun.TAKEN_FLAGS) | set(refused)


def test_help_lists_cifar_speed_and_tta(capsys):
    from jaxnet.models import MODELS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cifar_speed" in MODELS and f"--model MODEL a jaxnet model ({', '.join(MODELS)})" in text
    assert "--tta {0,1,2} --model cifar_speed only" in text and "(default: 2, the recipe's)" in text
