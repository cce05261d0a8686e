"""The bench tests' shared run: one reduced benchmark, made once for the whole session."""

from __future__ import annotations

import json

import pytest

from tests.bench.helpers import run_cli
from tests.helpers import HAVE_TORCH


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One reduced ``jaxnet bench --quick --json --out DIR`` (the CI mode), shared by the bench tests."""
    out = tmp_path_factory.mktemp("bench")
    variants = "torch-eager,jax-jit" if HAVE_TORCH else "jax-jit"
    code, stdout, stderr = run_cli(["bench", "--quick", "--variants", variants, "--json", "--out", str(out)])
    assert code == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stdout, out
