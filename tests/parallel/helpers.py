"""What the parallel tests share: a fresh state, and the single-device run every parallel step must equal."""

from __future__ import annotations

import optax

from jaxnet.data.transforms import make_image_transform
from jaxnet.models import create_model
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, make_train_step

TRANSFORM = make_image_transform((0.1307,), (0.3081,))
LOSS = loss_for_output("logits")


def setup(model_name: str = "mlp", tx: optax.GradientTransformation | None = None):
    """``(graphdef, state, tx)`` of a seed-0 tutorial model (Adam 1e-3 by default)."""
    tx = tx or optax.adam(1e-3)
    graphdef, state = create_train_state(create_model(model_name, seed=0), tx, seed=0)
    return graphdef, state, tx


def single_device_run(model_name: str, tx: optax.GradientTransformation, data):
    """The reference: ``data``'s batches through the plain one-device step; returns (state, losses)."""
    graphdef, state, _ = setup(model_name, tx)
    step = make_train_step(graphdef, tx, LOSS, transform=TRANSFORM)
    losses = []
    for batch in data:
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses
