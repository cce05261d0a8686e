"""The speedrun's PyTorch twin computes what jaxnet computes: forward, augmentations, the recipe's first steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnet.averaging import lookahead_init, sync_decay
from jaxnet.data.augmentation import alternating_flip, flip_bits, translate
from jaxnet.data.transforms import normalize
from jaxnet.interop import to_torch_state_dict
from jaxnet.speedrun import (
    SpeedrunRecipe,
    lookahead_step,
    make_speedrun_optimizer,
    make_speedrun_step,
    speedrun_model,
)
from jaxnet.state import create_train_state

torch = pytest.importorskip("torch")

from jaxnet.bench.speed_torch import (  # noqa: E402  (needs torch)
    TorchLookahead,
    make_torch_speedrun_optimizer,
    torch_alternating_flip,
    torch_speed_net_like,
    torch_train_step,
    torch_translate,
    torch_tta_accuracy,
    torch_tta_logits,
    train_torch_speedrun,
)

# Whitening bias frozen after 2 steps, a lookahead sync at step 5 and the final one at step 6.
RECIPE = SpeedrunRecipe(widths=(8, 16, 12), batch_size=16, whiten_bias_epochs=1, lookahead_examples=80)
STEPS_PER_EPOCH, TOTAL = 2, 6


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (TOTAL, RECIPE.batch_size, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, (TOTAL, RECIPE.batch_size)).astype(np.int32),
    )


def to_torch(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> the normalized NCHW float tensor the twin takes."""
    x = np.asarray(normalize(images, RECIPE.mean, RECIPE.std)).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def test_same_weights_give_the_same_logits_and_batch_statistics():
    images, _ = data()
    model = speedrun_model(RECIPE, seed=1, whiten_from=images[0])
    twin = torch_speed_net_like(model)
    x = np.asarray(normalize(images[1], RECIPE.mean, RECIPE.std))
    train_logits = np.asarray(model(jnp.asarray(x)))  # training mode: batch statistics, updates running ones
    expected = twin(to_torch(images[1]))
    np.testing.assert_allclose(train_logits, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    ours = to_torch_state_dict(model)
    theirs = twin.state_dict()
    for key in ("groups.0.norm1.running_mean", "groups.2.norm2.running_var"):
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    model.eval()
    twin.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(jnp.asarray(x)), twin(to_torch(images[1])).numpy(), rtol=1e-4, atol=1e-5)


def test_augmentations_agree_for_the_same_offsets_and_bits():
    x = np.random.default_rng(2).normal(size=(6, 32, 32, 3)).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    offsets = np.random.default_rng(3).integers(0, 5, (6, 2))
    np.testing.assert_array_equal(
        np.asarray(translate(jnp.asarray(x), jnp.asarray(offsets), 2)).transpose(0, 3, 1, 2),
        torch_translate(nchw, offsets, 2).numpy(),
    )
    bits = np.asarray(flip_bits(jax.random.key(0), 6))
    for epoch in (0, 1):
        np.testing.assert_array_equal(
            np.asarray(alternating_flip(jnp.asarray(x), bits, epoch)).transpose(0, 3, 1, 2),
            torch_alternating_flip(nchw, bits, epoch).numpy(),
        )


