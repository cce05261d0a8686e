"""Convolution throughput on XLA:CPU: jaxnet's train step against PyTorch eager and torch.compile.

Measures steady-state training steps per second of the real jaxnet step
(``jaxnet.step.make_train_step`` on ``create_model(name)``) with each
convolution implementation of ``jaxnet.models.conv``, next to the same model
in PyTorch (eager and ``torch.compile``, 2 threads), all in one process and
interleaved (A B C A B C ...), so that the ratios come from the same minutes of
a shared machine. It also times the ConvNet's conv2 alone (forward, input
gradient, weight gradient) for each way of computing it, and a large matmul
for the machine's achievable fp32 rate.

Commands (2-core CPU; see benchmarks/CONV_CPU.md for results)::

    python benchmarks/conv_cpu.py                       # steps table, all workloads
    python benchmarks/conv_cpu.py --layers              # conv2 forward/backward pieces
    python benchmarks/conv_cpu.py --workloads convnet:256 --repeats 7 --json out.json
    python benchmarks/conv_cpu.py --mnist --data-dir ../shared/data   # 99% recipe, wall time

Each number is the median of ``--repeats`` repetitions of about ``--seconds``
seconds each, after compilation and warm-up; FLOP/s count the model's useful
multiply-adds (2 FLOPs each) of forward and backward, not the padding the
"eigen" implementation adds. Dropout is on in both frameworks; PyTorch runs
with ``torch.set_flush_denormal(True)``, because its CPU kernels slow down on
the subnormal floats that training leaves in weights and optimizer state
(``jaxnet bench`` times eager PyTorch both ways; ``docs/static_vs_dynamic.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnet.models import MODELS, create_model, layers, pooling  # noqa: E402
from jaxnet.models.conv import use_conv_impl  # noqa: E402
from jaxnet.state import create_train_state  # noqa: E402
from jaxnet.step import loss_for_output, make_train_step, train_step_fn  # noqa: E402

# --- Workloads ------------------------------------------------------------------------


def useful_flops(name: str, batch: int) -> float:
    """FLOPs of one training step: 2 per multiply-add, forward + input grad + weight grad.

    The first layer needs no input gradient, so it counts twice, the others three times.
    """
    per_example = {
        # (forward MACs of each layer, first layer first)
        "convnet": [26 * 26 * 32 * 9, 24 * 24 * 64 * 9 * 32, 9216 * 128, 128 * 10],
        "cifar_cnn": [32 * 32 * 16 * 27, 16 * 16 * 32 * 9 * 16, 2048 * 128, 128 * 10],
        "mlp": [784 * 512, 512 * 256, 256 * 10],
    }[name]
    macs = 2 * per_example[0] + 3 * sum(per_example[1:])
    return 2.0 * macs * batch


def make_batch(name: str, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((batch, *MODELS[name].input_shape), dtype=np.float32)
    return images, rng.integers(0, 10, batch).astype(np.int32)


def optimizer(name: str) -> tuple[optax.GradientTransformation, str, float]:
    """The tutorial's optimizer for the model: Adam 1e-3 for the MLP, SGD 0.01 momentum 0.9 otherwise."""
    if name == "mlp":
        return optax.adam(1e-3), "adam", 1e-3
    return optax.sgd(0.01, momentum=0.9), "sgd", 0.01


@contextlib.contextmanager
def original_max_pool() -> Iterator[None]:
    """Traces ``max_pool2d`` as before this change: a reduce-max over the window axes (JAX's tie-splitting gradient)."""
    saved = pooling._window_max
    pooling._window_max = lambda windows: windows.max(axis=(2, 4))
    try:
        yield
    finally:
        pooling._window_max = saved


@contextlib.contextmanager
def free_weight_gradients() -> Iterator[None]:
    """Traces every convolution with ``stop_gradient`` on its kernel: an upper bound, not a train step.

    XLA then computes no weight gradient at all (the kernels' gradients are
    zeros), so the step's speed is what an infinitely fast weight-gradient
    kernel would give; everything else (forward, input gradients, pooling,
    dropout, the dense layers, Adam) is unchanged.
    """
    saved = layers.conv.conv2d

    def conv2d(x, kernel, **geometry):
        return saved(x, jax.lax.stop_gradient(kernel), **geometry)

    layers.conv.conv2d = conv2d
    try:
        yield
    finally:
        layers.conv.conv2d = saved


