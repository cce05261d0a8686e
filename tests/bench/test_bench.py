"""The benchmark harness: its JSON validates, its variants agree, compilations are counted."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import CompileCounter, create_train_state, loss_for_output, make_train_step
from jaxnet.bench import cli, machine, report
from jaxnet.bench.workload import QUICK_PLAN, default_steps, make_batch_pool, make_workload
from jaxnet.data import iterate_batches, load_dataset
from jaxnet.models import create_model
from jaxnet.train import fit

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One reduced ``jaxnet bench --quick --json --out DIR`` (the CI mode), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    variants = "torch-eager,jax-jit" if HAVE_TORCH else "jax-jit"
    code, stdout, stderr = run_cli(["bench", "--quick", "--variants", variants, "--json", "--out", str(out)])
    assert code == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stdout, out


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


def test_quick_bench_writes_json_markdown_charts_and_the_page(quick_run):
    result, _, out = quick_run
    assert json.loads((out / "bench.json").read_text()) == result
    assert (out / "bench.md").read_text().startswith("| model |")
    assert (out / "bench_steps_per_sec.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "static_vs_dynamic.md").read_text()
    assert "# Static vs dynamic, measured" in page and result["machine"]["cpu"] in page
    assert "![" in page and "bench_steps_per_sec.png" in page
    assert "Compilations during the timed repeats of the jax variants: none" in page


def test_render_rewrites_the_outputs_of_an_earlier_run_without_measuring(quick_run, tmp_path):
    result, stdout, out = quick_run
    code, rendered, err = run_cli(["bench", "--render", str(out / "bench.json"), "--out", str(tmp_path)])
    assert code == 0, err
    assert rendered == report.markdown_tables(result) and "round 1" not in err  # nothing was timed
    assert (tmp_path / "static_vs_dynamic.md").read_text() == (out / "static_vs_dynamic.md").read_text()
    (tmp_path / "broken.json").write_text("{")
    code, _, err = run_cli(["bench", "--render", str(tmp_path / "broken.json")])
    assert code == 2 and "is not a bench.json" in err


def test_the_schema_rejects_what_it_should(quick_run):
    result = quick_run[0]
    bad = copy.deepcopy(result)
    del bad["rows"][0]["steps_per_sec"]
    bad["rows"][-1]["variant"] = "jax-pmap"
    bad["rows"][-1]["batch_size"] = "64"
    bad["machine"]["cores"] = 0
    errors = report.validate(bad)
    assert any("missing required key 'steps_per_sec'" in e for e in errors)
    assert any("'jax-pmap' is not one of" in e for e in errors)
    assert any("batch_size: expected integer" in e for e in errors)
    assert any("cores: 0 is below the minimum" in e for e in errors)
    assert "$.rows: expected array, got str 'no'" in report.validate({"rows": "no"})


@needs_torch
@pytest.mark.slow
def test_every_variant_on_a_dropout_model_agrees_and_is_probed(tmp_path):
    code, stdout, stderr = run_cli(["bench", "--model", "mlp", "--batch-size", "32", "--steps", "3",
                                    "--json", "--out", str(tmp_path)])
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert report.validate(result) == []
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"torch-eager", "torch-eager-ftz", "torch-compile", "jax-jit", "jax-scan"}
    assert all(r["losses_agree"] for r in rows.values())  # dropout off: same losses everywhere
    assert rows["torch-compile"]["first_step_seconds_warm"] is not None
    assert rows["torch-eager"]["first_step_seconds_warm"] is None  # eager has no cache to warm
    assert rows["jax-scan"]["steady_state_compiles"] == 0 and rows["torch-eager-ftz"]["flush_denormal"]


def test_cli_narrows_the_run_and_rejects_bad_names():
    parser = argparse.ArgumentParser(prog="jaxnet")
    cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", "mlp", "--batch-size", "64,512", "--variants",
                              "torch-eager,jax-jit", "--steps", "10", "--repeats", "7"])
    assert args.variants == ["torch-eager", "jax-jit"] and args.repeats == 7 and args.func is cli.run_bench
    workloads = cli.build_workloads(args)
    assert [(w.model, w.batch_size, w.steps, w.optimizer) for w in workloads] == [
        ("mlp", 64, 10, "adam"), ("mlp", 512, 10, "adam")]
    code, _, err = run_cli(["bench", "--variants", "torch-eager,jax-pmap", "--no-probe"])
    assert code == 2 and "unknown variants ['jax-pmap']" in err
    code, _, err = run_cli(["bench", "--model", "resnet", "--no-probe"])
    assert code == 2 and "unknown model 'resnet'" in err and "mlp" in err
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["bench", "--batch-size", "0"])


def test_batch_pool_is_identical_across_calls_and_fits_the_model():
    workload = make_workload("cifar_cnn", 4, 2)
    images, labels = make_batch_pool(workload)
    again, _ = make_batch_pool(workload)
    assert images.shape == (8, 4, 32, 32, 3) and labels.shape == (8, 4) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, again)  # subprocesses regenerate the same batches
    x, y = make_batch_pool(make_workload("linear", 4, 2))
    np.testing.assert_allclose(y, 2.0 * x[..., 0])


def test_peak_flops_from_the_cpu_flags(tmp_path):
    assert machine.peak_gflops(2000.0, 2, {"avx2", "fma"})["gflops"] == 128.0
    assert machine.peak_gflops(2500.0, 1, {"avx512f", "avx2", "fma"})["flops_per_cycle"] == 64
    assert machine.peak_gflops(1000.0, 1, set())["vector"] == "sse"
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: Other\n")
    assert machine.cpu_info(str(fake)) == {"model": "Test CPU", "mhz": 3000.0, "flags": {"fpu", "avx", "avx2", "fma"}}
    info = machine.machine_info(cores=2)
    assert info["peak_gflops"] is None or info["peak_gflops"] > 0


@needs_torch
@pytest.mark.parametrize("name", ["mlp", "mlp512", "mlp128", "convnet", "cifar_cnn", "linear"])
def test_torch_twins_give_the_same_outputs_from_the_same_weights(name):
    import torch

    from jaxnet.bench.torch_models import build_torch_model
    from jaxnet.interop import to_torch_state_dict

    model = create_model(name, seed=3)
    model.eval()
    twin = build_torch_model(name, to_torch_state_dict(model)).eval()
    shape = (2, 1) if name == "linear" else (2, *((32, 32, 3) if name == "cifar_cnn" else (28, 28, 1)))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nchw = x if x.ndim == 2 else x.transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = twin(torch.from_numpy(np.ascontiguousarray(nchw))).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)


def test_compile_counter_catches_a_shape_unstable_loop():
    model = create_model("mlp128", seed=0)
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, tx, loss_for_output("logits"), donate=False)
    images = np.random.default_rng(0).random((100, 28, 28, 1), dtype=np.float32)
    labels = np.zeros(100, np.int32)

    def epoch(state, drop_last):
        for batch in iterate_batches(images, labels, 32, drop_last=drop_last):
            state, _ = step(state, batch)
        return state

    state = epoch(state, drop_last=False)  # first epoch: compiles for 32 and for the last batch of 4
    with CompileCounter() as stable:
        state = epoch(state, drop_last=True)
    assert stable.compiles == 0
    with CompileCounter() as unstable:  # a loop whose batch size changes every step: one compile each
        for size in (5, 6, 7):
            state, _ = step(state, {"image": images[:size], "label": labels[:size]})
    assert unstable.compiles == 3 and unstable.traces >= 3


def test_fit_reports_zero_steady_state_compilations():
    sample = load_dataset("mnist", download=False)
    small = dataclasses.replace(sample, train_images=sample.train_images[:640], train_labels=sample.train_labels[:640],
                                test_images=sample.test_images[:200], test_labels=sample.test_labels[:200])
    result = fit(create_model("mlp128", seed=0), small, optax.adam(1e-3), epochs=2, batch_size=64, progress=False)
    assert result.summary["compilations"] > 0
    assert result.summary["steady_state_compilations"] == 0


@pytest.mark.parametrize("variant", ["jax-jit", pytest.param("torch-eager", marks=needs_torch)])
def test_time_to_accuracy_reaches_an_easy_target(variant):
    from jaxnet.bench.accuracy import time_to_accuracy

    sample = load_dataset("mnist", download=False)
    small = dataclasses.replace(sample, train_images=sample.train_images[:3200],
                                train_labels=sample.train_labels[:3200])
    result = time_to_accuracy("mlp512", small, variant, target=0.85, eval_every=10, max_seconds=120, threads=2)
    assert result["reached"], result["curve"]
    assert result["seconds"] > 0 and result["steps"] % 10 == 0 and result["final_accuracy"] >= 0.85
    assert report.validate(result, report.TTA_SCHEMA) == []


@needs_torch
@pytest.mark.slow
def test_time_to_accuracy_on_real_mnist(shared_data):
    from jaxnet.bench.accuracy import time_to_accuracy

    data = load_dataset("mnist", data_dir=shared_data, download=False)
    for variant in ("jax-jit", "torch-eager-ftz"):
        result = time_to_accuracy("mlp", data, variant, max_seconds=300, threads=2)
        # The tutorial recipe (constant lr 1e-3) ends 5 epochs at 97.7-98.2% depending on the seed,
        # in PyTorch as in jaxnet, so 98% is reported ("reached"), not required; the run must
        # still learn the task and report a well-formed curve.
        assert report.validate(result, report.TTA_SCHEMA) == [], result
        assert result["final_accuracy"] >= 0.97, (variant, result["curve"])
        assert result["curve"][-1][1] > result["curve"][0][1]  # steps grow along the curve
