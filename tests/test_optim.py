"""jaxnet.optim against torch.optim: 10 steps on the same model give the same parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import optim
from jaxnet.errors import ConfigError

torch = pytest.importorskip("torch")

STEPS = 10
_RNG = np.random.default_rng(0)
# A 2-layer MLP's parameter shapes (4 -> 8 -> 3), torch and jax layouts alike.
SHAPES = {"w1": (4, 8), "b1": (8,), "w2": (8, 3), "b2": (3,)}
PARAMS0 = {k: (_RNG.standard_normal(s) * 0.5).astype(np.float32) for k, s in SHAPES.items()}
# A fixed quadratic bowl: grads = curvature * (params - target), computed by
# each framework's autodiff from the same params. Elementwise, so the
# gradients agree to the last bit and any mismatch is the optimizer's.
CURVATURE = {k: _RNG.uniform(0.5, 2.0, s).astype(np.float32) for k, s in SHAPES.items()}
TARGET = {k: _RNG.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _loss(params, curvature, target):
    """0.5 * sum(curvature * (params - target) ** 2) over all leaves; jnp or torch."""
    return sum(0.5 * (curvature[k] * (params[k] - target[k]) ** 2).sum() for k in SHAPES)


def _run_jax(tx):
    params = jax.tree.map(jnp.asarray, PARAMS0)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(_loss)(params, CURVATURE, TARGET)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    history = []
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state)
        history.append(jax.tree.map(np.asarray, params))
    return history


def _run_torch(make_opt, clip=None, scheduler=None, steps_per_epoch=None):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in PARAMS0.items()}
    opt = make_opt(list(params.values()))
    sched = scheduler(opt) if scheduler else None
    curvature = {k: torch.tensor(v) for k, v in CURVATURE.items()}
    target = {k: torch.tensor(v) for k, v in TARGET.items()}
    history = []
    for i in range(STEPS):
        opt.zero_grad()
        _loss(params, curvature, target).backward()
        if clip is not None:
            clip(list(params.values()))
        opt.step()
        if sched is not None and (i + 1) % steps_per_epoch == 0:
            sched.step()  # per epoch, as in the tutorials
        history.append({k: v.detach().numpy().copy() for k, v in params.items()})
    return history


def _assert_same_trajectory(ours, theirs):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in PARAMS0:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} after step {step + 1}")
            # The displacement from the start isolates the update rule from the
            # (much larger) initial values.
            np.testing.assert_allclose(
                a[key] - PARAMS0[key],
                b[key] - PARAMS0[key],
                rtol=1e-4,
                atol=2e-6,
                err_msg=f"{key} displacement after step {step + 1}",
            )


topt = torch.optim
# (id, create_optimizer arguments, torch optimizer factory)
CASES = [
    ("sgd", ("sgd", 0.1), {}, lambda p: topt.SGD(p, lr=0.1)),
    ("sgd-momentum", ("sgd", 0.1), dict(momentum=0.9), lambda p: topt.SGD(p, 0.1, momentum=0.9)),
    (
        "sgd-nesterov",
        ("sgd", 0.1),
        dict(momentum=0.9, nesterov=True),
        lambda p: topt.SGD(p, 0.1, momentum=0.9, nesterov=True),
    ),
    (
        "sgd-dampening",
        ("sgd", 0.1),
        dict(momentum=0.9, dampening=0.5),
        lambda p: topt.SGD(p, 0.1, momentum=0.9, dampening=0.5),
    ),
    (
        "sgd-weight-decay",
        ("sgd", 0.1),
        dict(momentum=0.9, weight_decay=0.05),
        lambda p: topt.SGD(p, 0.1, momentum=0.9, weight_decay=0.05),
    ),
    ("adam-defaults", ("adam",), {}, lambda p: topt.Adam(p)),
    (
        "adam-options",
        ("adam", 0.02),
        dict(betas=(0.8, 0.99), eps=0.1, weight_decay=0.05),
        lambda p: topt.Adam(p, 0.02, betas=(0.8, 0.99), eps=0.1, weight_decay=0.05),
    ),
    (
        "adam-amsgrad",
        ("adam", 0.05),
        dict(amsgrad=True, eps=1e-3),
        lambda p: topt.Adam(p, 0.05, amsgrad=True, eps=1e-3),
    ),
    ("adamw-defaults", ("adamw",), {}, lambda p: topt.AdamW(p)),
    (
        "adamw-amsgrad",
        ("adamw", 0.05),
        dict(amsgrad=True, weight_decay=0.2),
        lambda p: topt.AdamW(p, 0.05, amsgrad=True, weight_decay=0.2),
    ),
    ("rmsprop-defaults", ("rmsprop",), {}, lambda p: topt.RMSprop(p)),
    ("rmsprop-eps-outside-sqrt", ("rmsprop", 0.01), dict(eps=0.1), lambda p: topt.RMSprop(p, 0.01, eps=0.1)),
    (
        "rmsprop-centered",
        ("rmsprop", 0.005),
        dict(centered=True, alpha=0.9),
        lambda p: topt.RMSprop(p, 0.005, centered=True, alpha=0.9),
    ),
    ("rmsprop-momentum", ("rmsprop", 0.005), dict(momentum=0.9), lambda p: topt.RMSprop(p, 0.005, momentum=0.9)),
    (
        "rmsprop-all",
        ("rmsprop", 0.005),
        dict(centered=True, momentum=0.5, weight_decay=0.1, eps=0.1),
        lambda p: topt.RMSprop(p, 0.005, centered=True, momentum=0.5, weight_decay=0.1, eps=0.1),
    ),
    ("adagrad-defaults", ("adagrad",), {}, lambda p: topt.Adagrad(p)),
    (
        "adagrad-options",
        ("adagrad", 0.1),
        dict(lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.05, eps=0.1),
        lambda p: topt.Adagrad(p, 0.1, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.05, eps=0.1),
    ),
    ("adadelta-defaults", ("adadelta",), {}, lambda p: topt.Adadelta(p)),
    (
        "adadelta-options",
        ("adadelta", 0.5),
        dict(rho=0.8, eps=1e-2, weight_decay=0.05),
        lambda p: topt.Adadelta(p, 0.5, rho=0.8, eps=1e-2, weight_decay=0.05),
    ),
]


@pytest.mark.parametrize("args,kwargs,make_torch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_torch_optim(args, kwargs, make_torch):
    _assert_same_trajectory(_run_jax(optim.create_optimizer(*args, **kwargs)), _run_torch(make_torch))


def test_clip_norm_matches_clip_grad_norm():
    ours = _run_jax(optim.create_optimizer("sgd", 0.1, momentum=0.9, clip_norm=0.1))
    theirs = _run_torch(lambda p: topt.SGD(p, 0.1, momentum=0.9), clip=lambda p: torch.nn.utils.clip_grad_norm_(p, 0.1))
    unclipped = _run_jax(optim.create_optimizer("sgd", 0.1, momentum=0.9))
    _assert_same_trajectory(ours, theirs)
    assert not np.allclose(ours[-1]["w1"], unclipped[-1]["w1"], rtol=1e-3)  # it did clip


def test_clip_value_matches_clip_grad_value():
    ours = _run_jax(optim.create_optimizer("adam", 0.01, clip_value=0.01))
    theirs = _run_torch(lambda p: topt.Adam(p, 0.01), clip=lambda p: torch.nn.utils.clip_grad_value_(p, 0.01))
    unclipped = _run_jax(optim.create_optimizer("adam", 0.01))
    _assert_same_trajectory(ours, theirs)
    assert not np.allclose(ours[-1]["w1"], unclipped[-1]["w1"], rtol=1e-3)


@pytest.mark.parametrize(
    "name,kwargs,make_torch",
    [
        ("sgd", dict(momentum=0.9), lambda p: topt.SGD(p, 0.1, momentum=0.9)),
        ("adagrad", dict(lr_decay=0.1), lambda p: topt.Adagrad(p, 0.1, lr_decay=0.1)),
        ("adamw", dict(weight_decay=0.5), lambda p: topt.AdamW(p, 0.1, weight_decay=0.5)),
    ],
)
def test_step_lr_schedule_matches_torch_step_lr_per_epoch(name, kwargs, make_torch):
    schedule = optim.create_schedule("step", 0.1, steps_per_epoch=3, step_size=2, gamma=0.5)
    ours = _run_jax(optim.create_optimizer(name, schedule, **kwargs))
    theirs = _run_torch(
        make_torch, steps_per_epoch=3, scheduler=lambda o: topt.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    )
    _assert_same_trajectory(ours, theirs)


def test_defaults_are_torchs():
    # Adam's default lr 1e-3: the first step moves each weight by ~lr (sign of the grad).
    params = {"w": jnp.array([1.0, -1.0])}
    for name, lr in [("adam", 1e-3), ("adamw", 1e-3)]:
        tx = optim.create_optimizer(name)
        updates, _ = tx.update({"w": jnp.array([2.0, -3.0])}, tx.init(params), params)
        wd = 1e-2 if name == "adamw" else 0.0
        np.testing.assert_allclose(updates["w"], [-lr - lr * wd, lr + lr * wd], rtol=1e-5)
    assert optim.OPTIMIZERS == ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")


def test_state_structure_and_dtypes_are_stable_under_jit():
    for name in optim.OPTIMIZERS:
        tx = optim.create_optimizer(name, 0.1, **({"momentum": 0.9} if name == "sgd" else {}))
        params = jax.tree.map(jnp.asarray, PARAMS0)
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        _, new_state = jax.jit(tx.update)(grads, state, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state), name
        assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state), name


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: optim.create_optimizer("adamax"), "choose one of sgd, adam, adamw"),
        (lambda: optim.create_optimizer("sgd"), r"no default learning rate.*create_optimizer\('sgd'"),
        (lambda: optim.create_optimizer("sgd", -0.1), "learning_rate must be >= 0"),
        (lambda: optim.create_optimizer("sgd", 0.1, nesterov=True), "momentum > 0 and dampening=0"),
        (
            lambda: optim.create_optimizer("sgd", 0.1, momentum=0.9, nesterov=True, dampening=0.1),
            "momentum > 0 and dampening=0",
        ),
        (lambda: optim.create_optimizer("sgd", 0.1, momentum=-0.9), "momentum must be >= 0"),
        (lambda: optim.create_optimizer("adam", weight_decay=-1.0), "weight_decay must be >= 0"),
        (lambda: optim.create_optimizer("adam", betas=(0.9, 1.0)), r"betas must be two values"),
        (lambda: optim.create_optimizer("adam", momentum=0.9), "momentum=0.9 does not apply to 'adam'"),
        (lambda: optim.create_optimizer("sgd", 0.1, amsgrad=True), "amsgrad=True does not apply"),
        (lambda: optim.create_optimizer("sgd", 0.1, eps=1e-8), "eps does not apply to 'sgd'"),
        (lambda: optim.create_optimizer("adadelta", rho=1.5), "rho must be in"),
        (lambda: optim.create_optimizer("adam", clip_norm=0.0), "clip_norm must be > 0"),
        (lambda: optim.create_optimizer("adam", clip_norm=1.0, clip_value=1.0), "not both"),
    ],
)
def test_invalid_configuration_raises_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
