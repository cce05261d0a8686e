"""The command line's argument types (jaxnet.cli.converters): what each takes, and how it refuses the rest."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from jaxnet.cli import converters as C
from jaxnet.precision import PRECISIONS


@pytest.mark.parametrize(
    ("convert", "text", "value"),
    [
        (C.positive_int, "64", 64),
        (C.nonnegative_float, "0", 0.0),
        (C.nonnegative_float, "1e-3", 1e-3),
        (C.positive_float, "0.5", 0.5),
        (C.fraction, "0.1", 0.1),
        (C.seed, "0", 0),
        (C.seed, str(2**32 - 1), 2**32 - 1),
        (C.port, "12355", 12355),
        (C.json_object, '{"width": 128}', {"width": 128}),
        (C.name_list, "torch-eager, jax-jit,", ["torch-eager", "jax-jit"]),
        (C.positive_int_list, "64,512", [64, 512]),
        (C.checkpoint_step, "best", "best"),
        (C.checkpoint_step, "latest", "latest"),
        (C.checkpoint_step, "0", 0),
        (C.platform_list, "cpu, cuda", ("cpu", "cuda")),
        (C.model_spec, "mlp", "mlp"),
        (C.model_spec, "mypkg.nets:build", "mypkg.nets:build"),
    ],
)
def test_each_converter_takes_its_values(convert, text, value):
    assert convert(text) == value and type(convert(text)) is type(value)


@pytest.mark.parametrize(
    ("convert", "text", "message"),
    [
        (C.positive_int, "0", "expected a positive integer, got 0"),
        (C.positive_int, "many", "expected a positive integer, got 'many'"),
        (C.nonnegative_float, "-1", "expected a finite number >= 0, got -1"),
        (C.nonnegative_float, "inf", "expected a finite number >= 0, got inf"),
        (C.nonnegative_float, "nan", "expected a finite number >= 0, got nan"),
        (C.nonnegative_float, "x", "expected a number, got 'x'"),
        (C.positive_float, "0", "expected a number > 0, got 0"),
        (C.fraction, "1", "expected a fraction strictly between 0 and 1 (e.g. 0.1), got 1"),
        (C.fraction, "a tenth", "expected a fraction such as 0.1, got 'a tenth'"),
        (C.seed, "-1", "expected a seed in [0, 4294967295], got -1"),
        (C.seed, "1.5", "expected an integer seed, got '1.5'"),
        (C.port, "70000", "expected a port number in [1, 65535], got 70000"),
        (C.json_object, "[1, 2]", "expected a JSON object such as '{\"width\": 128}', got '[1, 2]'"),
        (C.json_object, "{width: 1}", "expected a JSON object"),
        (C.positive_int_list, "64,big", "expected comma-separated integers like 64,512; got '64,big'"),
        (C.positive_int_list, "64,0", "expected positive integers like 64,512; got '64,0'"),
        (C.positive_int_list, ",", "expected positive integers like 64,512"),
        (C.checkpoint_step, "newest", "expected 'best', 'latest' or a step number, got 'newest'"),
        (C.checkpoint_step, "-3", "expected a step number >= 0, got -3"),
        (C.platform_list, "cpu,metal", "unknown platform(s) ['metal']; choose from cpu, cuda, rocm, tpu"),
        (C.platform_list, ",", "unknown platform(s) ','"),
        (C.model_spec, "resnet", "invalid choice: 'resnet' (choose from cifar_cnn, "),
        (C.model_spec, "resnet", ", mlp, mlp128, mlp512, or your own model as package.module:factory)"),
    ],
)
def test_each_converter_names_what_it_expected(convert, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        convert(text)
    assert message in str(info.value)


def test_platforms_are_those_jax_export_lowers_for():
    from jaxnet.export import PLATFORMS

    assert C.platform_list(",".join(PLATFORMS)) == PLATFORMS


def test_help_formatter_states_each_default_once():
    parser = argparse.ArgumentParser(prog="x", formatter_class=C.HelpFormatter)
    parser.add_argument("--a", default=3, help="shown")
    parser.add_argument("--b", default=None, help="none")
    parser.add_argument("--c", action="store_true", help="a switch")
    parser.add_argument("--d", default="fp32", help="its own (default: fp32)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="compute dtype")
    text = " ".join(parser.format_help().split())
    assert "shown (default: 3)" in text and "none" in text and "(default: None)" not in text
    assert "a switch (default: False)" not in text and text.count("(default: fp32)") == 2


def test_a_bad_value_on_the_command_line_is_one_usage_error():
    parser = argparse.ArgumentParser(prog="jaxnet")
    parser.add_argument("--epochs", type=C.positive_int)
    err = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err):
        parser.parse_args(["--epochs", "0"])
    assert info.value.code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        "jaxnet: error: argument --epochs: expected a positive integer, got 0"
    )
