"""``jaxnet train --model package.module:factory``: your model, your data, a config file, resume, export."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnet import checkpoint as C
from jaxnet.checkpoint import workdir as W
from jaxnet.cli import build_parser, main
from jaxnet.export import load_exported
from jaxnet.models import build_model
from tests.cli.helpers import COMMON, one_line_error, run_main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODULE = textwrap.dedent('''
    """A model written as the Flax docs write one, and the mistakes a factory can make."""
    import numpy as np
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, width: int = 32, *, rngs: nnx.Rngs):
            self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
            self.fc1 = nnx.Linear(14 * 14 * 4, width, rngs=rngs)
            self.fc2 = nnx.Linear(width, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            x = x.reshape(x.shape[0], -1)
            return self.fc2(nnx.relu(self.fc1(x)))


    def factory(width=32, rngs=None):
        return Net(width, rngs=rngs)


    def seeded(seed):
        return Net(rngs=nnx.Rngs(seed))


    def no_args():
        return Net(rngs=nnx.Rngs(7))


    class Tabular(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.fc = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)


    def _features(n=256):
        return np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)


    def binary_data():
        x = _features()
        return x, (x.sum(axis=1) > 0).astype(np.int32)


    def regression_data():
        x = _features()
        return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)}


    NOT_CALLABLE = 3


    def broken(rngs):
        raise ValueError("width must be even")


    def returns_dict(rngs):
        return {"w": 1}
''')

TRAIN = ["train", "--epochs", "1", "--batch-size", "250", "--lr", "0.003", *COMMON]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder holding tests_pkg/mod.py, made the current directory (as a user's project would be)."""
    root = tmp_path_factory.mktemp("project")
    (root / "tests_pkg").mkdir()
    (root / "tests_pkg" / "__init__.py").write_text("")
    (root / "tests_pkg" / "mod.py").write_text(MODULE)
    (root / "run.toml").write_text(
        textwrap.dedent("""
        model = "tests_pkg.mod:factory"
        dataset = "mnist"
        batch-size = 100
        lr = 0.01
        [model_kwargs]
        width = 16
    """)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "path", [p for p in sys.path if p not in ("", str(root))])  # found via the cwd rule
        mp.setenv("XDG_CACHE_HOME", str(root / "empty-cache"))  # the embedded MNIST sample, always
        mp.setenv("JAXNET_DATA_DIR", "")
        yield root
    for name in [m for m in sys.modules if m == "tests_pkg" or m.startswith("tests_pkg.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def trained(project):
    """One epoch of tests_pkg.mod:factory (width 16 from run.toml) on the embedded MNIST sample."""
    workdir = project / "runs" / "net"
    argv = [*TRAIN, "--config", "run.toml", "--workdir", str(workdir)]
    out, err = io.StringIO(), io.StringIO()  # module scope: no capsys
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()[-3000:]
    return workdir, argv, json.loads(out.getvalue().strip().splitlines()[-1])


def test_user_factory_trains_with_config_file_and_flags(trained):
    workdir, _, summary = trained
    config = W.read_config(workdir)
    assert config["model"] == "tests_pkg.mod:factory" and config["model_kwargs"] == {"width": 16}
    assert config["lr"] == 0.003  # the flag beats the file's 0.01
    assert config["batch_size"] == 250  # the flag beats the file's 100
    assert config["optimizer"] == "adam" and config["schedule"] == "constant"  # the user-model recipe
    assert config["loss"] == "cross_entropy" and config["output"] == "logits"
    assert config["input_shape"] == [28, 28, 1] and config["input_dtype"] == "uint8"
    assert config["mean"] == [0.1307] and "data_dir" not in config and "workdir" not in config
    assert summary["steps"] == 6000 // 250 and summary["test_accuracy"] > 0.5
    assert (workdir / "model" / "model.json").is_file()  # fit recorded the forward function


def _own_forward(workdir: pathlib.Path, images: np.ndarray) -> np.ndarray:
    """The trained model's outputs: the factory rebuilt, the latest checkpoint restored, the run's Normalize."""
    config = W.read_config(workdir)
    model = build_model(config["model"], seed=0, kwargs=config["model_kwargs"])
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    ckpt = C.create_checkpoint_manager(W.checkpoint_directory(workdir), read_only=True)
    try:
        params, model_state, _ = C.restore_variables(ckpt, params, model_state, step="latest")
    finally:
        C.close(ckpt)
    model = nnx.merge(graphdef, params, model_state)
    model.eval()
    x = (images.astype(np.float32) / 255 - np.float32(config["mean"][0])) / np.float32(config["std"][0])
    return np.asarray(model(jnp.asarray(x)))


def _sample_images() -> np.ndarray:
    from jaxnet.data.registry import load_embedded_mnist_sample

    return load_embedded_mnist_sample().test_images[:64]


def test_export_of_a_factory_run_predicts_like_the_model(trained, tmp_path, capsys, monkeypatch):
    workdir, _, _ = trained
    images = _sample_images()
    expected = _own_forward(workdir, images)
    np.save(tmp_path / "batch.npy", images)
    # Recorded: from a folder where the model's code cannot be imported.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "tests_pkg.mod")
    monkeypatch.delitem(sys.modules, "tests_pkg")
    out = tmp_path / "recorded.jaxexport"
    assert main(["export", "--workdir", str(workdir), "--out", str(out), "--step", "latest"]) == 0
    assert "output logits" in capsys.readouterr().out
    model = load_exported(out)
    assert model.info["metadata"]["function"] == "recorded"
    np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-5)
    assert main(["predict", "--json", "--model", str(out), str(tmp_path / "batch.npy")]) == 0
    classes = [p["class"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    assert classes == np.argmax(expected, axis=-1).tolist()
    # Rebuilt: without W/model, from the factory and model_kwargs in config.json.
    monkeypatch.chdir(workdir.parents[1])
    bare = tmp_path / "bare"
    shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("model"))
    out = tmp_path / "rebuilt.jaxexport"
    assert main(["export", "--workdir", str(bare), "--out", str(out), "--step", "latest"]) == 0
    capsys.readouterr()
    rebuilt = load_exported(out)
    assert rebuilt.info["metadata"]["function"] == "rebuilt"
    np.testing.assert_array_equal(rebuilt(images), model(images))


def test_resume_refuses_a_changed_lr_and_accepts_more_epochs(trained, tmp_path, capsys):
    workdir, argv, summary = trained
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    argv = [a if a != str(workdir) else str(work) for a in argv]
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    lr = argv.index("--lr") + 1
    code, _, err = run_main(capsys, *argv[:lr], "0.01", *argv[lr + 1 :], "--resume")
    line = one_line_error(code, err, "lr: 0.003 in the saved run, 0.01 now", "only epochs may change on resume")
    assert "model_kwargs" not in line and "batch_size" not in line
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before
    epochs = argv.index("--epochs") + 1
    code, resumed, err = run_main(capsys, *argv[:epochs], "2", *argv[epochs + 1 :], "--resume")
    assert code == 0, err[-3000:]
    assert resumed["resumed_from_step"] == summary["steps"] and resumed["steps"] == 2 * summary["steps"]
    assert W.read_config(work)["epochs"] == 2


def test_workdir_without_a_checkpoint_says_what_happened(trained, tmp_path, capsys):
    workdir, argv, _ = trained
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(workdir / W.CONFIG_FILE, crashed / W.CONFIG_FILE)  # a run killed before its first save
    argv = [a if a != str(workdir) else str(crashed) for a in argv]
    code, _, err = run_main(capsys, *argv)
    one_line_error(code, err, "stopped before its first checkpoint", "--resume-or-start", "choose another --workdir")
    assert sorted(p.name for p in crashed.iterdir()) == [W.CONFIG_FILE]
    code, _, err = run_main(capsys, *argv, "--resume")  # nothing to resume from: said, not a silent restart
    one_line_error(code, err, "nothing to resume from", "--resume-or-start")
    (crashed / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    code, summary, err = run_main(capsys, *argv, "--resume-or-start")
    assert code == 0, err[-3000:]
    assert summary["resumed_from_step"] is None
    records = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") != 9.0 for r in records)  # the stale attempt's log is gone, not duplicated


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("tests_pkg.mod", ["neither a jaxnet name nor package.module:factory", "tests_pkg.mod:build"]),
        ("no_such_pkg_xyz.nets:build", ["no module named 'no_such_pkg_xyz'", "PYTHONPATH"]),
        ("tests_pkg.mod:nope", ["has no attribute 'nope'", "factory", "Net"]),
        ("tests_pkg.mod:NOT_CALLABLE", ["is a int, not a function or class"]),
        ("tests_pkg.mod:broken", ["raised ValueError: width must be even", "rngs=nnx.Rngs(0)"]),
        ("tests_pkg.mod:returns_dict", ["returned a builtins.dict, not a flax.nnx.Module", "return Net(rngs=rngs)"]),
    ],
)
def test_factory_mistakes_are_one_line_errors(project, capsys, model, needles):
    code, _, err = run_main(capsys, "train", "--model", model, "--dataset", "mnist", *COMMON)
    one_line_error(code, err, f"--model {model}", *needles)


def test_user_model_needs_a_dataset_and_kwargs_need_a_factory(project, capsys):
    code, _, err = run_main(capsys, "train", "--model", "tests_pkg.mod:factory", *COMMON)
    one_line_error(code, err, "your own model", "--dataset")
    code, _, err = run_main(capsys, "train", "--model", "mlp", "--model-kwargs", '{"width": 3}', *COMMON)
    one_line_error(code, err, "model_kwargs ['width'] apply to a package.module:factory model")


def test_factory_calling_conventions(project):
    assert isinstance(build_model("tests_pkg.mod:seeded", seed=3), nnx.Module)
    a, b = build_model("tests_pkg.mod:factory", seed=3), build_model("tests_pkg.mod:seeded", seed=3)
    np.testing.assert_array_equal(a.fc1.kernel[...], b.fc1.kernel[...])  # rngs=nnx.Rngs(3) and seed=3 agree
    c = build_model("tests_pkg.mod:no_args", seed=3)
    assert not np.array_equal(a.fc1.kernel[...], c.fc1.kernel[...])  # called with nothing: its own seed 7
    assert build_model("tests_pkg.mod:factory", kwargs={"width": 5}).fc1.out_features == 5


def test_val_split_and_loss_flags(project, capsys, tmp_path):
    for bad in ("0", "1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--val-split", bad])
    code, summary, err = run_main(
        capsys,
        "train",
        "--model",
        "mlp128",
        "--dataset",
        "mnist",
        "--epochs",
        "1",
        "--batch-size",
        "500",
        "--val-split",
        "0.1",
        "--loss",
        "nll",
        "--workdir",
        str(tmp_path / "w"),
        *COMMON,
    )
    assert code == 0, err[-3000:]
    config = W.read_config(tmp_path / "w")
    assert config["val_split"] == 0.1 and config["loss"] == "nll" and config["output"] == "log_probs"
    assert summary["steps"] == 5400 // 500  # a tenth of the 6,000 examples held out
    assert any(key.startswith("val_") for key in summary), sorted(summary)


