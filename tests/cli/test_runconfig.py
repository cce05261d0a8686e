"""``jaxnet train --config FILE.toml`` and the recorded run config (jaxnet.cli.runconfig)."""

from __future__ import annotations

import dataclasses

import pytest

from jaxnet.cli import build_parser, parse_train_args
from jaxnet.cli.runconfig import RunConfig
from jaxnet.cli.train import OPERATIONAL_FLAGS, _train_parser
from tests.cli.helpers import COMMON, one_line_error, run_main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_config_file_parsing(tmp_path):
    parser = build_parser()
    (tmp_path / "a.toml").write_text(
        'model = "tests_pkg.mod:factory"\nbatch_size = 32\nval-split = 0.2\n'
        'augment = true\nlr = 1\nschedule = "cosine"\n[model_kwargs]\nwidth = 8\n'
    )
    argv = ["train", "--config", str(tmp_path / "a.toml"), "--no-augment", "--schedule", "step"]
    args = parse_train_args(parser, argv, parser.parse_args(argv))
    assert (args.model, args.batch_size, args.val_split, args.model_kwargs) == (
        "tests_pkg.mod:factory",
        32,
        0.2,
        {"width": 8},
    )
    assert args.augment is False and args.schedule == "step" and args.lr == 1.0 and isinstance(args.lr, float)
    argv = ["train", "--epochs", "3"]  # no --config: the recipe's defaults
    assert parse_train_args(parser, argv, parser.parse_args(argv)).batch_size is None


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "learning_rate = 0.1\n",
            ["unknown key 'learning_rate'", "valid keys are:", "lr", "model_kwargs", "val_split"],
        ),
        ('epochs = "five"\n', ["epochs = 'five' is a string, expected an integer"]),
        ("lr = true\n", ["lr = True is true or false, expected a number"]),
        ("epochs = 0\n", ["epochs = 0: expected a positive integer, got 0"]),
        ("val_split = 1.5\n", ["val_split = 1.5: expected a fraction strictly between 0 and 1"]),
        ('optimizer = "lion"\n', ["optimizer = 'lion'; expected one of sgd, adam"]),
        ("model_kwargs = 3\n", ["model_kwargs = 3 is an integer, expected a table"]),
        ("[model_kwargs]\nwhen = 1979-05-27\n", ["model_kwargs holds a value JSON cannot record"]),
        ("lr = \n", ["is not valid TOML"]),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, needles):
    (tmp_path / "bad.toml").write_text(text)
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "bad.toml"), *COMMON)
    one_line_error(code, err, str(tmp_path / "bad.toml"), *needles)


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "absent.toml"))
    one_line_error(code, err, "absent.toml: no such file")


def test_every_train_flag_is_recorded_or_operational():
    dests = {a.dest for a in _train_parser(build_parser())._actions} - {"help"}
    recorded = {f.name for f in dataclasses.fields(RunConfig)}
    derived = {"output", "input_shape", "input_dtype", "mean", "std"}  # from the data and the loss
    assert dests == (recorded - derived) | set(OPERATIONAL_FLAGS)


def test_the_old_module_path_is_the_same_module_with_its_names():
    import jaxnet.cli.runconfig
    import jaxnet.runconfig

    assert jaxnet.runconfig is jaxnet.cli.runconfig
    for name in (
        "RunConfig",
        "read_config_file",
        "HelpFormatter",
        "positive_int",
        "nonnegative_float",
        "positive_float",
        "fraction",
        "seed",
        "SEED_MAX",
        "json_object",
        "LOSSES",
        "LOSS_OF_OUTPUT",
        "CLASSIFIER_OUTPUTS",
        "VALUE_OUTPUTS",
    ):
        assert hasattr(jaxnet.runconfig, name), name
