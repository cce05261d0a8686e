"""The command line as a user meets it: help, the main job, and one-line errors."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from jaxnet.cli import build_parser, main
from tests.helpers import run_jaxnet as run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_main_job_json_summary_on_embedded_sample(tmp_path):
    proc = run_cli(
        "train",
        "--no-download",
        "--epochs",
        "1",
        "--json",
        "--workdir",
        str(tmp_path / "w"),
        env={"XDG_CACHE_HOME": str(tmp_path / "empty-cache"), "JAXNET_DATA_DIR": ""},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("test_accuracy", "epochs", "steps", "train_seconds", "num_devices", "dataset_source"):
        assert key in summary
    assert summary["epochs"] == 1 and summary["steps"] == 6000 // 64
    assert summary["num_devices"] == 1
    assert "embedded MNIST sample" in summary["dataset_source"]
    assert "embedded MNIST sample" in proc.stderr  # the user is told
    assert summary["test_accuracy"] > 0.85
    assert (tmp_path / "w" / "metrics.jsonl").exists()


def test_real_data_dir_is_used(shared_data, tmp_path):
    proc = run_cli(
        "train",
        "--model",
        "mlp128",
        "--data-dir",
        str(shared_data),
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--json",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert str(shared_data / "mnist") in summary["dataset_source"]
    assert summary["steps"] == 60000 // 512


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["--optimizer", "lion"], "invalid choice: 'lion'"),
        (["--epochs", "0"], "expected a positive integer, got 0"),
        (["--batch-size", "many"], "expected a positive integer, got 'many'"),
        (["--lr", "-1"], "expected a finite number >= 0"),
        (["--dataset", "imagenet"], "unknown data set 'imagenet'"),
    ],
)
def test_bad_values_give_one_line_errors(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = main(["train", "--no-download", *args])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_empty_data_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "mnist").mkdir()
    proc = run_cli("train", "--data-dir", str(tmp_path), "--epochs", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("jaxnet: error:")
    assert str(tmp_path) in lines[-1] and "train-images-idx3-ubyte" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_truncated_idx_file_names_the_file(shared_data, tmp_path):
    mnist = tmp_path / "mnist"
    shutil.copytree(shared_data / "mnist", mnist)
    path = mnist / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 3], compresslevel=1))
    proc = run_cli("train", "--data-dir", str(tmp_path), "--epochs", "1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "train-images-idx3-ubyte.gz" in last and "jaxnet: error:" in last


def test_wrong_model_for_data_is_a_one_line_error(capsys):
    code = main(["train", "--model", "cifar_cnn", "--dataset", "mnist", "--no-download", "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot take mnist inputs of shape (28, 28, 1)" in err
    assert "Traceback" not in err


def test_parser_defaults_follow_the_recipe():
    args = build_parser().parse_args(["train"])
    assert args.model == "mlp" and args.epochs is None and args.optimizer is None


def test_every_model_has_a_recipe():
    from jaxnet.models import MODELS
    from jaxnet.recipes import RECIPES

    assert sorted(RECIPES) == sorted(MODELS)
    for name, recipe in RECIPES.items():
        assert recipe.dataset == MODELS[name].default_dataset
