"""Data-parallel scaling: train-step throughput on 1, 2, 4, 8 devices, ratios from one run.

Each device count runs in its own subprocess (the number of simulated CPU
devices, ``--xla_force_host_platform_device_count``, is fixed when JAX
starts), one after the other, with the same model, optimizer and *global*
batch (strong scaling): the sharded step of ``jaxnet.parallel.sharding``
(``jit`` + ``NamedSharding``), data parallel and FSDP, and the ``shard_map``
step of ``jaxnet.parallel.steps``. Each number is the median of
``--rounds`` x ``--repeats`` timings of ``--steps`` steps after compilation and warm-up,
ending in ``block_until_ready``; batches are already on their shards, and at
most ``MAX_STEPS_IN_FLIGHT`` steps are queued (``make_dispatch_limiter``),
as in a training loop.

Commands (results in benchmarks/SCALING.md)::

    python benchmarks/scaling.py                           # fake CPU devices 1, 2, 4, 8
    python benchmarks/scaling.py --platform gpu            # real GPUs: 1, 2, 4, ... up to all
    python benchmarks/scaling.py --model mlp --batch-size 512 --markdown out.md

Fake CPU devices share the machine's cores, so on CPU this measures the cost
of partitioning and collectives, not a speed-up. The device counts run in
``--rounds`` interleaved rounds, so that a change in the machine's load
during the run affects every row alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("dp", "fsdp", "shard_map")


def measure(num_devices: int, *, model: str, batch_size: int, steps: int, repeats: int) -> dict:
    """Steps per second of each mode on ``num_devices`` devices (runs inside the worker)."""
    import jax
    import numpy as np
    import optax

    from jaxnet.models import MODELS, create_model
    from jaxnet.parallel import sharding
    from jaxnet.parallel import steps as distributed_step
    from jaxnet.state import create_train_state
    from jaxnet.step import loss_for_output
    from jaxnet.train import make_image_transform

    spec = MODELS[model]
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (batch_size, *spec.input_shape), dtype=np.uint8),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    mesh = sharding.make_mesh(num_devices)
    batch = sharding.shard_batch(host, mesh)
    transform = make_image_transform((0.5,) * spec.input_shape[-1], (0.5,) * spec.input_shape[-1])
    loss = loss_for_output(spec.output)
    result = {
        "devices": num_devices,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }
    runs = {}
    for mode in MODES:
        tx = optax.adam(1e-3)
        graphdef, state = create_train_state(create_model(model, seed=0), tx, seed=0)
        if mode == "shard_map":
            step = distributed_step.make_shard_map_train_step(graphdef, tx, loss, mesh, transform=transform)
            state = sharding.shard_state(state, sharding.state_shardings(state, mesh))
        else:
            shardings = sharding.state_shardings(state, mesh, fsdp=mode == "fsdp")
            state = sharding.shard_state(state, shardings)
            step = sharding.make_sharded_train_step(graphdef, tx, loss, mesh, shardings, transform=transform)
        for _ in range(3):  # compile and warm up
            state, m = step(state, batch)
        jax.block_until_ready((state, m))
        runs[mode] = [step, state]
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so that load on a shared machine hits every mode alike
            step, state = runs[mode]
            wait = sharding.make_dispatch_limiter()  # as a training loop must (XLA:CPU deadlock)
            start = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, batch)
                wait(m)
            jax.block_until_ready((state, m))
            rates[mode].append(steps / (time.perf_counter() - start))
            runs[mode][1] = state
    result.update({mode: statistics.median(r) for mode, r in rates.items()})
    return result


def run_worker(num_devices: int, args: argparse.Namespace) -> dict:
    """Runs :func:`measure` in a fresh process that sees ``num_devices`` devices."""
    env = dict(os.environ)
    if args.platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        str(num_devices),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], args: argparse.Namespace, versions: dict) -> str:
    """The results as a markdown table with each mode's ratio to one device."""
    base = rows[0]
    lines = [
        f"Model `{args.model}`, Adam, global batch {args.batch_size}, {rows[0]['platform']} "
        f"({rows[0]['device_kind']}); steps/s are medians of {args.rounds} rounds x {args.repeats} "
        f"timings of {args.steps} steps each.",
        "",
        "| devices | " + " | ".join(f"{m} steps/s | {m} vs 1" for m in MODES) + " |",
        "| --- | " + " | ".join("--- | ---" for _ in MODES) + " |",
    ]
    for row in rows:
        cells = [f"{row[m]:.1f} | {row[m] / base[m]:.2f}x" for m in MODES]
        lines.append(f"| {row['devices']} | " + " | ".join(cells) + " |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--platform", choices=("cpu", "gpu"), default="cpu", help="cpu: simulated devices; gpu: the machine's GPUs"
    )
    parser.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=None,
        help="device counts to measure (default: 1 2 4 8 on cpu, powers of 2 up to all GPUs)",
    )
    parser.add_argument("--model", default="mlp", help="jaxnet model name")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch (divisible by every count)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per mode in each worker run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the device counts; each cell is the median over rounds"
    )
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(
            json.dumps(
                measure(
                    args.worker, model=args.model, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats
                )
            )
        )
        return

    import flax
    import jax
    import optax

    counts = args.devices
    if counts is None:
        total = 8 if args.platform == "cpu" else len(jax.devices("gpu"))
        counts = [n for n in (1, 2, 4, 8, 16) if n <= total]
    samples: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.rounds):  # rounds interleave the device counts in time
        for n in counts:
            samples[n].append(run_worker(n, args))
            print(json.dumps(samples[n][-1]), file=sys.stderr)
    rows = [{**runs[0], **{m: statistics.median(r[m] for r in runs) for m in MODES}} for runs in samples.values()]
    versions = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "cpu cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    table = markdown(rows, args, versions)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
