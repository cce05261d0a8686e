"""``jaxnet bench --device``: which device runs, the refusals on cuda, and the cuda code paths with fakes.

This machine has no GPU: the decisions are pure functions
(:func:`jaxnet.bench.machine.choose_device`, ``workload.default_variants``,
``workload.check_variants``, ``probe.probe_env``) tested directly, and what
touches CUDA (``torch.cuda.is_available``, ``jax.devices("gpu")``,
``torch.cuda.synchronize``) is replaced by fakes.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.bench import machine, page, probe, report
from jaxnet.bench.workload import (
    CPU_VARIANTS,
    CUDA_VARIANTS,
    check_variants,
    default_variants,
    make_workload,
)
from jaxnet.errors import ConfigError
from tests.cli.helpers import run_main
from tests.helpers import needs_torch


def test_auto_takes_the_gpu_only_when_every_side_that_runs_has_one():
    assert machine.choose_device("auto", jax_gpu=True, torch_cuda=True) == "cuda"
    assert machine.choose_device("auto", jax_gpu=True, torch_cuda=False) == "cpu"
    assert machine.choose_device("auto", jax_gpu=False, torch_cuda=True) == "cpu"
    assert machine.choose_device("auto", jax_gpu=True, torch_cuda=None) == "cuda"  # no PyTorch variant runs
    assert machine.choose_device("cpu", jax_gpu=True, torch_cuda=True) == "cpu"
    assert machine.choose_device("cuda", jax_gpu=True, torch_cuda=True) == "cuda"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        machine.choose_device("tpu", jax_gpu=True, torch_cuda=True)


def test_cuda_without_a_gpu_names_the_side_and_the_fix():
    with pytest.raises(ConfigError) as jax_side:
        machine.choose_device("cuda", jax_gpu=False, torch_cuda=True)
    assert "JAX has no GPU device" in str(jax_side.value) and 'pip install "jaxnet[cuda12]"' in str(jax_side.value)
    assert "PyTorch" not in str(jax_side.value)
    with pytest.raises(ConfigError) as torch_side:
        machine.choose_device("cuda", jax_gpu=True, torch_cuda=False)
    message = str(torch_side.value)
    assert "PyTorch sees no CUDA device" in message and "CUDA build of torch==2.13.0" in message
    assert "JAX" not in message and "--device cpu" in message
    with pytest.raises(ConfigError, match="JAX has no GPU.*PyTorch sees no CUDA"):
        machine.choose_device("cuda", jax_gpu=False, torch_cuda=False)


def test_the_gpu_probes_read_what_jax_and_torch_see(monkeypatch):
    real_devices = jax.devices

    def no_gpu_backend(backend=None):
        if backend == "gpu":
            raise RuntimeError("Unknown backend gpu")
        return real_devices(backend)

    monkeypatch.setattr(jax, "devices", no_gpu_backend)
    assert machine.jax_has_gpu() is False  # the RuntimeError is caught
    assert machine.select_device("auto") == "cpu"
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "devices", lambda backend=None: [gpu] if backend == "gpu" else real_devices(backend))
    assert machine.jax_has_gpu() is True
    assert machine.select_device("auto", torch_side=False) == "cuda"  # PyTorch not asked
    assert machine.select_device("cpu") == "cpu"


@needs_torch
def test_torch_cuda_decides_auto_and_names_the_gpu(monkeypatch):
    import torch

    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    real_devices = jax.devices
    monkeypatch.setattr(jax, "devices", lambda backend=None: [gpu] if backend == "gpu" else real_devices(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.select_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="PyTorch sees no CUDA device"):
        machine.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert machine.select_device("auto") == "cuda" == machine.select_device("cuda")
    device = machine.describe_device("cuda")
    assert device == {
        "name": "cuda",
        "platform": "gpu",
        "kind": "NVIDIA H200",
        "gpu": "NVIDIA H200",
        "torch_cuda": "12.8",
        "torch_matmul_precision": torch.get_float32_matmul_precision(),
        "jax_matmul_precision": getattr(jax.config, "jax_default_matmul_precision", None),
    }
    info = machine.machine_info(cores=2, device=device)
    assert info["peak_gflops"] is None and "GPU" in info["peak_formula"]  # the CPU's peak does not apply
    assert info["cpu"] and info["device"]["gpu"] == "NVIDIA H200"


def test_jax_runs_where_on_device_says_and_on_the_cpu_still_works():
    for context in (machine.on_device("cpu"), machine.on_the_cpu()):
        with context:
            placed, computed = jax.device_put(np.ones(3)), jax.jit(lambda a: a * 2)(jnp.ones(3))
        assert {next(iter(a.devices())).platform for a in (placed, computed)} == {"cpu"}
    assert machine.describe_device("cpu") == {"name": "cpu", "platform": "cpu", "kind": "cpu"}


def test_default_variants_per_device_and_model():
    assert default_variants("mlp", "cpu") == CPU_VARIANTS
    assert CPU_VARIANTS == ("torch-eager", "torch-eager-ftz", "torch-compile", "jax-jit", "jax-scan")
    assert default_variants("mlp", "cuda") == CUDA_VARIANTS
    assert CUDA_VARIANTS == (
        "torch-eager",
        "torch-compile",
        "torch-compile-max",
        "torch-bf16",
        "jax-jit",
        "jax-jit-bf16",
    )
    assert "jax-scan" not in default_variants("cifar_speed", "cpu")
    assert default_variants("cifar_speed", "cuda") == CUDA_VARIANTS


def test_refusals_say_why():
    with pytest.raises(ConfigError, match="torch-eager-ftz runs on the CPU only.*CPU setting"):
        check_variants(["torch-eager", "torch-eager-ftz"], "mlp", "cuda")
    check_variants(["torch-eager-ftz"], "mlp", "cpu")
    with pytest.raises(ConfigError, match="jax-scan is not offered for cifar_speed"):
        check_variants(["jax-scan"], "cifar_speed", "cpu")
    with pytest.raises(ConfigError, match=r"unknown variants \['jax-pmap'\]"):
        check_variants(["jax-pmap"], "mlp", "cpu")


def test_the_cli_refuses_cuda_and_cpu_only_variants_before_measuring(capsys, monkeypatch):
    monkeypatch.setattr(machine, "jax_has_gpu", lambda: False)
    code, _, err = run_main(capsys, "bench", "--model", "mlp128", "--variants", "jax-jit", "--device", "cuda")
    assert code == 2 and "JAX has no GPU device" in err and "jaxnet[cuda12]" in err
    monkeypatch.setattr(machine, "jax_has_gpu", lambda: True)
    monkeypatch.setattr(machine, "torch_has_cuda", lambda: True)
    code, _, err = run_main(capsys, "bench", "--model", "mlp128", "--variants", "torch-eager-ftz", "--device", "cuda")
    assert code == 2 and "runs on the CPU only" in err
    code, _, err = run_main(capsys, "bench", "--model", "cifar_speed", "--variants", "jax-scan", "--device", "cpu")
    assert code == 2 and "jax-scan is not offered for cifar_speed" in err


def test_probes_run_jax_on_the_parents_device():
    cpu = probe.probe_env("/tmp/cache", "cpu", {"PATH": "/bin"})
    assert cpu["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in cpu and cpu["PATH"] == "/bin"
    assert cpu["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/cache/inductor"
    cuda = probe.probe_env("/tmp/cache", "cuda", {})
    assert cuda["JAX_PLATFORMS"] == "cuda" and cuda["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert probe.probe_env("/c", "cuda", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})[
        "XLA_PYTHON_CLIENT_PREALLOCATE"
    ] == (
        "true"  # the user's choice stands
    )


@needs_torch
def test_torch_waits_for_cuda_once_per_run_and_leaves_the_threads_alone(monkeypatch):
    import torch

    from jaxnet.bench import variants

    calls = {"synchronize": 0, "threads": 0}
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda *a: calls.__setitem__("synchronize", calls["synchronize"] + 1)
    )
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.__setitem__("threads", calls["threads"] + 1))
    variants.wait_torch(torch, "cpu")
    assert calls["synchronize"] == 0  # eager CPU kernels are synchronous
    variants.wait_torch(torch, "cuda")
    assert calls["synchronize"] == 1
    # the cuda code path, its tensors placed on the CPU: only the placement is faked
    monkeypatch.setitem(variants._TORCH_PLACEMENT, "cuda", "cpu")
    workload = make_workload("mlp128", 8, 2)
    runner = variants.make_runner("torch-eager", workload, device="cuda", threads=1)
    assert calls["threads"] == 0  # torch.set_num_threads is a CPU setting
    losses = runner.run(3, record=True)
    assert calls["synchronize"] == 2 and len(losses) == 3  # one wait at the end of the run
    runner.run(2)
    assert calls["synchronize"] == 3
    variants.make_runner("torch-eager", workload, device="cpu", threads=1)
    assert calls["threads"] == 1


def _result_on_a_gpu() -> dict:
    """A minimal result as a cuda run writes it (the machine has no peak, the rows no share of it)."""
    row = {
        "model": "mlp128",
        "batch_size": 32,
        "variant": "jax-jit-bf16",
        "device": "cuda",
        "precision": "bf16",
        "steps": 20,
        "repeats": 5,
        "steps_per_sec": 900.0,
        "steps_per_sec_min": 800.0,
        "steps_per_sec_max": 950.0,
        "epoch_seconds": 2.0,
        "first_step_seconds": 0.5,
        "first_step_seconds_warm": 0.1,
        "flops_per_step": 1e7,
        "gflops_per_sec": 9.0,
        "peak_fraction": None,
        "peak_rss_mb": 10.0,
        "peak_device_mb": 64.0,
        "warmup_compiles": 2,
        "steady_state_compiles": 0,
        "first_losses": [2.3, 2.2, 2.1],
        "loss_reference": "torch-eager",
        "loss_max_abs_diff": 0.01,
        "loss_rtol": 5e-2,
        "loss_atol": 1e-3,
        "losses_agree": True,
        "flush_denormal": False,
    }
    device = {"name": "cuda", "platform": "gpu", "kind": "NVIDIA H200", "gpu": "NVIDIA H200", "torch_cuda": "12.8"}
    info = {"cpu": "Test CPU", "cores": 16, "mhz": 2000.0, "peak_gflops": None, "load_average": None}
    info.update(device=device, vector="avx512", logical_cpus=16)
    return {
        "rows": [row],
        "machine": info,
        "versions": dict.fromkeys(("python", "jax", "jaxlib", "flax", "optax", "torch"), "1"),
        "config": {"device": "cuda"},
    }


def test_a_gpu_result_validates_and_its_page_names_the_gpu():
    result = _result_on_a_gpu()
    assert report.validate(result) == []
    text = page.render_page(result)
    assert "JAX and PyTorch on the GPU: NVIDIA H200" in text and "no peak is given for the GPU" in text
    assert "bf16 static graph" not in text  # no torch-bf16 row to compare with
    assert "| mlp128 | 32 | jax-jit-bf16 |" in report.markdown_tables(result)
    result["rows"][0]["device"] = "tpu"
    assert any("'tpu' is not one of" in e for e in report.validate(result))
