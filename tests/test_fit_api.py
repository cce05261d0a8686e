"""fit for your own model and data: data forms, validation, losses, metrics, callbacks, predict."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from flax import nnx

import jaxnet
from jaxnet import callbacks as jcb
from jaxnet import checkpoint
from jaxnet.checkpoint import workdir
from jaxnet.data.inputs import as_fit_data, holdout
from jaxnet.errors import ConfigError, DataError
from jaxnet.optim import create_optimizer, create_schedule


class Net(nnx.Module):
    """Written as the Flax docs write a model: ``__call__(self, x)``, Dropout with its own stream."""

    def __init__(self, din: int = 6, dout: int = 3, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(din, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(16, dout, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def tabular(n: int = 240, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5]) if classes == 3 else (x[:, 0] > 0)).astype(np.int32)
    return x, y


@pytest.fixture(scope="module")
def tiny_mnist():
    import dataclasses

    full = jaxnet.load_dataset("mnist", download=False, data_dir=None)
    return dataclasses.replace(
        full,
        train_images=full.train_images[:256],
        train_labels=full.train_labels[:256],
        test_images=full.test_images[:100],
        test_labels=full.test_labels[:100],
    )


def fit(data, model=None, **kw):
    kw = {"epochs": 2, "batch_size": 16, "progress": False, **kw}
    return jaxnet.fit(model or Net(rngs=nnx.Rngs(0)), data, create_optimizer("adam", 1e-2), **kw)


# -- data forms ----------------------------------------------------------------------------------


def test_tuple_dict_and_splits_train_the_same():
    x, y = tabular()
    a = fit((x, y))
    b = fit({"x": x, "y": y})
    c = fit({"train": {"image": x, "label": y}})
    assert a.summary["params_sha256"] == b.summary["params_sha256"] == c.summary["params_sha256"]
    assert a.summary["steps"] == 2 * (240 // 16)
    assert a.summary["test_accuracy"] is None and "val_loss" not in a.summary  # no split to report


def test_dict_of_splits_validates_each_epoch_and_tests_at_the_end():
    x, y = tabular(300)
    result = fit({"train": (x[:200], y[:200]), "validation": (x[200:250], y[200:250]), "test": (x[250:], y[250:])})
    assert all("val_accuracy" in h and not any(k.startswith("test_") for k in h) for h in result.history)
    assert 0.0 <= result.summary["test_accuracy"] <= 1.0
    preds = jaxnet.predict(result, x[250:]).argmax(-1)
    assert result.summary["test_accuracy"] == pytest.approx(np.mean(preds == y[250:]))


def test_source_of_records_and_iterable_of_batches():
    x, y = tabular(128)

    class Records:  # a map-style dataset, as torch.utils.data.Dataset or a tfds data source
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"image": x[i], "label": y[i]}

    records = fit(Records(), batch_size=16)
    assert records.summary["steps"] == 16
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 128, 16)] + [(x[:5], y[:5])]  # last: other size
    streamed = fit(batches, batch_size=16, validation_data=(x[:32], y[:32]))
    assert streamed.summary["steps"] == 2 * 8  # the 5-example batch is skipped (it would recompile)
    assert streamed.summary["steady_state_compilations"] == 0
    assert "val_accuracy" in streamed.history[-1]
    calls = []
    fit(lambda: (calls.append(1), iter(batches[:8]))[1], batch_size=16, epochs=3)
    assert len(calls) >= 3  # a function gives a fresh iterator every epoch


def test_one_shot_iterator_over_several_epochs_is_refused():
    x, y = tabular(64)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fit(iter([(x[:16], y[:16])] * 4), batch_size=16, epochs=2)


@pytest.mark.parametrize(
    "data, message",
    [
        ((np.zeros((4, 2)),), "tuple of 1"),
        ({"x": np.zeros((4, 2))}, "expected an input key"),
        ({"train": (np.zeros((4, 2)), np.zeros(4)), "extra": 1}, "beside splits"),
        ({"validation": (np.zeros((4, 2)), np.zeros(4))}, "no 'train' split"),
        ((np.zeros((4, 2)), np.zeros(3)), "4 inputs but 3 labels"),
        ((np.zeros((4, 2)), np.array(["a", "b", "c", "d"])), "labels must be numbers"),
        (42, "cannot train on a int"),
        (np.zeros((4, 2)), "single ndarray, with no labels"),
    ],
)
def test_bad_data_forms_get_one_clear_error(data, message):
    with pytest.raises((ConfigError, DataError), match=message):
        as_fit_data(data)


# -- validation ----------------------------------------------------------------------------------


def test_validation_split_is_a_seeded_holdout():
    x, y = tabular(100)
    data = as_fit_data((x, y), validation_split=0.2, seed=3)
    again = as_fit_data((x, y), validation_split=0.2, seed=3)
    other = as_fit_data((x, y), validation_split=0.2, seed=4)
    assert len(data.train) == 80 and len(data.validation) == 20
    np.testing.assert_array_equal(data.validation.x, again.validation.x)
    assert not np.array_equal(data.validation.x, other.validation.x)
    rows = {r.tobytes() for r in data.train.x} | {r.tobytes() for r in data.validation.x}
    assert len(rows) == 100  # a partition: nothing lost, nothing in both
    for bad in (0, 1, 1.5, -0.1, "0.2", True):
        with pytest.raises(ConfigError, match="validation_split"):
            holdout(data.train, bad, seed=0)


def test_validation_never_touches_the_test_split():
    """The test split is read only after the last epoch; the run fails if it is read before."""
    x, y = tabular(200)
    phase = {"training": True}

    class TestSplit:  # array-like that refuses to be read while training
        shape, dtype = (40, 6), np.float32

        def __len__(self):
            return 40

        def __getitem__(self, idx):
            assert not phase["training"], "the test split was read during training"
            return x[160:][idx]

    class EndOfTraining(jcb.Callback):
        def on_fit_end(self, run, logs):
            phase["training"] = False

    result = fit(
        {"train": (x[:160], y[:160]), "test": (TestSplit(), y[160:])},
        validation_split=0.25,
        callbacks=[EndOfTraining()],
        epochs=3,
    )
    assert all(not any(k.startswith("test_") for k in h) for h in result.history)
    assert all("val_loss" in h for h in result.history)
    assert result.summary["test_accuracy"] is not None


def test_best_checkpoint_is_chosen_by_validation_not_test(tmp_path):
    x, y = tabular(200)
    result = fit(
        {"train": (x[:160], y[:160]), "test": (x[160:], y[160:])},
        validation_split=0.25,
        epochs=3,
        workdir=tmp_path / "w",
        keep_checkpoints=1,
    )
    config = workdir.read_config(tmp_path / "w")
    assert (config["best_metric"], config["best_mode"]) == ("val_accuracy", "max")
    ckpt = checkpoint.create_checkpoint_manager(
        workdir.checkpoint_directory(tmp_path / "w"), read_only=True, best_metric="val_accuracy", best_mode="max"
    )
    try:
        best = checkpoint.best(ckpt)
        by_step = {h["step"]: h for h in result.history}
        assert by_step[best]["val_accuracy"] == max(h["val_accuracy"] for h in result.history)
    finally:
        checkpoint.close(ckpt)


def test_tutorial_dataset_keeps_per_epoch_test_evaluation(tiny_mnist):
    result = jaxnet.fit(
        jaxnet.create_model("mlp128"),
        tiny_mnist,
        create_optimizer("adam", 1e-3),
        epochs=1,
        batch_size=32,
        progress=False,
    )
    assert "test_accuracy" in result.history[0]
    assert result.summary["test_accuracy"] == result.history[0]["test_accuracy"]


# -- losses and metrics --------------------------------------------------------------------------


def test_loss_fn_and_metrics_computed_in_step_and_at_evaluation():
    x, y = tabular(160)
    seen = []

    def my_loss(outputs, labels, batch):  # takes the batch too
        seen.append(sorted(batch))
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

    def margin(outputs, labels):
        return (outputs.max(-1) - outputs.min(-1)).mean()

    result = fit((x, y), loss_fn=my_loss, metrics={"margin": margin}, validation_split=0.2)
    assert seen and "image" in seen[0] and "label" in seen[0]
    record = result.history[-1]
    assert record["train_margin"] > 0 and record["val_margin"] > 0
    outputs = jaxnet.predict(result, as_fit_data((x, y), validation_split=0.2).validation.x)
    assert record["val_margin"] == pytest.approx(float(margin(outputs, None)), rel=1e-5)
    same = fit((x, y), loss_fn="cross_entropy", validation_split=0.2)
    builtin = fit((x, y), validation_split=0.2)
    assert same.summary["params_sha256"] == builtin.summary["params_sha256"]


def test_binary_classifier_with_one_logit():
    x, y = tabular(200, classes=2)
    result = fit((x, y), model=Net(dout=1, rngs=nnx.Rngs(0)), epochs=4, validation_split=0.2)
    assert result.output == "binary"
    assert result.history[-1]["val_accuracy"] > 0.8
    logits = jaxnet.predict(result, x)
    assert logits.shape == (200, 1)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regression_losses(loss):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    target = (x @ np.arange(1, 7, dtype=np.float32) / 6).astype(np.float32)
    first = fit((x, target), model=Net(dout=1, rngs=nnx.Rngs(0)), loss_fn=loss, epochs=1, validation_split=0.25)
    last = fit((x, target), model=Net(dout=1, rngs=nnx.Rngs(0)), loss_fn=loss, epochs=6, validation_split=0.25)
    assert last.output == {"mse": "regression"}.get(loss, loss)
    assert last.history[-1]["val_loss"] < first.history[-1]["val_loss"]
    assert "val_accuracy" not in last.history[-1]


def test_l1_and_huber_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32) * 3
    for ours, theirs in (
        (jaxnet.losses.l1_loss, torch.nn.L1Loss()),
        (lambda p, t: jaxnet.losses.huber_loss(p, t, delta=0.7), torch.nn.HuberLoss(delta=0.7)),
    ):
        np.testing.assert_allclose(
            float(ours(pred, target)), float(theirs(torch.tensor(pred), torch.tensor(target))), rtol=1e-6
        )


# -- callbacks -----------------------------------------------------------------------------------


class Scripted(jcb.Callback):
    """Logs a scalar of its own each epoch: ``score`` from a fixed script."""

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, run, epoch, logs):
        logs["score"] = self.values[epoch]


def test_early_stopping_stops_at_the_right_epoch_without_recompiling(tmp_path):
    x, y = tabular(160)
    stop = jcb.EarlyStopping("score", mode="max", patience=2)
    result = fit(
        (x, y), epochs=10, callbacks=[Scripted([1, 2, 3, 2.5, 2.9, 9, 9, 9, 9, 9]), stop], workdir=tmp_path / "w"
    )
    assert result.summary["epochs_run"] == 5 and result.summary["stopped_early"]
    assert (stop.best, stop.best_epoch, stop.stopped_epoch) == (3, 3, 5)
    assert result.summary["steady_state_compilations"] == 0
    assert result.summary["steps"] == 5 * 10
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["score"] for r in logged if r["split"] == "epoch"] == [1, 2, 3, 2.5, 2.9]  # user scalars logged


def test_early_stopping_restore_best_gives_the_best_epochs_weights():
    x, y = tabular(160)
    digests = []

    class Digest(jcb.Callback):
        def on_epoch_end(self, run, epoch, logs):
            digests.append(jaxnet.checkpoint.params_sha256(run.state.params))

    result = fit(
        (x, y),
        epochs=6,
        callbacks=[
            Scripted([1, 5, 2, 2, 2, 2]),
            Digest(),
            jcb.EarlyStopping("score", mode="max", patience=3, restore_best=True),
        ],
    )
    assert result.summary["epochs_run"] == 5
    assert result.summary["params_sha256"] == digests[1]  # epoch 2 scored best


def test_early_stopping_on_a_missing_metric_names_the_available_ones():
    x, y = tabular(64)
    with pytest.raises(ConfigError, match="monitors 'val_loss'.*train_loss"):
        fit((x, y), callbacks=[jcb.EarlyStopping("val_loss")])


def test_best_checkpoints_by_any_metric_and_mode(tmp_path):
    x, y = tabular(160)
    fit(
        (x, y),
        epochs=4,
        callbacks=[Scripted([3, 1, 2, 4]), jcb.BestCheckpoints("score", mode="min", keep=1)],
        workdir=tmp_path / "w",
        keep_checkpoints=1,
    )
    ckpt = checkpoint.create_checkpoint_manager(
        workdir.checkpoint_directory(tmp_path / "w"), read_only=True, best_metric="score", best_mode="min"
    )
    try:
        assert checkpoint.best(ckpt) == 20  # epoch 2 (10 steps per epoch) scored lowest
        assert set(checkpoint.steps(ckpt)) == {20, 40}  # the best plus the newest
    finally:
        checkpoint.close(ckpt)
    assert workdir.read_config(tmp_path / "w")["best_metric"] == "score"


def test_learning_rate_logger_reads_the_schedule(tmp_path):
    x, y = tabular(160)
    schedule = create_schedule("step", 0.1, steps_per_epoch=10, step_size=1, gamma=0.5)
    tx = create_optimizer("sgd", schedule, momentum=0.9)
    result = jaxnet.fit(
        Net(rngs=nnx.Rngs(0)),
        (x, y),
        tx,
        epochs=3,
        batch_size=16,
        progress=False,
        callbacks=[jcb.LearningRateLogger()],
        workdir=tmp_path / "w",
        log_every=5,
    )
    assert [round(h["lr"], 6) for h in result.history] == [0.05, 0.025, 0.0125]  # the lr of the next step
    train_records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert any("lr" in r for r in train_records if r["split"] == "train")
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.3)
    plain = jaxnet.fit(
        Net(rngs=nnx.Rngs(0)),
        (x, y),
        injected,
        epochs=1,
        batch_size=16,
        progress=False,
        callbacks=[jcb.LearningRateLogger()],
    )
    assert plain.history[0]["lr"] == pytest.approx(0.3)


# -- nothing the user holds is destroyed -----------------------------------------------------------


def test_the_model_passed_in_holds_the_trained_weights():
    x, y = tabular(160)
    model = Net(rngs=nnx.Rngs(0))
    before = np.asarray(model.fc1.kernel[...]).copy()
    result = fit((x, y), model=model)
    after = np.asarray(model.fc1.kernel[...])  # readable: not deleted by the donated steps
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, np.asarray(result.state.params["fc1"]["kernel"][...]))
    np.testing.assert_array_equal(jaxnet.predict(model, x), jaxnet.predict(result, x))
    step = jaxnet.make_train_step(result.graphdef, create_optimizer("adam", 1e-2), jaxnet.loss_for_output("logits"))
    step(result.state, {"image": x[:16], "label": y[:16]})  # donates result.state ...
    np.testing.assert_array_equal(np.asarray(model.fc1.kernel[...]), after)  # ... not the model's buffers


def test_predict_batches_and_errors():
    x, y = tabular(50)
    result = fit((x, y), epochs=1)
    whole = jaxnet.predict(result, x, batch_size=64)
    np.testing.assert_allclose(jaxnet.predict(result, x, batch_size=7), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="batch_size"):
        jaxnet.predict(result, x, batch_size=0)
    with pytest.raises(ConfigError, match="model"):
        jaxnet.predict("model.bin", x)


def test_grain_map_dataset_source():
    grain = pytest.importorskip("grain")
    x, y = tabular(96)
    source = grain.MapDataset.source([{"image": x[i], "label": y[i]} for i in range(96)])
    from_grain = fit(source, batch_size=16)
    from_arrays = fit((x, y), batch_size=16)
    assert from_grain.summary["params_sha256"] == from_arrays.summary["params_sha256"]


def test_tfds_data_source_splits(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tests.data.tfds_mocks import mocked, write_metadata

    write_metadata(tmp_path, "mnist", {"train": 60000, "test": 10000})
    with mocked(monkeypatch, tmp_path, num_examples=64):
        source = tfds.data_source("mnist", data_dir=str(tmp_path))  # {"train": ..., "test": ...}
        result = jaxnet.fit(
            jaxnet.create_model("mlp128"),
            dict(source),
            create_optimizer("adam", 1e-3),
            epochs=1,
            batch_size=16,
            progress=False,
        )
    assert result.summary["steps"] == 4 and "test_accuracy" in result.history[0]


def test_early_stopping_positional_contract():
    stop = jcb.EarlyStopping("val_accuracy", "max", 4, True)
    assert (stop.monitor, stop.mode, stop.patience, stop.restore_best, stop.min_delta) == (
        "val_accuracy",
        "max",
        4,
        True,
        0.0,
    )
    with pytest.raises(ConfigError, match="patience"):
        jcb.EarlyStopping("val_loss", "min", -1)
    with pytest.raises(ConfigError, match="mode"):
        jcb.EarlyStopping("val_loss", "lowest")
