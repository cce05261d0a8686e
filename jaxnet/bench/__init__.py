"""``jaxnet bench``: the same training in PyTorch and jaxnet, measured side by side.

The harness behind the ``bench`` subcommand (its parser, ``register_cli``, is
:mod:`jaxnet.cli.bench`), in small modules:
``workload`` (what is trained), ``torch_models`` (the tutorials' PyTorch
modules), ``variants`` (one runner per way of training), ``suite`` (interleaved
timing, loss agreement, compile counts), ``probe`` (first step and memory in
fresh processes), ``accuracy`` (time to accuracy on MNIST), ``speedrun_accuracy``
and ``speed_torch`` (the CIFAR-10 speedrun's time to 94% and its PyTorch twin),
``machine`` (the device choice, CPU or GPU description, peak FLOP/s, versions),
``report`` and ``page`` (JSON schema, Markdown, charts).
torch is imported only where a PyTorch variant runs.
"""

from jaxnet.bench.report import RESULT_SCHEMA, markdown_tables, validate
from jaxnet.bench.workload import VARIANTS, Workload, make_workload
from jaxnet.cli.bench import build_workloads, register_cli, run_bench

__all__ = [
    "RESULT_SCHEMA",
    "VARIANTS",
    "Workload",
    "build_workloads",
    "make_workload",
    "markdown_tables",
    "register_cli",
    "run_bench",
    "validate",
]