def jax_runner(
    name: str,
    batch: int,
    impl: str,
    compiler_options: dict | None = None,
    *,
    before: bool = False,
    bound: bool = False,
) -> Callable[[int], None]:
    """``run(n)`` takes n jaxnet train steps (convolution implementation ``impl``) and waits for them.

    ``before`` also traces max-pooling the way jaxnet did before this change,
    so that the step is exactly the old one. ``bound`` traces it under
    :func:`free_weight_gradients`.
    """
    images, labels = make_batch(name, batch)
    batch_arrays = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    tx, _, _ = optimizer(name)
    with (
        use_conv_impl(impl),
        original_max_pool() if before else contextlib.nullcontext(),
        free_weight_gradients() if bound else contextlib.nullcontext(),
    ):
        graphdef, state = create_train_state(create_model(name, seed=0), tx, seed=0)
        loss_fn = loss_for_output(MODELS[name].output)
        if compiler_options is None:
            step = make_train_step(graphdef, tx, loss_fn)
        else:
            step = jax.jit(train_step_fn(graphdef, tx, loss_fn), donate_argnums=(0,), compiler_options=compiler_options)
        step = step.lower(state, batch_arrays).compile()  # trace now, under this implementation
    holder = {"state": state}

    def run(n: int) -> None:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch_arrays)
        jax.block_until_ready((state, metrics))
        holder["state"] = state

    return run


def torch_runner(name: str, batch: int, compiled: bool) -> Callable[[int], None]:
    """``run(n)`` takes n PyTorch train steps (eager or ``torch.compile``)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    from jaxnet.bench.torch_models import build_torch_model
    from jaxnet.interop import to_torch_state_dict
    from jaxnet.models import create_model

    # the PyTorch twin of the tutorial model, holding the same initial weights as the jax side
    model = build_torch_model(name, to_torch_state_dict(create_model(name, seed=0)))
    _, opt_name, lr = optimizer(name)
    opt = (
        torch.optim.Adam(model.parameters(), lr)
        if opt_name == "adam"
        else torch.optim.SGD(model.parameters(), lr, momentum=0.9)
    )
    images, labels = make_batch(name, batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    output = MODELS[name].output

    def train_step():
        opt.zero_grad()
        out = model(x)
        loss = F.nll_loss(out, y) if output == "log_probs" else F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        return loss

    step = torch.compile(train_step) if compiled else train_step

    def run(n: int) -> None:
        for _ in range(n):
            loss = step()
        loss.item()

    return run


VARIANTS: dict[str, Callable[[str, int], Callable[[int], None]]] = {
    "jax before": lambda m, b: jax_runner(m, b, "xla", before=True),
    "jax xla conv, new pool": lambda m, b: jax_runner(m, b, "xla"),
    "jax auto (after)": lambda m, b: jax_runner(m, b, "auto"),
    "jax eigen": lambda m, b: jax_runner(m, b, "eigen"),
    "jax auto, weight gradients free (bound)": lambda m, b: jax_runner(m, b, "auto", bound=True),
    "jax xla, YNNPACK off": lambda m, b: jax_runner(m, b, "xla", {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "torch eager": lambda m, b: torch_runner(m, b, compiled=False),
    "torch.compile": lambda m, b: torch_runner(m, b, compiled=True),
}


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of the machine's CPU time spent busy over ``interval`` seconds (``/proc/stat``)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(max_busy: float, timeout: float) -> float:
    """Waits (up to ``timeout`` s) until other processes use less than ``max_busy`` of the CPUs.

    Returns the last busy fraction measured.
    """
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def measure(
    runners: dict[str, Callable[[int], None]],
    repeats: int,
    seconds: float,
    *,
    max_busy: float = 1.0,
    idle_timeout: float = 0.0,
) -> dict[str, list[float]]:
    """Steps/s of each runner, ``repeats`` times, interleaved; each repetition lasts about ``seconds``.

    Before each round (one repetition of every runner) it waits up to
    ``idle_timeout`` seconds for the machine to be idle (busy below ``max_busy``).
    """
    counts = {}
    for name, run in runners.items():
        run(2)  # warm-up (torch.compile compiles here)
        start = time.perf_counter()
        run(2)
        per_step = (time.perf_counter() - start) / 2
        counts[name] = max(2, math.ceil(seconds / per_step))
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        if idle_timeout > 0:
            wait_for_idle(max_busy, idle_timeout)
        for name, run in runners.items():
            start = time.perf_counter()
            run(counts[name])
            rates[name].append(counts[name] / (time.perf_counter() - start))
    return rates


# --- conv2 alone: forward, input gradient, weight gradient ----------------------------


def conv2_pieces(batch: int) -> dict[str, dict[str, Callable[[], jax.Array]]]:
    """Compiled pieces of the ConvNet's conv2 (26x26x32 -> 24x24x64) for each way of computing it."""
    from jaxnet.models.conv import conv2d_cpu, conv2d_eigen, conv2d_xla

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, 26, 26, 32), dtype=np.float32))
    w = jnp.asarray(rng.random((3, 3, 32, 64), dtype=np.float32))
    dy = jnp.asarray(rng.random((batch, 24, 24, 64), dtype=np.float32))
    geometry = {"stride": (1, 1), "padding": ((0, 0), (0, 0)), "dilation": (1, 1)}

    def im2col(x, w):  # patches (B, 24, 24, 9*32) by 9 shifted slices, then one matmul
        patches = jnp.concatenate([x[:, i : i + 24, j : j + 24, :] for i in range(3) for j in range(3)], axis=-1)
        return patches @ w.reshape(9 * 32, 64)

    ways = {
        "xla (before)": (lambda x, w: conv2d_xla(x, w, **geometry), None),
        "cpu (auto, after)": (lambda x, w: conv2d_cpu(x, w, **geometry), None),
        "eigen": (lambda x, w: conv2d_eigen(x, w, **geometry), None),
        "xla, YNNPACK off": (lambda x, w: conv2d_xla(x, w, **geometry), {"xla_cpu_experimental_ynn_fusion_type": ""}),
        "im2col + matmul": (im2col, None),
    }
    pieces = {}
    for label, (fn, options) in ways.items():
        fwd = jax.jit(fn, compiler_options=options)
        grad_x = jax.jit(lambda x, w, dy, fn=fn: jax.vjp(fn, x, w)[1](dy)[0], compiler_options=options)
        grad_w = jax.jit(lambda x, w, dy, fn=fn: jax.vjp(fn, x, w)[1](dy)[1], compiler_options=options)
        pieces[label] = {
            "forward": lambda f=fwd: f(x, w),
            "input grad": lambda f=grad_x: f(x, w, dy),
            "weight grad": lambda f=grad_w: f(x, w, dy),
        }
    a = jnp.asarray(rng.random((batch * 576, 288), dtype=np.float32))
    b = jnp.asarray(rng.random((288, 64), dtype=np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    pieces["matmul, same FLOPs"] = {"forward": lambda: matmul(a, b)}
    return pieces


def time_call(fn: Callable[[], jax.Array], seconds: float) -> Callable[[], float]:
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    n = max(2, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)))

    def once() -> float:
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n * 1e3

    return once


