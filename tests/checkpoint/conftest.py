"""Fixtures of the checkpoint tests."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxnet import checkpoint as C
from tests.checkpoint.helpers import train_state


@pytest.fixture(params=C.ARRAY_FORMATS)
def saved(request, tmp_path):
    """A folder with checkpoints at steps 1 and 2 (closed, so every save is finished), and their state.

    In both formats: Orbax's own (the default, and what a state spread over
    processes always gets) and ``arrays.npz``.
    """
    state = train_state()
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt", array_format=request.param)
    for step in (1, 2):
        C.save(ckpt, step, state.replace(step=jnp.asarray(step, jnp.int32)), meta={"epoch": step})
    C.close(ckpt)
    return tmp_path / "ckpt", state
