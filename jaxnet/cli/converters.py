"""The command line's argument types and help format: one set, shared by every ``jaxnet`` subcommand.

Each converter is an argparse ``type=``: it takes the text of one argument
and returns its value, or raises ``argparse.ArgumentTypeError`` whose
message names what was expected and what was given (argparse turns it into
``jaxnet COMMAND: error: argument --flag: ...`` and exit status 2). A
``--config`` file's values go through the same converters
(:func:`jaxnet.cli.runconfig.read_config_file`), so a file and the command line
refuse the same values with the same words.

>>> positive_int("64"), fraction("0.1"), positive_int_list("64,512"), name_list("mlp, convnet")
(64, 0.1, [64, 512], ['mlp', 'convnet'])
>>> checkpoint_step("best"), checkpoint_step("200")
('best', 200)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

SEED_MAX = 2**32 - 1  # seeds are uint32, as numpy's and JAX's PRNG keys take them
PORT_MAX = 65535


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default once: not added where the help text already says it, nor for None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action) or text  # typeshed types it str | None


def add_command(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand's parser, its ``--help`` formatted as every ``jaxnet`` command's (:class:`HelpFormatter`)."""
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """Counts (``--epochs``, ``--batch-size``, ``--nproc``, ``--repeats``): an integer >= 1."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """Rates and decays (``--lr``, ``--momentum``, ``--gamma``): a finite number >= 0."""
    value = _number(text, "a number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """Thresholds and limits (``--clip-norm``, ``--timeout``): a finite number > 0."""
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """``--val-split``: a number strictly between 0 and 1."""
    value = _number(text, "a fraction such as 0.1")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1 (e.g. 0.1), got {text}")
    return value


def seed(text: str) -> int:
    """``--seed``: an integer in ``[0, 2**32 - 1]``."""
    value = _integer(text, "an integer seed")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {SEED_MAX}], got {value}")
    return value


def port(text: str) -> int:
    """``--port``: a TCP port number in ``[1, 65535]``."""
    value = _integer(text, "a port number")
    if not 1 <= value <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"expected a port number in [1, {PORT_MAX}], got {value}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """``--model-kwargs``: a JSON object such as ``'{"width": 128}'``."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 128}}', got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    """Comma-separated names (``--variants torch-eager,jax-jit``); blanks are dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def positive_int_list(text: str) -> list[int]:
    """Comma-separated positive integers (``--batch-size 64,512``)."""
    try:
        values = [int(v) for v in name_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,512; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,512; got {text!r}")
    return values


def checkpoint_step(text: str) -> str | int:
    """``--step``: ``best``, ``latest`` or a step number >= 0."""
    if text in ("best", "latest"):
        return text
    value = _integer(text, "'best', 'latest' or a step number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0, got {value}")
    return value


def platform_list(text: str) -> tuple[str, ...]:
    """``--platforms cpu,cuda``: platforms ``jax.export`` lowers for (:data:`jaxnet.export.PLATFORMS`)."""
    from jaxnet.export.lowering import PLATFORMS  # jax: only when the flag is given

    platforms = tuple(name_list(text))
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise argparse.ArgumentTypeError(f"unknown platform(s) {bad or text!r}; choose from {', '.join(PLATFORMS)}")
    return platforms


def model_spec(text: str) -> str:
    """``--model``: a registered name, or anything naming code (checked, one line, when the run starts)."""
    from jaxnet.models import MODELS

    if text in MODELS or ":" in text or "." in text:
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(sorted(MODELS))}, or your own model as "
        "package.module:factory)"
    )