def matmul_peak(seconds: float, repeats: int) -> float:
    """Best achieved GFLOP/s of a jitted 2048x2048 @ 2048x2048 float32 matmul."""
    a = jnp.asarray(np.random.default_rng(0).random((2048, 2048), dtype=np.float32))
    f = jax.jit(lambda a: a @ a)
    once = time_call(lambda: f(a), seconds)
    return max(2 * 2048**3 / (once() * 1e-3) / 1e9 for _ in range(repeats))


def nominal_peak() -> tuple[float, str]:
    """cores x clock x 16 fp32 lanes (AVX-512) x 2 (FMA) x 2 FMA pipes, from /proc/cpuinfo."""
    mhz, flags = 0.0, set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
            if line.startswith("flags") and not flags:
                flags = set(line.split(":")[1].split())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    peak = cores * mhz / 1e3 * lanes * 2 * 2
    return peak, f"{cores} cores x {mhz / 1e3:.2f} GHz x {lanes} lanes x 2 (FMA) x 2 FMA pipes"


# --- Main -----------------------------------------------------------------------------


def header() -> dict:
    import torch

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    cpu = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


def run_steps(args: argparse.Namespace) -> dict:
    results = {}
    peak_nominal, how = nominal_peak()
    if args.idle_timeout > 0:
        wait_for_idle(args.max_busy, args.idle_timeout)
    peak_measured = matmul_peak(args.seconds, args.repeats)
    peak = max(peak_nominal, peak_measured)
    print(
        f"fp32 peak: nominal {peak_nominal:.0f} GFLOP/s ({how}); 2048^3 matmul best {peak_measured:.0f}; "
        f"using {peak:.0f}"
    )
    for spec in args.workloads.split(","):
        name, batch = spec.split(":")
        batch = int(batch)
        variants = [v for v in VARIANTS if not args.variants or v in args.variants.split(";")]
        runners = {v: VARIANTS[v](name, batch) for v in variants}
        rates = measure(runners, args.repeats, args.seconds, max_busy=args.max_busy, idle_timeout=args.idle_timeout)
        flops = useful_flops(name, batch)
        eager = statistics.median(rates["torch eager"]) if "torch eager" in rates else float("nan")
        print(f"\n{name}, batch {batch}: {flops / 1e9:.2f} GFLOP/step, load {os.getloadavg()[0]:.1f}")
        print("| variant | steps/s (median) | min-max | x torch eager | GFLOP/s | % of peak |")
        print("| --- | --- | --- | --- | --- | --- |")
        for v, r in rates.items():
            med = statistics.median(r)
            print(
                f"| {v} | {med:.1f} | {min(r):.1f}-{max(r):.1f} | {med / eager:.2f} | {med * flops / 1e9:.0f} | "
                f"{100 * med * flops / 1e9 / peak:.0f}% |"
            )
        results[spec] = {"rates": rates, "gflop_per_step": flops / 1e9}
    return {"peak_nominal": peak_nominal, "peak_measured": peak_measured, "workloads": results}


