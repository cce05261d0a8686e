"""What the benchmark ran on: CPU model, cores, clock, peak FLOP/s, load and versions.

The fp32 peak is computed, not looked up::

    peak = cores x clock x (vector lanes x 2 FLOPs per FMA x FMA units)

where the lanes come from the widest vector extension in ``/proc/cpuinfo``'s
flags (``avx512f``: 16 fp32 lanes, ``avx``/``avx2``: 8, otherwise SSE: 4),
the 2 counts the multiply and the add of a fused multiply-add (``fma`` flag;
without it a multiply and an add issue separately, which gives the same
count on two pipes), and the number of FMA units per core is 2, which is
what current x86 server cores (Intel since Haswell, AMD since Zen 2, with
full-width AVX-512 units on Zen 5) have; ``/proc/cpuinfo`` cannot say it,
so it is a parameter. The clock is the ``cpu MHz`` the kernel reports (the
nominal clock under a hypervisor; turbo may go higher).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

__all__ = ["cpu_info", "load_average", "machine_info", "on_the_cpu", "peak_gflops", "usable_cores", "versions"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


@contextlib.contextmanager
def on_the_cpu() -> Iterator[None]:
    """Runs JAX work started inside on the CPU, where PyTorch's side of the comparison runs.

    The suite compares the two frameworks on the same processor. On a machine
    with a GPU, JAX would otherwise put the jaxnet variants there and the
    PyTorch ones (CPU tensors) would stay on the processor. The probe
    subprocesses get ``JAX_PLATFORMS=cpu`` for the same reason.
    """
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield


def usable_cores() -> int:
    """Cores this process may run on (``sched_getaffinity``), which XLA's CPU pool uses."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """Model name, clock (MHz) and flags of the first CPU in ``/proc/cpuinfo``.

    Returns:
        ``{"model": str, "mhz": float | None, "flags": set[str]}``; empty
        values where the file does not exist (not Linux).
    """
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "mhz": None, "flags": set()}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "cpu MHz":
            info["mhz"] = float(value)
        elif key == "flags":
            info["flags"] = set(value.split())
    return info


def peak_gflops(mhz: float, cores: int, flags: set[str], *, fma_units: int = 2) -> dict[str, Any]:
    """The fp32 peak of ``cores`` cores, from the clock and the vector flags.

    Args:
        mhz: clock in MHz.
        cores: cores used.
        flags: ``/proc/cpuinfo`` flags.
        fma_units: FMA (or multiply + add) pipes per core.

    Returns:
        ``{"gflops": peak, "flops_per_cycle": per core, "vector": name}``.

    >>> peak_gflops(2000.0, 2, {"avx2", "fma"})["gflops"]
    128.0
    """
    if "avx512f" in flags:
        vector, lanes = "avx512", 16
    elif "avx" in flags or "avx2" in flags:
        vector, lanes = "avx2" if "avx2" in flags else "avx", 8
    else:
        vector, lanes = "sse", 4
    per_cycle = lanes * 2 * fma_units
    return {
        "gflops": mhz * 1e-3 * cores * per_cycle,
        "flops_per_cycle": per_cycle,
        "vector": vector,
        "fma_units": fma_units,
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of Python and the packages the benchmark compares."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(
    *, cores: int | None = None, fma_units: int = 2, device: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that identifies the machine a benchmark ran on.

    Args:
        cores: cores used (default: :func:`usable_cores`).
        fma_units: FMA pipes per core for the peak (see the module docstring).
        device: description of the JAX device, e.g. ``{"platform": "cpu"}``.

    Returns:
        A JSON-ready dict: ``cpu``, ``cores``, ``mhz``, ``vector``,
        ``peak_gflops`` and how it was computed, ``load_average``, ``platform``.
    """
    cpu = cpu_info()
    cores = usable_cores() if cores is None else cores
    mhz = cpu["mhz"] or 0.0
    peak = peak_gflops(mhz, cores, cpu["flags"], fma_units=fma_units)
    return {
        "cpu": cpu["model"],
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "mhz": mhz,
        "vector": peak["vector"],
        "fma": "fma" in cpu["flags"],
        "flops_per_cycle_per_core": peak["flops_per_cycle"],
        "peak_gflops": round(peak["gflops"], 1) if mhz else None,
        "peak_formula": (
            f"{cores} cores x {mhz / 1000:.2f} GHz x {peak['flops_per_cycle']} fp32 FLOP/cycle "
            f"({peak['vector']}: lanes x 2 (FMA) x {fma_units} FMA units)"
        ),
        "load_average": load_average(),
        "platform": platform.platform(),
        "device": dict(device or {}),
    }
