"""Where the benchmark runs and what it ran on: device choice, CPU, GPU, peak FLOP/s, load and versions.

Both frameworks run on one device, the CPU or a CUDA GPU
(:func:`select_device`; ``auto`` takes the GPU when PyTorch and JAX both see
one). :func:`on_device` puts the JAX work started inside on it.

On the CPU the fp32 peak is computed, not looked up::

    peak = cores x clock x (vector lanes x 2 FLOPs per FMA x FMA units)

where the lanes come from the widest vector extension in ``/proc/cpuinfo``'s
flags (``avx512f``: 16 fp32 lanes, ``avx``/``avx2``: 8, otherwise SSE: 4),
the 2 counts the multiply and the add of a fused multiply-add (``fma`` flag;
without it a multiply and an add issue separately, which gives the same
count on two pipes), and the number of FMA units per core is 2, which is
what current x86 server cores (Intel since Haswell, AMD since Zen 2, with
full-width AVX-512 units on Zen 5) have; ``/proc/cpuinfo`` cannot say it,
so it is a parameter. The clock is the ``cpu MHz`` the kernel reports (the
nominal clock under a hypervisor; turbo may go higher). On a GPU that peak
does not apply and none is given: the rows report achieved GFLOP/s, and the
machine section names the GPU (PyTorch's device name, JAX's device kind).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

from jaxnet.errors import ConfigError

__all__ = [
    "JAX_PLATFORMS",
    "choose_device",
    "cpu_info",
    "describe_device",
    "jax_device",
    "jax_has_gpu",
    "load_average",
    "machine_info",
    "on_device",
    "on_the_cpu",
    "peak_gflops",
    "select_device",
    "share_gpu_memory",
    "torch_has_cuda",
    "usable_cores",
    "versions",
]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")
_GPU_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin")  # listed only where installed
JAX_PLATFORMS = {"cpu": "cpu", "cuda": "cuda"}  # the probes' JAX_PLATFORMS for each device
_JAX_BACKENDS = {"cpu": "cpu", "cuda": "gpu"}  # the backend name jax.devices() takes
JAX_GPU_FIX = 'pip install "jaxnet[cuda12]" (or "jaxnet[cuda13]" for a CUDA 13 driver)'
TORCH_GPU_FIX = "install a CUDA build of torch==2.13.0 (pytorch.org's install selector gives the command)"


def jax_has_gpu() -> bool:
    """Whether JAX has a GPU device; False also where no GPU backend exists (jax raises RuntimeError then)."""
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # "Unknown backend gpu", a CUDA plugin that failed to start, JAX_PLATFORMS=cpu
        return False


def torch_has_cuda() -> bool:
    """Whether PyTorch is installed and sees a CUDA device (``torch.cuda.is_available()``)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_device(requested: str, *, jax_gpu: bool, torch_cuda: bool | None) -> str:
    """The device both frameworks run on, from what each of them sees (a pure decision).

    Args:
        requested: ``auto``, ``cpu`` or ``cuda`` (``--device``).
        jax_gpu: whether JAX has a GPU device.
        torch_cuda: whether PyTorch sees CUDA; None where no PyTorch variant
            runs, so that PyTorch's side does not matter.

    Returns:
        ``cpu`` or ``cuda``; ``auto`` is ``cuda`` when every side that runs has a GPU.

    Raises:
        ConfigError: ``cuda`` where a side that runs has no GPU (the message
            names the side and how to fix it), or an unknown name.

    >>> choose_device("auto", jax_gpu=True, torch_cuda=False)
    'cpu'
    >>> choose_device("auto", jax_gpu=True, torch_cuda=None)
    'cuda'
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    if requested == "cpu":
        return "cpu"
    missing = []
    if not jax_gpu:
        missing.append(f"JAX has no GPU device (jax.devices('gpu') finds none): {JAX_GPU_FIX}")
    if torch_cuda is False:
        missing.append(f"PyTorch sees no CUDA device (torch.cuda.is_available() is False): {TORCH_GPU_FIX}")
    if requested == "auto":
        return "cpu" if missing else "cuda"
    if missing:
        raise ConfigError("--device cuda: " + "; ".join(missing) + "; or pass --device cpu (or auto)")
    return "cuda"


def select_device(requested: str, *, torch_side: bool = True) -> str:
    """:func:`choose_device` with what this machine's JAX and PyTorch see.

    Args:
        requested: ``auto``, ``cpu`` or ``cuda``.
        torch_side: whether PyTorch variants run (else PyTorch is not asked).
    """
    if requested == "cpu":
        return "cpu"
    return choose_device(requested, jax_gpu=jax_has_gpu(), torch_cuda=torch_has_cuda() if torch_side else None)


def share_gpu_memory() -> None:
    """Lets PyTorch and JAX share one GPU in one process: JAX then allocates on demand.

    By default JAX reserves 75% of a GPU's memory when its backend starts,
    which would leave PyTorch's variants a quarter of it. This sets
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the user set it; it takes
    effect only if called before JAX's GPU backend starts.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def jax_device(device: str) -> Any:
    """JAX's first device of ``device`` (``cpu`` or ``cuda``)."""
    import jax

    return jax.devices(_JAX_BACKENDS[device])[0]


