"""Tests of jaxnet.export: exact outputs in a fresh process, platforms, file inputs, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from jaxnet import checkpoint as C
from jaxnet.checkpoint import workdir as W
from jaxnet.errors import ConfigError, DataError
from jaxnet.export import ExportedModel, export_model, load_exported, predict_files, read_inputs, register_cli
from jaxnet.models import MODELS, create_model
from jaxnet.state import create_train_state
from jaxnet.step import make_predict_fn
from jaxnet.train import make_image_transform
from tests.helpers import REPO

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _trained_state(name: str, seed: int = 0):
    """A state whose weights moved away from the initialization (a few SGD steps on noise)."""
    spec = MODELS[name]
    tx = optax.sgd(0.05)
    graphdef, state = create_train_state(create_model(name, seed=seed), tx, seed=seed)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype) * 0.1, state.params)
    params = jax.tree.map(lambda p, g: p - g, state.params, grads)
    return spec, graphdef, state.replace(params=params)


def _images(shape, n=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Exported mlp (dropout, MNIST) and cifar_cnn (3 channels), with live outputs for 1, 7, 64 images."""
    folder = tmp_path_factory.mktemp("export")
    result = {}
    for name, mean, std in (("mlp", MNIST_MEAN, MNIST_STD), ("cifar_cnn", (0.5,) * 3, (0.5,) * 3)):
        spec, graphdef, state = _trained_state(name)
        transform = make_image_transform(mean, std)
        path = folder / f"{name}.jaxexport"
        path.write_bytes(export_model(graphdef, state, input_shape=spec.input_shape, transform=transform,
                                      output=spec.output, metadata={"model": name}))
        images = _images(spec.input_shape)
        np.save(folder / f"{name}_images.npy", images)
        live = make_predict_fn(graphdef, transform=transform)
        result[name] = {"path": path, "images": images,
                        "live": {n: np.asarray(live(state, images[:n])) for n in (1, 7, 64)}}
    return folder, result


_FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    folder, names = sys.argv[1], sys.argv[2:]
    report = {}
    # 1. The file alone, read with numpy and jax only: no jaxnet at all.
    import io, jax
    for name in names:
        with np.load(f"{folder}/{name}.jaxexport", allow_pickle=False) as z:
            info = json.loads(z["info"].tobytes())
            exported = jax.export.deserialize(bytearray(z["module"].tobytes()))
            weights = [z[f"w{i:04d}"] for i in range(len(info["weights"]))]
        images = np.load(f"{folder}/{name}_images.npy")
        for n in (1, 7, 64):
            np.save(f"{folder}/{name}_raw_{n}.npy", np.asarray(exported.call(weights, images[:n])))
    report["jaxnet_imported_by_raw_loader"] = any(m.startswith("jaxnet") for m in sys.modules)
    # 2. jaxnet's loader.
    from jaxnet.export import load_exported
    for name in names:
        model = load_exported(f"{folder}/{name}.jaxexport")
        images = np.load(f"{folder}/{name}_images.npy")
        for n in (1, 7, 64):
            np.save(f"{folder}/{name}_loaded_{n}.npy", model(images[:n]))
    report["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("jaxnet", "flax", "optax", "orbax"))
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def fresh_process(artifacts):
    """Runs the exported models in a new Python process and returns what it imported."""
    folder, result = artifacts
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(folder), *result], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_reproduces_live_predictions_exactly(artifacts, fresh_process):
    folder, result = artifacts
    assert fresh_process["jaxnet_imported_by_raw_loader"] is False
    for name, r in result.items():
        for n in (1, 7, 64):
            for how in ("raw", "loaded"):
                outputs = np.load(folder / f"{name}_{how}_{n}.npy")
                assert outputs.shape == r["live"][n].shape == (n, 10)
                np.testing.assert_array_equal(outputs, r["live"][n], err_msg=f"{name} {how} batch {n}")


def test_fresh_process_loader_does_not_import_model_code(fresh_process):
    # Needs jaxnet/__init__.py to import its submodules lazily (see the report):
    # importing jaxnet.export must not pull in jaxnet.models, flax, optax or orbax.
    imported = fresh_process["modules"]
    assert "jaxnet.models" not in imported and "flax" not in imported, (
        "loading an exported model imported "
        f"{[m for m in imported if m.count('.') < 1 or m.startswith('jaxnet')]}; "
        "jaxnet/__init__.py must import its submodules lazily"
    )


