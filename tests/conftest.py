"""Test configuration: dtype promotion and the real-data fixture."""

from __future__ import annotations

import os
import pathlib

# The 8 fake CPU devices are requested in the repository's root conftest.py,
# before anything imports jax.
import jax  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import REPO

# Strict dtype promotion would be the better default for our own code, but
# optax's own update rules (e.g. Adam's ``b1 ** count`` with an int32 count)
# raise under it, so the suite runs with JAX's standard promotion; the
# library's dtype handling is checked by explicit dtype assertions instead.
jax.config.update("jax_numpy_dtype_promotion", "standard")

# The real data sets live beside the repository (never inside it); CI and
# developers point JAXNET_TEST_DATA at another copy when needed.
SHARED_DATA = pathlib.Path(os.environ.get("JAXNET_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Folder holding real ``mnist/`` and ``cifar10/`` in their official formats."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}; set JAXNET_TEST_DATA")
    return SHARED_DATA
