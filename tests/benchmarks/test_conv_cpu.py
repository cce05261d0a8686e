"""benchmarks/conv_cpu.py: the upper-bound variant really removes the weight gradients, and only them."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnet.models import create_model, layers
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, train_step_fn
from tests.helpers import BENCHMARKS, import_file


@pytest.fixture(scope="module")
def conv_cpu():
    return import_file(BENCHMARKS / "conv_cpu.py", "conv_cpu_bench")


def _one_step(bound_context):
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(create_model("convnet", seed=0), tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((8, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}
    with bound_context:
        step = jax.jit(train_step_fn(graphdef, tx, loss_for_output("log_probs")))
        compiled = step.lower(state, batch).compile()
    new_state, _ = compiled(state, batch)
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        nnx.to_pure_dict(state.params),
        nnx.to_pure_dict(new_state.params),
    )
    return len(re.findall(r"= \S+ convolution\(", compiled.as_text())), moved


def test_free_weight_gradients_drops_exactly_the_weight_gradient_convolutions(conv_cpu):
    import contextlib

    convs, moved = _one_step(contextlib.nullcontext())
    bound_convs, bound_moved = _one_step(conv_cpu.free_weight_gradients())
    # the step: conv1 and conv2 forward, conv2's input gradient, both weight gradients
    assert (convs, bound_convs) == (5, 3)
    assert all(jax.tree.leaves(moved))  # every parameter moves in a real step
    assert not bound_moved["conv1"]["kernel"] and not bound_moved["conv2"]["kernel"]
    assert bound_moved["conv2"]["bias"] and bound_moved["fc1"]["kernel"]  # the rest still learns
    assert layers.conv.conv2d is conv_cpu.layers.conv.conv2d  # restored after the block
    assert "weight gradients free (bound)" in " ".join(conv_cpu.VARIANTS)
