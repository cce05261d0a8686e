"""Parameter groups: labels by path, each group's lr/decay on the right leaves, freezing, torch.optim parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.cifar_speed import CifarSpeedNet
from jaxnet.param_groups import FROZEN, SGDGroup, label_params, leaf_paths, make_group_sgd
from jaxnet.speedrun import PARAM_RULES

torch = pytest.importorskip("torch")

RULES = ((r"frozen\..*", "frozen"), (r".*\.bias", "bias"), (r"slow\..*", "slow"))
GROUPS = {
    "frozen": FROZEN,
    "bias": SGDGroup(0.5, weight_decay=0.1),
    "slow": SGDGroup(0.01, weight_decay=2.0),
    "default": SGDGroup(0.1),
}


def params():
    return {
        "frozen": {"w": jnp.array([1.0, -1.0])},
        "layer": {"bias": jnp.array([0.5]), "w": jnp.array([2.0])},
        "slow": {"w": jnp.array([3.0, 1.0])},
    }


def test_speedrun_labels_on_the_net():
    state = nnx.state(CifarSpeedNet(widths=(4, 8, 8), rngs=nnx.Rngs(0)), nnx.Param)
    paths = jax.tree.leaves(leaf_paths(state))
    assert "groups.0.norm1.bias" in paths and "whiten.kernel" in paths and "head.kernel" in paths
    labels = dict(zip(paths, jax.tree.leaves(label_params(state, PARAM_RULES))))
    assert labels["whiten.kernel"] == "frozen" and labels["whiten.bias"] == "whiten_bias"
    for g in range(3):
        for n in (1, 2):
            assert labels[f"groups.{g}.norm{n}.scale"] == "frozen"
            assert labels[f"groups.{g}.norm{n}.bias"] == "norm_bias"
            assert labels[f"groups.{g}.conv{n}.kernel"] == "default"
    assert labels["head.kernel"] == "default"
    assert sorted(set(labels.values())) == ["default", "frozen", "norm_bias", "whiten_bias"]


def by_hand(p: dict, grads: list[dict], factor, momentum: float) -> dict:
    """torch.optim.SGD(nesterov=True) per leaf, written out."""
    labels = {("frozen", "w"): "frozen", ("layer", "bias"): "bias", ("layer", "w"): "default", ("slow", "w"): "slow"}
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p.items()}
    buf = {}
    for t, g in enumerate(grads):
        for (k, n), label in labels.items():
            group = GROUPS[label]
            if group is None:
                continue
            d = np.asarray(g[k][n], np.float64) + group.weight_decay * p[k][n]
            buf[k, n] = d if t == 0 else momentum * buf[k, n] + d
            p[k][n] = p[k][n] - group.lr * factor(t) * (d + momentum * buf[k, n])
    return p


def test_each_group_gets_its_own_lr_and_decay_for_two_steps():
    grads = [
        jax.tree.map(lambda x: jnp.full_like(x, 0.3), params()),
        jax.tree.map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape), params()),
    ]
    factor = lambda t: 0.5 + t  # noqa: E731  LambdaLR's lambda
    tx = make_group_sgd(label_params(params(), RULES), GROUPS, momentum=0.9, nesterov=True, schedule=factor)
    p, opt_state = params(), tx.init(params())
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, p)
        p = optax.apply_updates(p, updates)
    expected = by_hand(params(), grads, factor, 0.9)
    for k, d in expected.items():
        for n, v in d.items():
            np.testing.assert_allclose(p[k][n], v, rtol=1e-6, err_msg=f"{k}.{n}")
    np.testing.assert_array_equal(p["frozen"]["w"], params()["frozen"]["w"])


def test_a_stopped_group_stays_exactly_put_while_its_momentum_is_not_zero():
    groups = dict(GROUPS, bias=SGDGroup(0.5, weight_decay=0.1, stop_step=2))
    tx = make_group_sgd(label_params(params(), RULES), groups, momentum=0.9, nesterov=True)
    p, opt_state = params(), tx.init(params())
    g = jax.tree.map(jnp.ones_like, params())
    history = []
    for _ in range(4):
        updates, opt_state = tx.update(g, opt_state, p)
        p = optax.apply_updates(p, updates)
        history.append((float(p["layer"]["bias"][0]), float(p["layer"]["w"][0])))
    assert history[0][0] != history[1][0] and history[1][0] == history[2][0] == history[3][0]
    assert len({w for _, w in history}) == 4  # the other groups keep moving
    traces = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.shape == (1,) and float(leaf[0]) != 0.0]
    assert traces, "the stopped group's momentum buffer should still be non-zero"


def test_matches_torch_sgd_param_groups_with_lambda_lr():
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params()) for _ in range(3)]
    factor = lambda t: 0.2 + 0.3 * t  # noqa: E731
    tx = make_group_sgd(label_params(params(), RULES), GROUPS, momentum=0.85, nesterov=True, schedule=factor)
    p, opt_state = params(), tx.init(params())
    tp = {
        f"{k}.{n}": torch.tensor(np.asarray(v), requires_grad=k != "frozen")
        for k, d in params().items()
        for n, v in d.items()
    }
    groups = [
        {"params": [tp["layer.bias"]], "lr": 0.5, "weight_decay": 0.1},
        {"params": [tp["slow.w"]], "lr": 0.01, "weight_decay": 2.0},
        {"params": [tp["layer.w"]], "lr": 0.1, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, momentum=0.85, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, p)
        p = optax.apply_updates(p, updates)
        for name, t in tp.items():
            if t.requires_grad:
                k, n = name.split(".")
                t.grad = torch.tensor(np.asarray(g[k][n]))
        opt.step()
        sched.step()
    for name, t in tp.items():
        k, n = name.split(".")
        np.testing.assert_allclose(p[k][n], t.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_labels_without_a_group_and_bad_patterns_are_named():
    with pytest.raises(ConfigError, match=r"labelled \['slow'\] have no group"):
        make_group_sgd(label_params(params(), RULES), {k: v for k, v in GROUPS.items() if k != "slow"})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        label_params(params(), [("(", "x")])
