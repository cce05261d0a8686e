"""jaxnet.schedules against torch.optim.lr_scheduler: the learning rate at every step, warm-up, errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import optim
from jaxnet.errors import ConfigError
from jaxnet.schedules import SCHEDULES, WARMUP_FRACTION, create_schedule

torch = pytest.importorskip("torch")

lr_scheduler = torch.optim.lr_scheduler


def _torch_lrs(scheduler, total, steps_per_epoch=1):
    """The lr torch uses at each optimizer step, the scheduler stepped every steps_per_epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = scheduler(opt)
    lrs = []
    for i in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if (i + 1) % steps_per_epoch == 0:
            sched.step()
    return np.array(lrs)


@pytest.mark.parametrize(
    "name,kwargs,make_torch,per_epoch",
    [
        ("constant", {}, lambda o: lr_scheduler.ConstantLR(o, factor=1.0), True),
        ("step", dict(step_size=3, gamma=0.3), lambda o: lr_scheduler.StepLR(o, 3, gamma=0.3), True),
        ("exponential", dict(gamma=0.7), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.7), True),
        (
            "cosine",
            dict(epochs=6, end_lr=0.01),
            lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=24, eta_min=0.01),
            False,
        ),
        (
            "warmup_cosine",
            dict(epochs=6, warmup_steps=5, end_lr=0.01),
            lambda o: lr_scheduler.SequentialLR(
                o,
                [
                    lr_scheduler.LinearLR(o, start_factor=1e-9, total_iters=5),
                    lr_scheduler.CosineAnnealingLR(o, T_max=19, eta_min=0.01),
                ],
                milestones=[5],
            ),
            False,
        ),
    ],
)
def test_schedule_matches_torch_scheduler(name, kwargs, make_torch, per_epoch):
    steps_per_epoch, total = 4, 24
    schedule = create_schedule(name, 0.1, steps_per_epoch=steps_per_epoch, **kwargs)
    ours = np.array([schedule(jnp.int32(i)) for i in range(total)])
    theirs = _torch_lrs(make_torch, total, steps_per_epoch if per_epoch else 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-8)
    assert ours.dtype == np.float32


def test_cosine_holds_end_lr_after_the_run():
    schedule = create_schedule("cosine", 0.1, steps_per_epoch=2, epochs=3, end_lr=0.02)
    np.testing.assert_allclose([schedule(6), schedule(100)], [0.02, 0.02], rtol=1e-6)


def test_warmup_cosine_warms_up_by_default_and_differs_from_cosine():
    # 10 epochs of 10 steps: the default warm-up is 5% of the run, 5 steps rising linearly from 0.
    warm = create_schedule("warmup_cosine", 0.1, steps_per_epoch=10, epochs=10, end_lr=0.01)
    cosine = create_schedule("cosine", 0.1, steps_per_epoch=10, epochs=10, end_lr=0.01)
    lrs = np.array([warm(jnp.int32(i)) for i in range(101)])
    np.testing.assert_allclose(lrs[:6], [0.0, 0.02, 0.04, 0.06, 0.08, 0.1], rtol=1e-5, atol=1e-8)
    assert np.all(np.diff(lrs[5:]) <= 1e-8) and lrs[-1] == pytest.approx(0.01)  # then cosine down to end_lr
    assert not np.allclose(lrs[:10], [cosine(i) for i in range(10)])
    assert WARMUP_FRACTION == 0.05


def test_warmup_given_in_epochs_or_steps():
    by_epochs = create_schedule("warmup_cosine", 0.1, steps_per_epoch=10, epochs=10, warmup_epochs=2)
    by_steps = create_schedule("warmup_cosine", 0.1, steps_per_epoch=10, epochs=10, warmup_steps=20)
    for step in (0, 10, 20, 60):
        assert float(by_epochs(step)) == float(by_steps(step))
    assert float(by_epochs(10)) == pytest.approx(0.05) and float(by_epochs(20)) == pytest.approx(0.1)
    half = create_schedule("warmup_cosine", 0.1, steps_per_epoch=10, epochs=10, warmup_epochs=0.5)
    assert float(half(5)) == pytest.approx(0.1) and float(half(4)) == pytest.approx(0.08)
    # No warm-up is cosine, to the bit; a one-step run has no room for one.
    none = create_schedule("warmup_cosine", 0.1, steps_per_epoch=10, epochs=10, warmup_steps=0)
    cosine = create_schedule("cosine", 0.1, steps_per_epoch=10, epochs=10)
    assert [float(none(i)) for i in range(0, 100, 7)] == [float(cosine(i)) for i in range(0, 100, 7)]
    assert float(create_schedule("warmup_cosine", 0.1, steps_per_epoch=1, epochs=1)(0)) == pytest.approx(0.1)


def test_the_schedules_are_importable_from_jaxnet_optim():
    assert optim.create_schedule is create_schedule and optim.SCHEDULES is SCHEDULES
    assert optim.WARMUP_FRACTION == WARMUP_FRACTION


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_schedule("linear", 0.1, steps_per_epoch=1), "choose one of constant"),
        (lambda: create_schedule("step", 0.1, steps_per_epoch=10), "needs step_size="),
        (lambda: create_schedule("cosine", 0.1, steps_per_epoch=10), "needs epochs="),
        (lambda: create_schedule("constant", 0.1, steps_per_epoch=0), "steps_per_epoch"),
        (
            lambda: create_schedule("warmup_cosine", 0.1, steps_per_epoch=2, epochs=2, warmup_steps=4),
            r"warmup_steps must be in \[0, 4\)",
        ),
        (
            lambda: create_schedule("warmup_cosine", 0.1, steps_per_epoch=2, epochs=3, warmup_epochs=3),
            r"warmup_epochs must be in \[0, 3\) \(the run's epochs\)",
        ),
        (
            lambda: create_schedule("warmup_cosine", 0.1, steps_per_epoch=2, epochs=3, warmup_epochs=1, warmup_steps=2),
            "give warmup_steps or warmup_epochs, not both",
        ),
        (
            lambda: create_schedule("cosine", 0.1, steps_per_epoch=2, epochs=3, warmup_epochs=1),
            "warmup_epochs applies to schedule 'warmup_cosine', not 'cosine'",
        ),
    ],
)
def test_invalid_schedule_raises_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