def test_the_recipe_gives_the_same_losses_and_weights_step_by_step():
    images, labels = data(4)
    model = speedrun_model(RECIPE, seed=0, whiten_from=images.reshape(-1, 32, 32, 3)[:64])
    twin = torch_speed_net_like(model)
    tx = make_speedrun_optimizer(
        nnx.state(model, nnx.Param), RECIPE, steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL
    )
    graphdef, state = create_train_state(model, tx)
    step = make_speedrun_step(graphdef, tx, RECIPE)
    lookahead = lookahead_init((state.params, state.model_state))
    optimizer, scheduler = make_torch_speedrun_optimizer(
        twin, RECIPE, steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL
    )
    torch_lookahead = TorchLookahead(twin)
    whiten_bias = []
    for t in range(TOTAL):
        state, metrics = step(state, {"image": images[t], "label": labels[t]})
        loss = torch_train_step(
            twin,
            optimizer,
            scheduler,
            to_torch(images[t]),
            torch.from_numpy(labels[t]).long(),
            label_smoothing=RECIPE.label_smoothing,
            whiten_bias_trainable=t < RECIPE.whiten_bias_epochs * STEPS_PER_EPOCH,
        )
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=2e-5, err_msg=f"step {t}")
        decay = sync_decay(t + 1, TOTAL, every=RECIPE.sync_every)
        if decay is not None:
            state, lookahead = lookahead_step(state, lookahead, decay)
            torch_lookahead.update(twin, decay)
        whiten_bias.append(np.asarray(state.params["whiten"]["bias"][...]))
    assert not np.array_equal(whiten_bias[0], whiten_bias[1])  # trained in "epoch" 0
    np.testing.assert_array_equal(whiten_bias[1], whiten_bias[3])  # frozen from step 2 (until the sync)
    trained = nnx.merge(graphdef, state.params, state.model_state)
    theirs = twin.state_dict()
    for key, ours in to_torch_state_dict(trained).items():
        scale = max(1.0, float(np.abs(ours).max()))
        np.testing.assert_allclose(ours, theirs[key].numpy(), rtol=0, atol=1e-4 * scale, err_msg=key)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_torch_tta_is_jaxnets_tta(level):
    from jaxnet.tta import tta_logits

    images, _ = data(3)
    model = speedrun_model(RECIPE, whiten_from=images[0])
    twin = torch_speed_net_like(model).eval()
    model.eval()
    x = jnp.asarray(normalize(images[0], RECIPE.mean, RECIPE.std))
    want = np.asarray(tta_logits(lambda v: model(v), x, level))
    with torch.no_grad():
        got = torch_tta_logits(twin, to_torch(images[0]), level).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    with pytest.raises(Exception, match="tta level"):
        torch_tta_logits(twin, to_torch(images[0]), 3)


def test_torch_tta_accuracy_counts_hits_and_restores_train_mode():
    images, _ = data(4)
    twin = torch_speed_net_like(speedrun_model(RECIPE, whiten_from=images[0]))
    x = to_torch(images[0])
    with torch.no_grad():
        predicted = torch_tta_logits(twin.eval(), x, 1).argmax(-1)
    twin.train()
    labels = predicted.clone()
    labels[:4] = (labels[:4] + 1) % 10  # four wrong on purpose
    assert torch_tta_accuracy(twin, x, labels, level=1, batch_size=5) == pytest.approx(1 - 4 / len(labels))
    assert twin.training


def test_train_torch_speedrun_runs_the_recipe_and_learns():
    import dataclasses

    from jaxnet.data.dataset import ArrayDataset
    from jaxnet.speedrun import train_speedrun

    # A learnable synthetic task: the class is the brightest third of the image.
    rng = np.random.default_rng(0)
    n, m = 512, 128
    labels = rng.integers(0, 3, n + m).astype(np.int32)
    images = rng.integers(0, 96, (n + m, 32, 32, 3)).astype(np.uint8)
    for k in range(3):
        images[labels == k, :, 10 * k : 10 * k + 10, :] += 150
    dataset = ArrayDataset(
        name="thirds",
        train_images=images[:n],
        train_labels=labels[:n],
        test_images=images[n:],
        test_labels=labels[n:],
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        source="synthetic",
    )
    recipe = dataclasses.replace(RECIPE, batch_size=32, epochs=2.0, whiten_images=256, eval_batch_size=64)
    out = train_torch_speedrun(dataset, recipe=recipe, seed=0, curve=True, progress=False)
    assert out["steps"] == 2 * (n // 32) == len(out["losses"])
    assert [p[1] for p in out["curve"]] == [16, 32] and out["curve"][0][0] < out["curve"][1][0]
    assert out["accuracy"] == out["curve"][-1][2]
    assert np.mean(out["losses"][-5:]) < np.mean(out["losses"][:5])
    # 32 steps at the recipe's per-example rates move the loss, not yet the accuracy (the smoke test's job)
    assert 0 <= out["tta_accuracy"] <= 1 and out["train_seconds"] > 0 and out["tta_seconds"] > 0
    jax_out = train_speedrun(dataset, recipe=recipe, seed=0, curve=True, progress=False)
    assert [p[1] for p in jax_out.curve] == [16, 32] and jax_out.accuracy == jax_out.curve[-1][2]
    assert np.mean(jax_out.losses[-5:]) < np.mean(jax_out.losses[:5])
