"""Before/after of jaxnet's convolution in one process: the plain ``lax.conv`` path against the default.

The same train step of each CNN is traced twice, once under
``use_conv_impl("xla")`` (plain ``lax.conv_general_dilated``, what XLA picks
itself) and once under the default ``"auto"``, then both are timed
interleaved (A B A B ...), so that the ratio comes from the same minutes of a
shared machine. Results: ``benchmarks/CONV_CPU.md`` (section 4, and section 7
for a GPU).

Command (from the repository root)::

    python benchmarks/conv_ab.py                      # ConvNet batch 64, CIFAR CNN batch 100
    python benchmarks/conv_ab.py --repeats 7 --steps 20

Each number is the median over ``--repeats`` rounds of ``--steps`` steps per
implementation, after one compiled warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnet.models import MODELS, create_model  # noqa: E402
from jaxnet.models.conv import use_conv_impl  # noqa: E402
from jaxnet.state import create_train_state  # noqa: E402
from jaxnet.step import loss_for_output, make_train_step  # noqa: E402

WORKLOADS = (("convnet", 64), ("cifar_cnn", 100))  # (model, batch size)
IMPLS = ("xla", "auto")  # plain lax.conv, jaxnet's default


def compiled_step(name: str, impl: str, batch: dict[str, jax.Array]):
    """The model's SGD train step traced under ``impl``, and a state after one (warm-up) step."""
    tx = optax.sgd(0.01, momentum=0.9)
    graphdef, state = create_train_state(create_model(name, seed=0), tx, seed=0)
    with use_conv_impl(impl):  # read at trace time: the first call traces and compiles
        step = make_train_step(graphdef, tx, loss_for_output(MODELS[name].output))
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    return step, state


def compare(name: str, batch_size: int, *, steps: int, repeats: int) -> dict[str, float]:
    """Median steps per second of each implementation in :data:`IMPLS`, timed interleaved."""
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.random((batch_size, *MODELS[name].input_shape), dtype=np.float32)),
        "label": jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32)),
    }
    runs = {impl: compiled_step(name, impl, batch) for impl in IMPLS}
    states = {impl: state for impl, (_, state) in runs.items()}
    rates: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
        for impl, (step, _) in runs.items():
            state = states[impl]
            start = time.perf_counter()
            for _ in range(steps):
                state, _metrics = step(state, batch)
            jax.block_until_ready(state)
            rates[impl].append(steps / (time.perf_counter() - start))
            states[impl] = state
    return {impl: statistics.median(r) for impl, r in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="train steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}", flush=True)
    for name, batch_size in WORKLOADS:
        rate = compare(name, batch_size, steps=args.steps, repeats=args.repeats)
        print(
            f"{name} batch {batch_size}: plain lax.conv {rate['xla']:.1f} steps/s, "
            f"jaxnet auto {rate['auto']:.1f} steps/s, ratio {rate['auto'] / rate['xla']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
