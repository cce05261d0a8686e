"""What several test modules share: the repository's paths and small runners."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import types
from collections.abc import Mapping

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BENCHMARKS = REPO / "benchmarks"

# torch comes with the [dev] extra; the tests that compare against PyTorch skip without it.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")


def import_file(path: pathlib.Path, name: str) -> types.ModuleType:
    """Imports the script at ``path`` (an example, a benchmark, a worker) as the module ``name``.

    The module is registered in ``sys.modules`` first, because dataclasses and
    pickle look a module up by its name while it runs.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- running jaxnet as a user would: a fresh process ----------------------------------------------


def user_env(**overrides: str) -> dict[str, str]:
    """This process's environment as a user's shell has it: one CPU device (no fake devices), plus ``overrides``."""
    env = dict(os.environ, **overrides)
    env.pop("XLA_FLAGS", None)  # the suite's 8 fake CPU devices are not what a user's process sees
    return env


def offline_env(tmp_path: pathlib.Path) -> dict[str, str]:
    """:func:`user_env` on a machine with nothing cached: an empty cache, no data folder, the CPU, this checkout."""
    return user_env(
        XDG_CACHE_HOME=str(tmp_path / "empty-cache"), JAXNET_DATA_DIR="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )


def run_jaxnet(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``python -m jaxnet ARGS`` in a fresh process, as a user would; ``env`` is added to :func:`user_env`."""
    return subprocess.run(
        [sys.executable, "-m", "jaxnet", *args],
        capture_output=True,
        text=True,
        env=user_env(**(env or {})),
        timeout=timeout,
    )


# --- comparing training runs (steps, precision, accumulation, parallel) --------------------------


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` over every leaf of two pytrees (0 when both are 0)."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def leafwise_rel_err(a, b) -> float:
    """The largest :func:`rel_err` of one leaf of ``a`` against the same leaf of ``b``."""
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def trees_equal(a, b) -> bool:
    """Whether two pytrees hold exactly the same arrays, leaf by leaf."""
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def mnist_batches(n_steps: int, batch_size: int = 32, seed: int = 0) -> list[dict]:
    """``n_steps`` random MNIST-shaped batches: uint8 ``(B, 28, 28, 1)`` images, int32 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
        for _ in range(n_steps)
    ]


def mnist_batch(batch_size: int = 32, seed: int = 0) -> dict:
    """One batch of :func:`mnist_batches`."""
    return mnist_batches(1, batch_size, seed)[0]