def test_exported_for_cpu_and_cuda_and_runs_on_cpu(artifacts):
    _, result = artifacts
    model = load_exported(result["mlp"]["path"])
    assert isinstance(model, ExportedModel)
    assert model.exported.platforms == ("cpu", "cuda") and model.info["platforms"] == ["cpu", "cuda"]
    assert jax.default_backend() == "cpu"
    assert model.input_shape == (28, 28, 1) and model.input_dtype == np.uint8
    assert model.info["output"] == "logits" and model.info["metadata"] == {"model": "mlp"}
    assert str(model.exported.in_avals[-1].shape[0]) == "b"  # symbolic batch
    np.testing.assert_array_equal(model(result["mlp"]["images"][:7]), result["mlp"]["live"][7])


def test_cpu_only_export(tmp_path):
    spec, graphdef, state = _trained_state("mlp128")
    path = tmp_path / "m.jaxexport"
    path.write_bytes(export_model(graphdef, state, input_shape=spec.input_shape,
                                  transform=make_image_transform(MNIST_MEAN, MNIST_STD), platforms=("cpu",)))
    assert load_exported(path).exported.platforms == ("cpu",)


def test_regression_model_takes_floats(tmp_path):
    spec, graphdef, state = _trained_state("linear")
    path = tmp_path / "linear.jaxexport"
    path.write_bytes(export_model(graphdef, state, input_shape=spec.input_shape, output="regression"))
    model = load_exported(path)
    x = np.array([[1.0], [2.0], [3.0]], np.float32)
    live = make_predict_fn(graphdef)(state, x)
    np.testing.assert_array_equal(model(x), np.asarray(live))
    with pytest.raises(ConfigError, match="regression model"):
        predict_files(model, [])


def test_bad_export_arguments():
    spec, graphdef, state = _trained_state("mlp128")
    with pytest.raises(ConfigError, match="input_shape"):
        export_model(graphdef, state, input_shape=(28, 0, 1))
    with pytest.raises(ConfigError, match="platform"):
        export_model(graphdef, state, input_shape=spec.input_shape, platforms=("cuda", "metal"))
    with pytest.raises(ConfigError, match=r"cannot export the model for inputs \(b, 32, 32, 3\)"):
        export_model(graphdef, state, input_shape=(32, 32, 3), transform=make_image_transform((0.5,) * 3, (0.5,) * 3))


# --- inputs ------------------------------------------------------------------------------------


def test_call_checks_shape_and_dtype(artifacts):
    _, result = artifacts
    model = load_exported(result["mlp"]["path"])
    image = result["mlp"]["images"][0]
    with pytest.raises(DataError, match=r"add a batch axis with x\[None\]"):
        model(image)
    with pytest.raises(DataError, match=r"\(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"):
        model(image[None].astype(np.float32) / 255)


def test_predict_files_npy_and_png(artifacts, tmp_path):
    _, result = artifacts
    model = load_exported(result["mlp"]["path"])
    images = result["mlp"]["images"][:7]
    expected = np.argmax(result["mlp"]["live"][7], axis=-1)
    np.save(tmp_path / "batch.npy", images)
    np.save(tmp_path / "batch_hw.npy", images[..., 0])  # (N, H, W): channel axis optional
    np.save(tmp_path / "one.npy", images[3, :, :, 0])
    Image.fromarray(images[4, :, :, 0], mode="L").save(tmp_path / "gray.png")
    Image.fromarray(images[5, :, :, 0], mode="L").convert("RGB").save(tmp_path / "rgb.png")
    files = [tmp_path / f for f in ("batch.npy", "batch_hw.npy", "one.npy", "gray.png", "rgb.png")]
    results = predict_files(result["mlp"]["path"], files)
    names = [r[0] for r in results]
    assert names[:7] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(7)]
    assert names[14:] == [str(tmp_path / f) for f in ("one.npy", "gray.png", "rgb.png")]
    classes = [r[1] for r in results]
    # Batch files classify like the live model; single images like it on a batch of one.
    assert classes[:7] == expected.tolist() and classes[7:14] == expected.tolist()
    singles = [int(np.argmax(model(images[i][None]))) for i in (3, 4, 5)]
    assert classes[14:] == singles
    for _, cls, probs in results:
        assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-9 and probs[cls] == probs.max()


def test_color_png_for_a_color_model(artifacts, tmp_path):
    _, result = artifacts
    image = result["cifar_cnn"]["images"][0]
    Image.fromarray(image, mode="RGB").save(tmp_path / "c.png")
    batch, batched = read_inputs(tmp_path / "c.png", (32, 32, 3))
    assert not batched
    np.testing.assert_array_equal(batch[0], image)  # PNG is lossless
    (_, cls, _), = predict_files(result["cifar_cnn"]["path"], [tmp_path / "c.png"])
    assert cls == int(np.argmax(result["cifar_cnn"]["live"][1][0]))