def run_layers(args: argparse.Namespace) -> dict:
    batch = int(args.workloads.split(",")[0].split(":")[1]) if args.workloads else 64
    pieces = conv2_pieces(batch)
    timers = {(way, piece): time_call(fn, args.seconds / 4) for way, d in pieces.items() for piece, fn in d.items()}
    times = {key: [] for key in timers}
    for _ in range(args.repeats):
        for key, once in timers.items():
            times[key].append(once())
    flops = 2 * batch * 24 * 24 * 64 * 9 * 32 / 1e9
    print(f"\nconv2 alone, batch {batch} ({flops:.2f} GFLOP per piece), ms (GFLOP/s), load {os.getloadavg()[0]:.1f}")
    print("| way | forward | input grad | weight grad |")
    print("| --- | --- | --- | --- |")
    for way, d in pieces.items():
        cells = []
        for piece in ("forward", "input grad", "weight grad"):
            if piece in d:
                ms = statistics.median(times[(way, piece)])
                cells.append(f"{ms:.1f} ({flops / ms * 1e3:.0f})")
            else:
                cells.append("-")
        print(f"| {way} | " + " | ".join(cells) + " |")
    return {f"{way}/{piece}": t for (way, piece), t in times.items()}


def run_mnist(args: argparse.Namespace) -> dict:
    """The ConvNet on real MNIST with ``jaxnet.train.fit``: wall time (compilation included) and test accuracy."""
    from jaxnet.data import load_dataset, num_batches
    from jaxnet.optim import create_optimizer, create_schedule
    from jaxnet.train import fit

    start = time.perf_counter()
    data = load_dataset("mnist", data_dir=args.data_dir, download=False)
    steps_per_epoch = num_batches(data.num_train, args.batch_size, drop_last=True)
    schedule = create_schedule(
        "warmup_cosine", args.lr, steps_per_epoch=steps_per_epoch, epochs=args.epochs, warmup_steps=steps_per_epoch // 5
    )
    tx = create_optimizer("adam", schedule)
    result = fit(
        create_model("convnet", seed=args.seed),
        data,
        tx,
        epochs=args.epochs,
        batch_size=args.batch_size,
        output="log_probs",
        seed=args.seed,
        progress=False,
    )
    wall = time.perf_counter() - start
    print(
        f"\nMNIST ConvNet, Adam warmup_cosine peak {args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
        f"seed {args.seed}: test accuracy {result.summary['test_accuracy']:.4f}, {wall:.1f} s wall "
        f"(data loading, compilation and evaluation included), load {os.getloadavg()[0]:.1f}"
    )
    keys = ("epoch", "epoch_seconds", "train_accuracy", "test_accuracy")
    for record in result.history:
        print({k: round(record[k], 4) if isinstance(record[k], float) else record[k] for k in keys if k in record})
    return {"wall_s": wall, "summary": result.summary, "history": result.history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", default="convnet:64,convnet:256,cifar_cnn:100,mlp:64", help="comma-separated model:batch"
    )
    parser.add_argument("--variants", default="", help="semicolon-separated subset of: " + "; ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one repetition")
    parser.add_argument("--layers", action="store_true", help="time conv2's pieces instead of whole steps")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        help="before each round, wait up to this many seconds for an idle machine (0: never wait)",
    )
    parser.add_argument("--max-busy", type=float, default=0.15, help="CPU fraction that counts as idle")
    parser.add_argument("--mnist", action="store_true", help="train the ConvNet on real MNIST instead")
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (for --mnist)")
    parser.add_argument("--epochs", type=int, default=2, help="for --mnist")
    parser.add_argument("--batch-size", type=int, default=128, help="for --mnist")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate, for --mnist")
    parser.add_argument("--seed", type=int, default=0, help="for --mnist")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    info = header()
    print(json.dumps(info))
    if args.mnist:
        out = {"machine": info, "mnist": run_mnist(args)}
    elif args.layers:
        out = {"machine": info, "layers": run_layers(args)}
    else:
        out = {"machine": info, "steps": run_steps(args)}
    out["load_after"] = os.getloadavg()
    print(f"load average after: {out['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
