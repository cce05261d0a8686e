"""Test configuration: 8 fake CPU devices, CPU platform.

The XLA flag must be set before JAX initializes its backends, so it is set
here at import time, before any test module imports jax.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Strict dtype promotion would be the better default for our own code, but
# optax's own update rules (e.g. Adam's ``b1 ** count`` with an int32 count)
# raise under it, so the suite runs with JAX's standard promotion; the
# library's dtype handling is checked by explicit dtype assertions instead.
jax.config.update("jax_numpy_dtype_promotion", "standard")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real data sets live beside the repository (never inside it); CI and
# developers point JAXNET_TEST_DATA at another copy when needed.
SHARED_DATA = pathlib.Path(os.environ.get("JAXNET_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Folder holding real ``mnist/`` and ``cifar10/`` in their official formats."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}; set JAXNET_TEST_DATA")
    return SHARED_DATA