def test_bad_input_files(artifacts, tmp_path):
    _, result = artifacts
    path = result["mlp"]["path"]
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(tmp_path / "big.png")
    np.save(tmp_path / "float.npy", np.zeros((28, 28), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((3, 30, 30), np.uint8))
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "big.png": r"32x32 pixels but the model takes 28x28; resize",
        "float.npy": r"float32 values, the model takes raw pixels 0..255 \(uint8\)",
        "shape.npy": r"shape \(3, 30, 30\) is neither one example \(28, 28, 1\) nor a batch",
        "text.png": r"not a readable image",
        "absent.npy": r"no such file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            predict_files(path, [tmp_path / name])


def test_not_an_exported_model(tmp_path):
    (tmp_path / "x.jaxexport").write_bytes(b"garbage")
    with pytest.raises(DataError, match="is not a jaxnet exported model"):
        load_exported(tmp_path / "x.jaxexport")
    with pytest.raises(DataError, match="cannot read the exported model"):
        load_exported(tmp_path / "absent.jaxexport")


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxnet")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def workdir(tmp_path):
    """A run's workdir as jaxnet train leaves it: config.json and checkpoints at steps 10 and 20."""
    spec, graphdef, state = _trained_state("mlp128")
    work = tmp_path / "run"
    W.check_workdir(work, {"model": "mlp128", "dataset": "mnist", "mean": list(MNIST_MEAN),
                           "std": list(MNIST_STD), "seed": 0}, resume=False)
    ckpt = C.create_checkpoint_manager(W.checkpoint_directory(work), best_metric=C.DEFAULT_BEST_METRIC)
    C.save(ckpt, 10, state, meta={}, metrics={"test_accuracy": 0.9})
    later = state.replace(params=jax.tree.map(lambda p: p * 1.5, state.params))
    C.save(ckpt, 20, later, meta={}, metrics={"test_accuracy": 0.8})
    C.close(ckpt)
    return work, graphdef, {10: state, 20: later}


@pytest.mark.parametrize("step, expected", [("best", 10), ("latest", 20), ("20", 20)])
def test_cli_export_then_predict(workdir, tmp_path, capsys, step, expected):
    work, graphdef, states = workdir
    out = tmp_path / "model.jaxexport"
    args = _parser().parse_args(["export", "--workdir", str(work), "--out", str(out), "--step", step])
    assert args.func(args) is None
    assert f"checkpoint step {expected}" in capsys.readouterr().out
    model = load_exported(out)
    assert model.info["metadata"]["step"] == expected
    assert model.info["metadata"]["params_sha256"] == C.params_sha256(states[expected].params)
    images = _images((28, 28, 1), n=5, seed=3)
    live = make_predict_fn(graphdef, transform=make_image_transform(MNIST_MEAN, MNIST_STD))
    np.testing.assert_array_equal(model(images), np.asarray(live(states[expected], images)))
    np.save(tmp_path / "five.npy", images)
    args = _parser().parse_args(["predict", "--model", str(out), str(tmp_path / "five.npy")])
    args.func(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    expected_classes = np.argmax(model(images), axis=-1)
    for i, line in enumerate(lines):
        name, cls, prob = line.split("\t")
        assert name == f"{tmp_path / 'five.npy'}[{i}]" and int(cls) == expected_classes[i] and 0 < float(prob) <= 1
    args = _parser().parse_args(["predict", "--json", "--model", str(out), str(tmp_path / "five.npy")])
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert [p["class"] for p in report["predictions"]] == expected_classes.tolist()


def test_cli_export_errors(workdir, tmp_path):
    work, _, _ = workdir
    parser = _parser()
    with pytest.raises(C.CheckpointError, match=r"no checkpoint step 99 .*available: \[10, 20\]"):
        args = parser.parse_args(["export", "--workdir", str(work), "--out", str(tmp_path / "m"), "--step", "99"])
        args.func(args)
    with pytest.raises(ConfigError, match="holds no jaxnet run"):
        args = parser.parse_args(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "m")])
        args.func(args)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="cannot write --out"):
        args = parser.parse_args(["export", "--workdir", str(work), "--out", str(tmp_path / "file.txt" / "m")])
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--workdir", str(work), "--out", "m", "--step", "newest"])
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--workdir", str(work), "--out", "m", "--platforms", "cpu,metal"])
