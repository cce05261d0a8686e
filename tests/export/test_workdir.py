"""Exporting any run from its workdir (jaxnet.export.workdir): ``fit`` records the forward function in W/model."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnet
from jaxnet.cli import main
from jaxnet.compilation import CompileCounter
from jaxnet.data.transforms import make_image_transform
from jaxnet.errors import ConfigError, DataError
from jaxnet.export import MODEL_DIR, load_exported, write_workdir_model
from jaxnet.models import create_model
from jaxnet.state import create_train_state
from jaxnet.step import make_predict_fn
from tests.export.helpers import Net

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MEAN, STD = (0.1307,), (0.3081,)


@pytest.fixture(scope="module")
def mnist():
    """2,000 / 500 images of the embedded MNIST sample."""
    from jaxnet.data.registry import load_embedded_mnist_sample

    ds = load_embedded_mnist_sample()
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[:2000],
        train_labels=ds.train_labels[:2000],
        test_images=ds.test_images[:500],
        test_labels=ds.test_labels[:500],
    )


def _normalized(images: np.ndarray) -> jax.Array:
    return jnp.asarray((images.astype(np.float32) / 255 - MEAN[0]) / STD[0])


def _export(capsys, workdir, out, *extra: str) -> str:
    code = main(["export", "--workdir", str(workdir), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def test_python_fit_of_a_user_model_exports_from_its_workdir(mnist, tmp_path, capsys):
    workdir = tmp_path / "run"
    model = Net(rngs=nnx.Rngs(0))
    jaxnet.fit(model, mnist, optax.adam(1e-3), epochs=1, batch_size=100, workdir=workdir, progress=False)
    info = json.loads((workdir / MODEL_DIR / "model.json").read_text())
    assert "model_state/bn/mean/value" in info["weights"]  # BatchNorm statistics are weights...
    assert not any("rngs" in name for name in info["weights"])  # ...the Dropout's RNG state is not
    assert any(v["dtype"].startswith("key<") for v in info["variables"])  # but is restored with the rest
    out = tmp_path / "net.jaxexport"
    assert "output logits" in _export(capsys, workdir, out)
    exported = load_exported(out)
    assert exported.info["metadata"]["function"] == "recorded" and exported.input_dtype == np.uint8
    images = mnist.test_images[:100]
    model.eval()  # fit left the trained weights in the user's model
    expected = np.asarray(model(_normalized(images)))
    np.testing.assert_allclose(exported(images), expected, rtol=1e-4, atol=1e-4)
    np.save(tmp_path / "images.npy", images)
    assert main(["predict", "--json", "--model", str(out), str(tmp_path / "images.npy")]) == 0
    classes = [p["class"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    assert classes == np.argmax(expected, axis=-1).tolist()


def test_python_fit_of_the_tutorial_mlp_exports_recorded_and_rebuilt(mnist, tmp_path, capsys):
    workdir = tmp_path / "mlp"
    result = jaxnet.fit(
        create_model("mlp"), mnist, optax.adam(1e-3), epochs=1, batch_size=100, workdir=workdir, progress=False
    )
    images = mnist.test_images[:50]
    live = np.asarray(make_predict_fn(result.graphdef, transform=make_image_transform(MEAN, STD))(result.state, images))
    _export(capsys, workdir, tmp_path / "recorded.jaxexport")
    recorded = load_exported(tmp_path / "recorded.jaxexport")
    np.testing.assert_array_equal(np.argmax(recorded(images), -1), np.argmax(live, -1))
    np.testing.assert_allclose(recorded(images), live, rtol=1e-5, atol=1e-5)
    assert recorded.info["metadata"]["params_sha256"] == result.summary["params_sha256"]
    shutil.rmtree(workdir / MODEL_DIR)  # a workdir from before W/model: rebuilt from config.json's "mlp"
    _export(capsys, workdir, tmp_path / "rebuilt.jaxexport")
    rebuilt = load_exported(tmp_path / "rebuilt.jaxexport")
    assert rebuilt.info["metadata"]["function"] == "rebuilt"
    np.testing.assert_array_equal(rebuilt(images), recorded(images))


def test_write_workdir_model_lowers_from_shapes_without_compiling(tmp_path):
    graphdef, state = create_train_state(create_model("convnet"), optax.sgd(0.1))
    abstract = jax.eval_shape(lambda: (state.params, state.model_state))  # shapes only: nothing is read
    with CompileCounter() as counter:
        folder = write_workdir_model(
            tmp_path,
            graphdef,
            *abstract,
            input_shape=(28, 28, 1),
            input_dtype=np.dtype("uint8"),
            transform=make_image_transform(MEAN, STD),
            output="log_probs",
        )
    assert counter.compiles == 0
    info = json.loads((folder / "model.json").read_text())
    assert (info["input_dtype"], info["output"], info["platforms"]) == ("uint8", "log_probs", ["cpu", "cuda"])


class FixedBatch(nnx.Module):
    """Reads the batch size as a Python int: cannot be lowered for a symbolic batch size."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(784, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc(x.reshape(int(x.shape[0]), 784))


