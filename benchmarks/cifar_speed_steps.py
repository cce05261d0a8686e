"""Steps per second of the CIFAR-10 speedrun's train step: jaxnet vs its PyTorch twin (eager), fp32 and bf16.

One process per framework and precision, as a user would run it. Both sides
start from the same weights (``jaxnet.interop``) and take the same synthetic
uint8 batch; a jaxnet step is :func:`jaxnet.speedrun.make_speedrun_step`
(normalize, forward, summed label-smoothed loss, grouped Nesterov SGD, one
XLA executable), a PyTorch step :func:`jaxnet.bench.speed_torch.torch_train_step`
(the same in eager mode; bf16 is ``torch.autocast``; images pre-normalized,
channels-last). The first step (jaxnet: compilation) is reported apart; then
the median of ``--steps`` timed steps, each waited for.

Commands (results in benchmarks/CIFAR_SPEED.md)::

    python benchmarks/cifar_speed_steps.py --framework jax --precision fp32 --batch-size 512
    python benchmarks/cifar_speed_steps.py --framework torch --precision bf16 --batch-size 512
    python benchmarks/cifar_speed_steps.py --framework jax --widths 8,16,16 --batch-size 32 --steps 2  # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet.speedrun import SpeedrunRecipe, make_speedrun_optimizer, make_speedrun_step, speedrun_model
from jaxnet.state import create_train_state


def jax_steps(recipe: SpeedrunRecipe, batch: dict[str, np.ndarray], steps: int) -> list[float]:
    """Seconds of the first and each later jaxnet step."""
    model = speedrun_model(recipe, whiten_from=batch["image"])
    tx = make_speedrun_optimizer(nnx.state(model, nnx.Param), recipe, steps_per_epoch=50, total_steps=500)
    graphdef, state = create_train_state(model, tx)
    state = jax.device_put(state, jax.devices()[0])
    step = make_speedrun_step(graphdef, tx, recipe)
    device_batch = jax.device_put(batch, jax.devices()[0])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def torch_steps(recipe: SpeedrunRecipe, batch: dict[str, np.ndarray], steps: int, threads: int) -> list[float]:
    """Seconds of the first and each later PyTorch eager step (same initial weights as jaxnet's)."""
    import torch

    from jaxnet.bench.speed_torch import make_torch_speedrun_optimizer, torch_speed_net_like, torch_train_step
    from jaxnet.data.transforms import normalize

    torch.set_num_threads(threads)
    twin = torch_speed_net_like(speedrun_model(recipe, whiten_from=batch["image"]))
    twin = twin.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_torch_speedrun_optimizer(twin, recipe, steps_per_epoch=50, total_steps=500)
    x = np.asarray(normalize(jnp.asarray(batch["image"]), recipe.mean, recipe.std)).transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(x)).to(memory_format=torch.channels_last)
    labels = torch.from_numpy(batch["label"]).long()
    dtype = torch.bfloat16 if recipe.precision == "bf16" else None
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        float(torch_train_step(twin, optimizer, scheduler, images, labels, autocast_dtype=dtype))
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("jax", "torch"), required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--widths", default="64,256,256", help="channels of the three conv groups")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    w1, w2, w3 = (int(w) for w in args.widths.split(","))
    recipe = SpeedrunRecipe(widths=(w1, w2, w3), batch_size=args.batch_size, precision=args.precision)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
    }
    times = (
        jax_steps(recipe, batch, args.steps)
        if args.framework == "jax"
        else torch_steps(recipe, batch, args.steps, args.threads)
    )
    step = statistics.median(times[1:])
    result = {
        "framework": args.framework,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "widths": list(recipe.widths),
        # four significant figures: a fixed number of decimals loses a fast step's precision
        "first_step_s": float(f"{times[0]:.4g}"),
        "step_s": float(f"{step:.4g}"),
        "steps_per_s": float(f"{1 / step:.4g}"),
        "images_per_s": float(f"{args.batch_size / step:.4g}"),
        "timed_steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
