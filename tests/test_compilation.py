"""jaxnet.compilation: CompileCounter sees a shape-unstable loop, and fit reports none in steady state."""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from jaxnet import CompileCounter, create_train_state, loss_for_output, make_train_step
from jaxnet.data import iterate_batches, load_dataset
from jaxnet.models import create_model
from jaxnet.train import fit


def test_compile_counter_catches_a_shape_unstable_loop():
    model = create_model("mlp128", seed=0)
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, tx, loss_for_output("logits"), donate=False)
    images = np.random.default_rng(0).random((100, 28, 28, 1), dtype=np.float32)
    labels = np.zeros(100, np.int32)

    def epoch(state, drop_last):
        for batch in iterate_batches(images, labels, 32, drop_last=drop_last):
            state, _ = step(state, batch)
        return state

    state = epoch(state, drop_last=False)  # first epoch: compiles for 32 and for the last batch of 4
    with CompileCounter() as stable:
        state = epoch(state, drop_last=True)
    assert stable.compiles == 0
    with CompileCounter() as unstable:  # a loop whose batch size changes every step: one compile each
        for size in (5, 6, 7):
            state, _ = step(state, {"image": images[:size], "label": labels[:size]})
    assert unstable.compiles == 3 and unstable.traces >= 3


def test_fit_reports_zero_steady_state_compilations():
    sample = load_dataset("mnist", download=False)
    small = dataclasses.replace(
        sample,
        train_images=sample.train_images[:640],
        train_labels=sample.train_labels[:640],
        test_images=sample.test_images[:200],
        test_labels=sample.test_labels[:200],
    )
    result = fit(create_model("mlp128", seed=0), small, optax.adam(1e-3), epochs=2, batch_size=64, progress=False)
    assert result.summary["compilations"] > 0
    assert result.summary["steady_state_compilations"] == 0
