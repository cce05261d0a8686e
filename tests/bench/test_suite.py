"""jaxnet.bench.suite: a run's rows (steps, repeats, loss agreement, compile counts) and every variant's."""

from __future__ import annotations

import json

import jax
import pytest

from jaxnet.bench import report
from jaxnet.bench.workload import QUICK_PLAN, default_steps
from tests.bench.helpers import run_cli
from tests.helpers import HAVE_TORCH, needs_torch


def test_quick_bench_ends_with_json_that_matches_the_schema(quick_run):
    result, stdout, _ = quick_run
    assert report.validate(result) == []
    model, batch = QUICK_PLAN[0]
    steps = default_steps(model, batch)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == (["torch-eager", "jax-jit"] if HAVE_TORCH else ["jax-jit"])
    for row in rows:
        assert (row["model"], row["batch_size"], row["steps"], row["repeats"]) == (model, batch, steps, 5)
        assert row["steps_per_sec_min"] <= row["steps_per_sec"] <= row["steps_per_sec_max"]
        assert row["first_step_seconds"] > 0 and row["peak_rss_mb"] is not None
        assert row["losses_agree"] and len(row["first_losses"]) == 3
        assert row["flops_per_step"] > 0 and row["gflops_per_sec"] > 0
    jit = rows[-1]
    assert jit["steady_state_compiles"] == 0 and jit["warmup_compiles"] > 0
    assert jit["first_step_seconds_warm"] is not None and jit["cache_files"] > 0  # the cache was written
    assert result["machine"]["cores"] >= 1 and result["versions"]["jax"] == jax.__version__
    assert "| model | batch | variant |" in stdout  # the Markdown table precedes the JSON line


@needs_torch
@pytest.mark.slow
def test_every_variant_on_a_dropout_model_agrees_and_is_probed(tmp_path):
    code, stdout, stderr = run_cli(
        ["bench", "--model", "mlp", "--batch-size", "32", "--steps", "3", "--json", "--out", str(tmp_path)]
    )
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert report.validate(result) == []
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"torch-eager", "torch-eager-ftz", "torch-compile", "jax-jit", "jax-scan"}
    assert all(r["losses_agree"] for r in rows.values())  # dropout off: same losses everywhere
    assert rows["torch-compile"]["first_step_seconds_warm"] is not None
    assert rows["torch-eager"]["first_step_seconds_warm"] is None  # eager has no cache to warm
    assert rows["jax-scan"]["steady_state_compiles"] == 0 and rows["torch-eager-ftz"]["flush_denormal"]
