"""The bench's newer variants (bf16, max-autotune) and ``cifar_speed`` as a bench model, on the CPU.

``cifar_speed`` runs here with conv groups of (8, 16, 16) channels: the
published (64, 256, 256) net takes seconds per step on this machine, and
the code paths are the same. PyTorch runs on one thread: on a busy 2-core
machine, two threads spend most of their time waiting for each other.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.bench import machine, report
from jaxnet.bench.suite import (
    AGREEMENT_RTOL,
    BF16_RTOL,
    agreement_reference,
    check_agreement,
    run_suite,
    run_workload,
)
from jaxnet.bench.variants import count_flops, has_dropout, initial_state_dict, make_runner
from jaxnet.bench.workload import SPEED_WIDTHS, Workload, make_batch_pool, make_workload
from jaxnet.errors import ConfigError
from jaxnet.models.cifar_speed import WIDTHS
from tests.helpers import needs_torch

SMALL = (8, 16, 16)


def test_agreement_uses_bf16s_tolerance_where_a_side_is_bf16():
    ref = [2.0, 1.8, 1.6]
    off = [x * 1.02 for x in ref]  # 2%: beyond float32's tolerance, within bf16's
    losses = {"torch-eager": ref, "jax-jit": off, "jax-jit-bf16": off, "torch-bf16": ref}
    assert agreement_reference(list(losses)) == "torch-eager"
    agreement = check_agreement(losses, "torch-eager")
    assert not agreement["jax-jit"]["losses_agree"] and agreement["jax-jit"]["loss_rtol"] == AGREEMENT_RTOL
    assert agreement["jax-jit-bf16"]["losses_agree"] and agreement["jax-jit-bf16"]["loss_rtol"] == BF16_RTOL
    assert agreement_reference(["torch-bf16", "jax-jit-bf16", "jax-jit"]) == "jax-jit"  # a float32 one
    assert agreement_reference(["torch-bf16", "jax-jit-bf16"]) == "torch-bf16"
    assert check_agreement({"torch-bf16": ref, "jax-jit-bf16": off}, "torch-bf16")["jax-jit-bf16"]["losses_agree"]


@needs_torch
def test_bf16_variants_compute_in_bf16_and_agree_with_each_other():
    workload = make_workload("mlp128", 16, 3)
    state_dict = initial_state_dict(workload)
    runners = {
        v: make_runner(v, workload, state_dict=state_dict, dropout=False, threads=1)
        for v in ("torch-eager", "jax-jit", "torch-bf16", "jax-jit-bf16")
    }
    losses = {v: r.run(3, record=True) for v, r in runners.items()}
    np.testing.assert_allclose(losses["jax-jit"], losses["torch-eager"], rtol=AGREEMENT_RTOL)
    np.testing.assert_allclose(losses["jax-jit-bf16"], losses["torch-bf16"], rtol=BF16_RTOL)
    assert losses["jax-jit-bf16"] != losses["jax-jit"] and losses["torch-bf16"] != losses["torch-eager"]
    assert all(a["losses_agree"] for a in check_agreement(losses, "torch-eager").values())
    bf16 = runners["jax-jit-bf16"]
    assert bf16.variant == "jax-jit-bf16"
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.state.params)} == {jnp.dtype(jnp.float32)}  # fp32 weights


def test_cifar_speed_workloads_keep_their_widths_and_uint8_pixels():
    assert SPEED_WIDTHS == WIDTHS and make_workload("cifar_speed", 512, 2).widths == WIDTHS
    workload = make_workload("cifar_speed", 16, 3, widths=SMALL)
    assert Workload(**json.loads(json.dumps(workload.to_dict()))) == workload  # what a probe subprocess gets
    images, labels = make_batch_pool(workload)
    assert images.dtype == np.uint8 and images.shape == (8, 16, 32, 32, 3) and labels.shape == (8, 16)
    assert workload.steps_per_epoch == 50000 // 16 and not has_dropout("cifar_speed")
    with pytest.raises(ConfigError, match="jax-scan is not offered for cifar_speed"):
        make_runner("jax-scan", workload)
    with pytest.raises(ConfigError, match="three positive"):
        make_workload("cifar_speed", 16, 3, widths=(8, 16))


@needs_torch
def test_cifar_speed_trains_alike_in_both_frameworks_and_its_result_validates():
    workload = make_workload("cifar_speed", 16, 3, widths=SMALL)
    variants = ["torch-eager", "jax-jit"]
    with machine.on_the_cpu():
        result = run_suite([workload], variants, repeats=1, threads=1, probes=False, log=lambda _: None)
    assert report.validate(result) == []
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == variants and result["config"]["device"] == "cpu"
    first = {v: r["first_losses"] for v, r in rows.items()}
    assert len(first["jax-jit"]) == 3 and 1.5 < first["jax-jit"][0] < 3.5  # per example, about ln(10)
    np.testing.assert_allclose(first["jax-jit"], first["torch-eager"], rtol=1e-4)  # same weights, same steps
    assert all(r["losses_agree"] for r in rows.values()) and rows["jax-jit"]["steady_state_compiles"] == 0
    assert rows["jax-jit"]["precision"] == "fp32" and rows["jax-jit"]["flops_per_step"] > 0


@needs_torch
@pytest.mark.slow
def test_max_autotune_agrees_with_eager_and_the_new_variants_are_probed():
    workload = make_workload("mlp128", 16, 3)
    variants = ["torch-eager", "torch-compile-max", "torch-bf16", "jax-jit-bf16"]
    with machine.on_the_cpu():
        rows = {r["variant"]: r for r in run_workload(workload, variants, repeats=1, threads=1, log=lambda _: None)}
    assert all(report.validate(r, report.ROW_SCHEMA) == [] for r in rows.values())
    np.testing.assert_allclose(
        rows["torch-compile-max"]["first_losses"], rows["torch-eager"]["first_losses"], rtol=1e-4
    )
    assert rows["torch-compile-max"]["loss_rtol"] == AGREEMENT_RTOL and rows["torch-compile-max"]["losses_agree"]
    assert rows["torch-bf16"]["losses_agree"] and rows["jax-jit-bf16"]["losses_agree"]
    assert rows["torch-compile-max"]["first_step_seconds_warm"] is not None  # Inductor's cache was warm
    assert (
        rows["jax-jit-bf16"]["first_step_seconds_warm"] is not None
        and rows["torch-bf16"]["first_step_seconds_warm"] is None
    )


@needs_torch
@pytest.mark.slow
def test_cifar_speed_in_bf16_agrees_across_frameworks_and_is_probed_in_a_subprocess():
    from jaxnet.bench.probe import first_step_latency

    workload = make_workload("cifar_speed", 16, 3, widths=SMALL)
    with machine.on_the_cpu():
        rows = run_workload(
            workload, ["torch-eager", "torch-bf16", "jax-jit-bf16"], repeats=1, threads=1, probes=False, log=print
        )
    first = {r["variant"]: r["first_losses"] for r in rows}
    np.testing.assert_allclose(first["jax-jit-bf16"], first["torch-bf16"], rtol=BF16_RTOL)
    assert all(r["losses_agree"] and r["loss_rtol"] == BF16_RTOL for r in rows if r["precision"] == "bf16")
    assert rows[-1]["steady_state_compiles"] == 0 and rows[0]["flops_per_step"] == count_flops(workload) > 0
    measured = first_step_latency(workload, "torch-eager", initial_state_dict(workload), threads=1)
    assert measured["first_step_seconds"] > 0 and measured["first_step_seconds_warm"] is None  # eager: no cache
    assert measured["peak_device_mb"] is None  # no GPU