def test_a_model_that_cannot_be_lowered_is_a_warning_not_a_failed_run(tmp_path, caplog):
    graphdef, state = create_train_state(create_model("mlp128"), optax.sgd(0.1))
    assert write_workdir_model(tmp_path, graphdef, state.params, state.model_state, input_shape=(28, 28, 1)) is not None
    graphdef, state = create_train_state(FixedBatch(rngs=nnx.Rngs(0)), optax.sgd(0.1))
    with caplog.at_level(logging.WARNING, logger="jaxnet.export"):
        assert write_workdir_model(tmp_path, graphdef, state.params, state.model_state, input_shape=(28, 28, 1)) is None
    assert "cannot record the model for 'jaxnet export'" in caplog.text and "training goes on" in caplog.text
    assert not (tmp_path / MODEL_DIR / "model.json").exists()  # the earlier model is not this one


@pytest.fixture(scope="module")
def user_run(mnist, tmp_path_factory):
    """A Python fit of a model class jaxnet cannot rebuild (defined in a function)."""

    class Local(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.fc = nnx.Linear(784, 10, rngs=rngs)

        def __call__(self, x):
            return self.fc(x.reshape(x.shape[0], -1))

    workdir = tmp_path_factory.mktemp("local") / "run"
    jaxnet.fit(
        Local(rngs=nnx.Rngs(0)), mnist, optax.adam(1e-3), epochs=1, batch_size=500, workdir=workdir, progress=False
    )
    return workdir


def test_export_needs_w_model_for_other_platforms_of_a_model_without_code(user_run, tmp_path, capsys):
    _export(capsys, user_run, tmp_path / "cpu.jaxexport", "--platforms", "cpu")  # within cpu,cuda: recorded
    assert load_exported(tmp_path / "cpu.jaxexport").exported.platforms == ("cpu", "cuda")
    code = main(["export", "--workdir", str(user_run), "--out", str(tmp_path / "tpu.jaxexport"), "--platforms", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and "was lowered for cpu,cuda" in err and "--platforms cpu,cuda" in err, err
    bare = tmp_path / "bare"
    shutil.copytree(user_run, bare, ignore=shutil.ignore_patterns(MODEL_DIR))
    code = main(["export", "--workdir", str(bare), "--out", str(tmp_path / "m.jaxexport")])
    err = capsys.readouterr().err
    assert code == 2 and "has no model/ folder" in err and "user_run.<locals>.Local" in err, err
    assert "export_model(result.graphdef, result.state" in err and len(err.strip().splitlines()) == 1, err


def test_damaged_workdir_model_is_named(user_run, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(user_run, work)
    module = work / MODEL_DIR / "forward.exported"
    data = bytearray(module.read_bytes())
    data[len(data) // 2] ^= 0xFF
    module.write_bytes(bytes(data))
    code = main(["export", "--workdir", str(work), "--out", str(tmp_path / "m.jaxexport")])
    err = capsys.readouterr().err
    assert code == 2 and "forward.exported is damaged (SHA-256 mismatch)" in err, err
    with pytest.raises(DataError):
        from jaxnet.export import read_workdir_model

        read_workdir_model(work)
    with pytest.raises(ConfigError, match="unknown model output kind"):
        write_workdir_model(work, None, {}, {}, input_shape=(1,), output="probabilities")
