"""First-step latency and peak memory of one variant, measured in a fresh process.

The parent (:func:`first_step_latency`) starts ``python -m jaxnet.bench.probe
SPEC`` twice with the same, initially empty, compilation cache folder: the
first run compiles from scratch ("cold"), the second finds the executables in
JAX's persistent compilation cache or Inductor's cache ("warm"). This module's
:func:`main` is an entry point, so it is where the JAX cache options are set.

Definitions (the same for every variant):

- ``first_step_seconds``: wall time of the first training step once the
  model, optimizer and batches exist: tracing, compiling (or loading from the
  cache) and running it. For ``jax-scan``, whose first call runs a whole
  ``steps``-long epoch, it is that call's time minus ``(steps - 1) / steps``
  of a second call's.
- ``peak_rss_mb``: how far the process's resident memory rose above its level
  after imports and batch creation, over the first step and one more
  ``steps``-long run: the peak (``VmHWM`` of ``/proc/self/status``, reset
  by writing 5 to ``/proc/self/clear_refs`` just before the first step;
  ``ru_maxrss`` where that is impossible) minus the level before.
- ``peak_device_mb`` (cuda only): the most GPU memory the variant's framework
  held in use over the whole process (weights, batches, first step and the
  run after it): ``torch.cuda.max_memory_allocated()``, or the
  ``peak_bytes_in_use`` of JAX's device memory statistics.

The subprocess runs on the parent's device: ``JAX_PLATFORMS`` is ``cpu`` or
``cuda`` (:data:`jaxnet.bench.machine.JAX_PLATFORMS`), so JAX cannot pick
another one, and on cuda JAX allocates GPU memory on demand
(:func:`jaxnet.bench.machine.share_gpu_memory`).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxnet.bench.machine import JAX_PLATFORMS
from jaxnet.bench.workload import JAX_VARIANTS, TORCH_VARIANTS, Workload
from jaxnet.errors import JaxnetError

__all__ = ["first_step_latency", "main", "probe_env", "run_probe"]

# have a compilation cache to be warm
COMPILED_VARIANTS = ("torch-compile", "torch-compile-max", "jax-jit", "jax-scan", "jax-jit-bf16")


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB, or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> float:
    peak = _status_mb("VmHWM") if reset else None
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _device_peak_mb(variant: str, device: str) -> float | None:
    """The most GPU memory the variant's framework held in use in this process (None off the GPU)."""
    if device != "cuda":
        return None
    if variant in TORCH_VARIANTS:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    from jaxnet.bench.machine import jax_device

    stats = jax_device(device).memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Runs the measurement described by ``spec`` in this process (see :func:`main`)."""
    from jaxnet.bench.variants import make_runner  # after the cache options are set
    from jaxnet.compilation import CompileCounter

    workload, variant, device = Workload(**spec["workload"]), spec["variant"], spec.get("device", "cpu")
    state_dict = dict(np.load(spec["weights"])) if variant in TORCH_VARIANTS else None
    runner = make_runner(variant, workload, state_dict=state_dict, threads=spec.get("threads"), device=device)
    base_rss = _status_mb("VmRSS") or 0.0
    reset = _reset_peak_rss()
    with CompileCounter() as counter:
        start = time.perf_counter()
        runner.run(workload.steps if variant == "jax-scan" else 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        runner.run(workload.steps)
        second = time.perf_counter() - start
    if variant == "jax-scan":
        first -= second * (workload.steps - 1) / workload.steps
    result = {
        "first_step_seconds": first,
        "peak_rss_mb": max(0.0, _peak_rss_mb(reset) - base_rss),
        "peak_device_mb": _device_peak_mb(variant, device),
        "jax_compiles": counter.compiles,
        "cache_files": _count_files(spec["cache_dir"]),
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m jaxnet.bench.probe SPEC_JSON``; prints one JSON line.

    ``SPEC_JSON`` holds ``workload`` (a :class:`Workload` as a dict),
    ``variant``, ``device``, ``cache_dir``, ``threads`` and, for PyTorch variants,
    ``weights`` (an ``.npz`` of the initial state_dict). Inductor's cache
    folder is taken from ``TORCHINDUCTOR_CACHE_DIR``, which the parent sets.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m jaxnet.bench.probe SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    if spec["variant"] in JAX_VARIANTS:
        import jax

        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    print(json.dumps(measure(spec)))
    return 0


def probe_env(cache_dir: str, device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The probe subprocess's environment: ``base`` (default: this process's) with the device and cache folders.

    >>> probe_env("/tmp/c", "cuda", {})["JAX_PLATFORMS"]
    'cuda'
    """
    env = dict(os.environ if base is None else base)
    env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"), JAX_PLATFORMS=JAX_PLATFORMS[device])
    if device == "cuda":  # PyTorch and JAX may share the GPU: no 75% reservation by JAX
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def run_probe(
    workload: Workload,
    variant: str,
    *,
    cache_dir: str,
    weights: str | None,
    threads: int | None,
    device: str = "cpu",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Runs one probe subprocess and returns its JSON result.

    Raises:
        JaxnetError: if the subprocess fails or times out (its stderr's end is included).
    """
    spec = {
        "workload": workload.to_dict(),
        "variant": variant,
        "cache_dir": cache_dir,
        "weights": weights,
        "threads": threads,
        "device": device,
    }
    # JAX on the parent's device, also where it would pick another one (see machine.on_device)
    env = probe_env(cache_dir, device)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxnet.bench.probe", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise JaxnetError(f"the first-step probe of {variant} on {workload.model} took over {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise JaxnetError(
            f"the first-step probe of {variant} on {workload.model} failed (exit {proc.returncode}):\n{tail}"
        )
    return json.loads(lines[-1])


def first_step_latency(
    workload: Workload,
    variant: str,
    state_dict: Mapping[str, np.ndarray],
    *,
    threads: int | None,
    device: str = "cpu",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """First-step latency with a cold and a warm compilation cache, and peak memory.

    Args:
        workload: what to train.
        variant: the variant to measure.
        state_dict: the initial weights (PyTorch layout), for PyTorch variants.
        threads: ``torch.set_num_threads`` in the subprocess (on the CPU).
        device: ``cpu`` or ``cuda``.
        timeout: seconds allowed per subprocess.

    Returns:
        ``first_step_seconds`` (cold cache), ``first_step_seconds_warm``
        (None for eager variants, which have no cache), ``peak_rss_mb`` and
        ``peak_rss_mb_cold`` (the warm and the cold run's), ``peak_device_mb``
        (the warm or only run's; None off the GPU), ``cache_files``.
    """
    with tempfile.TemporaryDirectory(prefix="jaxnet-bench-") as tmp:
        weights = None
        if variant in TORCH_VARIANTS:
            weights = str(pathlib.Path(tmp) / "weights.npz")
            arrays: dict[str, Any] = dict(state_dict)  # typed: mypy reads **Mapping into savez's bool keyword
            np.savez(weights, **arrays)
        cache_dir = str(pathlib.Path(tmp) / "cache")
        os.makedirs(cache_dir)

        def probe() -> dict[str, Any]:
            return run_probe(
                workload, variant, cache_dir=cache_dir, weights=weights, threads=threads, device=device, timeout=timeout
            )

        cold = probe()
        warm = probe() if variant in COMPILED_VARIANTS else None
    out = {
        "first_step_seconds": cold["first_step_seconds"],
        "first_step_seconds_warm": warm["first_step_seconds"] if warm else None,
        "peak_rss_mb": (warm or cold)["peak_rss_mb"],
        "peak_rss_mb_cold": cold["peak_rss_mb"],
        "peak_device_mb": (warm or cold)["peak_device_mb"],
        "cache_files": cold["cache_files"],
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