def test_tabular_binary_model_with_a_data_function_exports_and_predicts(project, capsys, tmp_path):
    work = tmp_path / "binary"
    code, summary, err = run_main(
        capsys,
        "train",
        "--model",
        "tests_pkg.mod:Tabular",
        "--dataset",
        "tests_pkg.mod:binary_data",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--workdir",
        str(work),
        *COMMON,
    )
    assert code == 0, err[-3000:]
    config = W.read_config(work)
    assert config["loss"] == "binary" and config["input_dtype"] == "float32" and config["mean"] is None
    out = tmp_path / "binary.jaxexport"
    assert main(["export", "--workdir", str(work), "--out", str(out), "--step", "latest"]) == 0
    features = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", features)
    capsys.readouterr()
    assert main(["predict", "--json", "--model", str(out), str(tmp_path / "rows.npy")]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    logits = load_exported(out)(features)[:, 0]
    assert [p["class"] for p in predictions] == (logits > 0).astype(int).tolist()
    np.testing.assert_allclose([p["probabilities"][1] for p in predictions], 1 / (1 + np.exp(-logits)), rtol=1e-6)
    assert np.mean((logits > 0) == (features.sum(axis=1) > 0)) > 0.8  # it learned the rule


def test_regression_losses_and_value_predictions(project, capsys, tmp_path):
    for loss, output in ((None, "regression"), ("l1", "l1")):
        work = tmp_path / f"reg-{loss}"
        extra = ["--loss", loss] if loss else []
        code, summary, err = run_main(
            capsys,
            "train",
            "--model",
            "tests_pkg.mod:Tabular",
            "--dataset",
            "tests_pkg.mod:regression_data",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--workdir",
            str(work),
            *extra,
            *COMMON,
        )
        assert code == 0, err[-3000:]
        assert W.read_config(work)["output"] == output
    out = tmp_path / "reg.jaxexport"
    assert main(["export", "--workdir", str(work), "--out", str(out), "--step", "latest"]) == 0
    features = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", features)
    capsys.readouterr()
    assert main(["predict", "--model", str(out), str(tmp_path / "rows.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    values = load_exported(out)(features)[:, 0]
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(values.tolist(), rel=1e-5)


def test_help_states_user_model_defaults_and_resumable_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "package.module:factory",
        "Adam lr 1e-3",
        "batch 64",
        "5 epochs",
        "--config",
        "--loss",
        "--val-split",
        "--model-kwargs",
        "except --epochs",
    ):
        assert text in out, text


def test_text_summary_without_a_test_split(project, capsys):
    code = main(
        [
            "train",
            "--model",
            "tests_pkg.mod:Tabular",
            "--dataset",
            "tests_pkg.mod:regression_data",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--val-split",
            "0.25",
            "--loss",
            "huber",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "model tests_pkg.mod:Tabular on tests_pkg.mod:regression_data" in out
    assert "validation loss (huber):" in out and "test" not in out.splitlines()[-1]
