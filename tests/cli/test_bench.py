"""``jaxnet bench`` (jaxnet.cli.bench): its parser, its one-line errors, and ``python -m jaxnet.bench``."""

from __future__ import annotations

import contextlib
import io

import pytest

from jaxnet.cli import bench as cli
from jaxnet.cli import build_parser
from tests.cli.helpers import run_main


def test_cli_narrows_the_run_and_rejects_bad_names(capsys):
    parser = build_parser(("bench",))
    args = parser.parse_args(
        [
            "bench",
            "--model",
            "mlp",
            "--batch-size",
            "64,512",
            "--variants",
            "torch-eager,jax-jit",
            "--steps",
            "10",
            "--repeats",
            "7",
        ]
    )
    assert args.variants == ["torch-eager", "jax-jit"] and args.repeats == 7 and args.func is cli.run_bench
    workloads = cli.build_workloads(args)
    assert [(w.model, w.batch_size, w.steps, w.optimizer) for w in workloads] == [
        ("mlp", 64, 10, "adam"),
        ("mlp", 512, 10, "adam"),
    ]
    code, _, err = run_main(capsys, "bench", "--variants", "torch-eager,jax-pmap", "--no-probe")
    assert code == 2 and "unknown variants ['jax-pmap']" in err
    code, _, err = run_main(capsys, "bench", "--model", "resnet", "--no-probe")
    assert code == 2 and "unknown model 'resnet'" in err and "mlp" in err
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["bench", "--batch-size", "0"])


def test_python_m_jaxnet_bench_offers_only_bench(capsys):
    code = cli.main(["bench", "--model", "resnet", "--no-probe"])
    assert code == 2 and "jaxnet: error: unknown model 'resnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["train"])
    assert info.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


def test_the_old_module_path_is_the_same_module():
    import jaxnet.bench
    import jaxnet.bench.cli

    assert jaxnet.bench.cli is cli
    assert (jaxnet.bench.register_cli, jaxnet.bench.run_bench, jaxnet.bench.build_workloads) == (
        cli.register_cli,
        cli.run_bench,
        cli.build_workloads,
    )


def test_tta_with_cifar_speed_runs_the_speedruns_time_to_accuracy_on_cifar10(capsys, tmp_path, monkeypatch):
    from jaxnet.bench import report, speedrun_accuracy
    from tests.cli.test_train_speedrun import write_tiny_cifar

    write_tiny_cifar(tmp_path)
    calls = []

    def fake(data, variant, *, recipe, device, threads, **_):
        calls.append((variant, device, data.num_train, data.image_shape, recipe.batch_size))
        return {
            "model": "cifar_speed",
            "variant": variant,
            "target": 0.94,
            "reached": variant == "jax-jit",
            "seconds": 12.0 if variant == "jax-jit" else None,
            "steps": 7 if variant == "jax-jit" else None,
            "final_accuracy": 0.95 if variant == "jax-jit" else 0.93,
            "curve": [[12.0, 7, 0.95]],
            "stopped": "recipe done (9.9 epochs)",
        }

    monkeypatch.setattr(speedrun_accuracy, "speedrun_time_to_accuracy", fake)
    code, result, err = run_main(
        capsys, "bench", "--model", "cifar_speed", "--tta", "--data-dir", str(tmp_path), "--no-probe", "--json"
    )
    assert code == 0, err
    assert calls == [("jax-jit", "cpu", 500, (32, 32, 3), 1024), ("torch-eager", "cpu", 500, (32, 32, 3), 1024)]
    assert [r["variant"] for r in result["time_to_accuracy"]] == ["jax-jit", "torch-eager"]
    assert result["rows"] == [] and not report.validate(result)
    assert "not the full CIFAR-10" in err  # the tiny set is named as such
    calls.clear()  # --batch-size picks the recipe's batch (the same per-example schedule), once per size
    argv = ["bench", "--model", "cifar_speed", "--tta", "--tta-variants", "jax-jit", "--batch-size", "256,512"]
    code, result, err = run_main(capsys, *argv, "--data-dir", str(tmp_path), "--json")
    assert code == 0, err
    assert [c[-1] for c in calls] == [256, 512] and len(result["time_to_accuracy"]) == 2
    code, _, err = run_main(capsys, "bench", "--model", "cifar_speed", "--tta", "--tta-variants", "jax-scan")
    assert code == 2 and "cifar_speed runs jax-jit, jax-jit-bf16" in err
