"""The ``jaxnet`` entry point (jaxnet.cli): one parser family, every --help, and the logging it sets up."""

from __future__ import annotations

import io
import logging
import re

import pytest

from jaxnet.cli import COMMANDS, build_parser, main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_help_lists_commands_and_train_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--dataset",
        "--data-dir",
        "--epochs",
        "--batch-size",
        "--optimizer",
        "--lr",
        "--seed",
        "--workdir",
        "--json",
    ):
        assert flag in out


def test_main_prints_each_notice_once_and_leaves_logging_as_it_was(tmp_path, capsys, monkeypatch):
    # Importing Orbax makes absl call logging.basicConfig(); jaxnet's notices
    # must not reach that root handler too, and main() must not leave its
    # handler behind for the program (or test) that called it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached: the embedded sample's notice
    root_stream = io.StringIO()
    root_handler = logging.StreamHandler(root_stream)
    logging.root.addHandler(root_handler)
    log = logging.getLogger("jaxnet")
    before = (log.level, log.propagate, list(log.handlers))
    try:
        code = main(
            ["train", "--model", "mlp128", "--epochs", "1", "--batch-size", "500", "--no-download", "--no-progress"]
        )
    finally:
        logging.root.removeHandler(root_handler)
    err = capsys.readouterr().err
    assert code == 0 and err.count("Using the embedded MNIST sample") == 1, err[-2000:]
    assert "embedded MNIST sample" not in root_stream.getvalue()
    assert (log.level, log.propagate, list(log.handlers)) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: jaxnet {command}")
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)


def test_a_parser_of_some_commands_offers_only_those():
    parser = build_parser(("bench",))
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert sorted(sub.choices) == ["bench"]
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert sorted(sub.choices) == sorted(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["train"], commands=("bench",))
    assert exit_info.value.code == 2
