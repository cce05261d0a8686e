"""jaxnet.bench.machine: the CPU's peak FLOP/s from its flags, and what /proc/cpuinfo says."""

from __future__ import annotations

from jaxnet.bench import machine


def test_peak_flops_from_the_cpu_flags(tmp_path):
    assert machine.peak_gflops(2000.0, 2, {"avx2", "fma"})["gflops"] == 128.0
    assert machine.peak_gflops(2500.0, 1, {"avx512f", "avx2", "fma"})["flops_per_cycle"] == 64
    assert machine.peak_gflops(1000.0, 1, set())["vector"] == "sse"
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: Other\n"
    )
    assert machine.cpu_info(str(fake)) == {"model": "Test CPU", "mhz": 3000.0, "flags": {"fpu", "avx", "avx2", "fma"}}
    info = machine.machine_info(cores=2)
    assert info["peak_gflops"] is None or info["peak_gflops"] > 0
