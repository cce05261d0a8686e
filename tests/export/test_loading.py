"""Loading an exported model: exact outputs in a fresh process without the model's code, calls, files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from jaxnet.errors import DataError
from jaxnet.export import ExportedModel, load_exported, predict_files
from tests.helpers import REPO

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
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(folder), *result], env=env, capture_output=True, text=True, timeout=300
    )
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


def test_not_an_exported_model(tmp_path):
    (tmp_path / "x.jaxexport").write_bytes(b"garbage")
    with pytest.raises(DataError, match="is not a jaxnet exported model"):
        load_exported(tmp_path / "x.jaxexport")
    with pytest.raises(DataError, match="cannot read the exported model"):
        load_exported(tmp_path / "absent.jaxexport")