@contextlib.contextmanager
def on_device(device: str) -> Iterator[None]:
    """Runs JAX work started inside on ``device`` (``cpu`` or ``cuda``), where PyTorch's side runs too.

    The suite compares the two frameworks on the same device. On a machine
    with a GPU, JAX would otherwise put the jaxnet variants there even when
    the PyTorch ones run on the processor. The probe subprocesses get
    ``JAX_PLATFORMS`` (:data:`JAX_PLATFORMS`) for the same reason.
    """
    import jax

    with jax.default_device(jax_device(device)):
        yield


def on_the_cpu() -> contextlib.AbstractContextManager[None]:
    """:func:`on_device` for the CPU: JAX work started inside runs on the processor, beside PyTorch's CPU tensors."""
    return on_device("cpu")


def describe_device(device: str) -> dict[str, Any]:
    """The benchmark's device: JAX's platform and device kind, and on cuda PyTorch's name for the GPU.

    Returns:
        ``{"name": device, "platform", "kind"}``, plus on cuda ``gpu``
        (``torch.cuda.get_device_name()``, None without a CUDA torch),
        ``torch_cuda`` (the CUDA version that torch was built with) and the
        float32 matmul settings, ``jax_matmul_precision``
        (``jax_default_matmul_precision``, None: XLA's default, which may use
        TF32 on a GPU) and ``torch_matmul_precision``
        (``torch.get_float32_matmul_precision()``, ``highest``: no TF32):
        they decide how closely float32 losses can agree there.
    """
    import jax

    jax_dev = jax_device(device)
    info: dict[str, Any] = {"name": device, "platform": jax_dev.platform, "kind": jax_dev.device_kind}
    if device == "cuda":
        info.update(gpu=None, torch_cuda=None, torch_matmul_precision=None)
        precision = getattr(jax.config, "jax_default_matmul_precision", None)  # typed as absent from Config
        info["jax_matmul_precision"] = None if precision is None else str(precision)
        if torch_has_cuda():
            import torch

            info.update(
                gpu=torch.cuda.get_device_name(),
                torch_cuda=torch.version.cuda,
                torch_matmul_precision=torch.get_float32_matmul_precision(),
            )
    return info


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
    for name in (*_PACKAGES, *_GPU_PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in _PACKAGES:
                out[name] = None
    return out


def machine_info(
    *, cores: int | None = None, fma_units: int = 2, device: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that identifies the machine a benchmark ran on.

    Args:
        cores: cores used (default: :func:`usable_cores`).
        fma_units: FMA pipes per core for the peak (see the module docstring).
        device: the device both frameworks ran on, e.g. :func:`describe_device`'s
            ``{"platform": "cpu", ...}``; on another platform than ``cpu`` no
            peak is given (the CPU's does not apply).

    Returns:
        A JSON-ready dict: ``cpu``, ``cores``, ``mhz``, ``vector``,
        ``peak_gflops`` and how it was computed, ``load_average``, ``platform``,
        ``device``.
    """
    cpu = cpu_info()
    cores = usable_cores() if cores is None else cores
    mhz = cpu["mhz"] or 0.0
    peak = peak_gflops(mhz, cores, cpu["flags"], fma_units=fma_units)
    on_cpu = (device or {}).get("platform", "cpu") == "cpu"
    formula = (
        f"{cores} cores x {mhz / 1000:.2f} GHz x {peak['flops_per_cycle']} fp32 FLOP/cycle "
        f"({peak['vector']}: lanes x 2 (FMA) x {fma_units} FMA units)"
        if on_cpu
        else "none: the benchmark ran on a GPU, where the CPU's peak does not apply"
    )
    return {
        "cpu": cpu["model"],
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "mhz": mhz,
        "vector": peak["vector"],
        "fma": "fma" in cpu["flags"],
        "flops_per_cycle_per_core": peak["flops_per_cycle"],
        "peak_gflops": round(peak["gflops"], 1) if mhz and on_cpu else None,
        "peak_formula": formula,
        "load_average": load_average(),
        "platform": platform.platform(),
        "device": dict(device or {}),
    }
