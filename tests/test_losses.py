"""jaxnet.losses against torch.nn.functional: values and gradients, every reduction."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses
from jaxnet.errors import ConfigError, JaxnetError

torch = pytest.importorskip("torch")
F = torch.nn.functional

REDUCTIONS = ("mean", "sum", "none")
# (leading shape, num_classes); the class axis is last in jaxnet, dim 1 in torch.
CLASS_SHAPES = [((7,), 5), ((4, 3), 6), ((2, 3, 4), 3)]


def _close(actual, expected, tol=1e-5):
    """Max abs diff <= tol, relative to the magnitude for large values (sums)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.maximum(1.0, np.abs(expected))
    np.testing.assert_array_less(np.abs(actual - expected) / scale, tol)


def _to_torch_classes(x: np.ndarray) -> torch.Tensor:
    """(N, ..., C) -> torch's (N, C, ...)."""
    x = np.moveaxis(x, -1, 1) if x.ndim > 2 else x
    # torch's nll_loss2d backward rejects non-contiguous inputs.
    return torch.tensor(np.ascontiguousarray(x), requires_grad=True)


def _from_torch_classes(t: torch.Tensor) -> np.ndarray:
    x = t.detach().numpy()
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def _class_case(seed, lead, num_classes, ignore):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(lead + (num_classes,)) * 3).astype(np.float32)
    labels = rng.integers(0, num_classes, size=lead).astype(np.int32)
    if ignore:
        labels.flat[::3] = -100  # torch's default ignore_index
    weight = rng.uniform(0.2, 2.0, size=num_classes).astype(np.float32)
    return logits, labels, weight


@pytest.mark.parametrize("lead,num_classes", CLASS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "use_weight,ignore,smoothing",
    [
        (False, False, 0.0),
        (True, False, 0.0),
        (False, True, 0.0),
        (True, True, 0.0),
        (False, False, 0.1),
        (True, True, 0.25),
    ],
)
def test_cross_entropy_matches_torch(lead, num_classes, reduction, use_weight, ignore, smoothing):
    logits, labels, weight = _class_case(0, lead, num_classes, ignore)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)

    def ours(x):
        return losses.cross_entropy(
            x,
            jnp.asarray(labels),
            weight=jnp.asarray(weight) if use_weight else None,
            ignore_index=-100 if ignore else None,
            **kwargs,
        )

    t_logits = _to_torch_classes(logits)
    expected = F.cross_entropy(
        t_logits,
        torch.tensor(labels, dtype=torch.long),
        weight=torch.tensor(weight) if use_weight else None,
        ignore_index=-100,
        **kwargs,
    )
    _close(ours(jnp.asarray(logits)), expected.detach().numpy())

    # Gradient of the summed output w.r.t. the logits, against autograd.
    expected.sum().backward()
    grad = jax.grad(lambda x: jnp.sum(ours(x)))(jnp.asarray(logits))
    _close(grad, _from_torch_classes(t_logits.grad))


@pytest.mark.parametrize("lead,num_classes", CLASS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight,ignore", list(itertools.product([False, True], repeat=2)))
def test_nll_loss_matches_torch(lead, num_classes, reduction, use_weight, ignore):
    logits, labels, weight = _class_case(1, lead, num_classes, ignore)
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))

    def ours(x):
        return losses.nll_loss(
            x,
            jnp.asarray(labels),
            reduction=reduction,
            weight=jnp.asarray(weight) if use_weight else None,
            ignore_index=-100 if ignore else None,
        )

    t_in = _to_torch_classes(log_probs)
    expected = F.nll_loss(
        t_in,
        torch.tensor(labels, dtype=torch.long),
        reduction=reduction,
        weight=torch.tensor(weight) if use_weight else None,
    )
    _close(ours(jnp.asarray(log_probs)), expected.detach().numpy())
    expected.sum().backward()
    _close(jax.grad(lambda x: jnp.sum(ours(x)))(jnp.asarray(log_probs)), _from_torch_classes(t_in.grad))


def test_cross_entropy_mean_divides_by_summed_weights_not_count():
    logits = jnp.zeros((2, 2))
    labels = jnp.array([0, 1])
    # Both per-element losses are log 2; weights 1 and 3 give (1+3) log2 / (1+3).
    value = losses.cross_entropy(logits, labels, weight=jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(value, np.log(2.0), rtol=1e-6)


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    value = losses.cross_entropy(jnp.zeros((3, 4)), jnp.full((3,), -1), ignore_index=-1)
    expected = F.cross_entropy(torch.zeros(3, 4), torch.full((3,), -1), ignore_index=-1)
    assert np.isnan(value) and torch.isnan(expected)


def test_cross_entropy_is_jittable():
    logits, labels, weight = _class_case(2, (8,), 4, ignore=True)
    fn = jax.jit(
        lambda x, y: losses.cross_entropy(x, y, weight=jnp.asarray(weight), ignore_index=-100, label_smoothing=0.1)
    )
    eager = losses.cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), weight=jnp.asarray(weight), ignore_index=-100, label_smoothing=0.1
    )
    np.testing.assert_allclose(fn(logits, labels), eager, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_loss_matches_torch(shape, reduction):
    rng = np.random.default_rng(3)
    pred = rng.standard_normal(shape).astype(np.float32)
    target = rng.standard_normal(shape).astype(np.float32)
    t_pred = torch.tensor(pred, requires_grad=True)
    expected = F.mse_loss(t_pred, torch.tensor(target), reduction=reduction)
    ours = lambda p: losses.mse_loss(p, jnp.asarray(target), reduction=reduction)  # noqa: E731
    _close(ours(jnp.asarray(pred)), expected.detach().numpy())
    expected.sum().backward()
    _close(jax.grad(lambda p: jnp.sum(ours(p)))(jnp.asarray(pred)), t_pred.grad.numpy())


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS + ("batchmean",))
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(shape, reduction, log_target):
    rng = np.random.default_rng(4)
    log_q = np.asarray(jax.nn.log_softmax(rng.standard_normal(shape).astype(np.float32)))
    p = np.array(jax.nn.softmax(rng.standard_normal(shape).astype(np.float32) * 2))
    p[0, 0] = 0.0  # exercises 0 * log 0 = 0
    target = np.log(p + 1e-12).astype(np.float32) if log_target else p
    t_in = torch.tensor(log_q, requires_grad=True)
    expected = F.kl_div(t_in, torch.tensor(target), reduction=reduction, log_target=log_target)

    def ours(x):
        return losses.kl_div(x, jnp.asarray(target), reduction=reduction, log_target=log_target)

    _close(ours(jnp.asarray(log_q)), expected.detach().numpy())
    expected.sum().backward()
    _close(jax.grad(lambda x: jnp.sum(ours(x)))(jnp.asarray(log_q)), t_in.grad.numpy())


def test_kl_div_batchmean_is_true_kl_per_example():
    p = jnp.array([[0.25, 0.75], [0.5, 0.5]])
    q = jnp.array([[0.5, 0.5], [0.5, 0.5]])
    true_kl = float(jnp.sum(p * jnp.log(p / q)) / 2)
    np.testing.assert_allclose(losses.kl_div(jnp.log(q), p, reduction="batchmean"), true_kl, rtol=1e-6)
    # torch's "mean" divides by the element count (4), i.e. half of batchmean here.
    np.testing.assert_allclose(losses.kl_div(jnp.log(q), p), true_kl / 2, rtol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_pos_weight,use_weight", [(False, False), (True, False), (False, True), (True, True)])
def test_bce_with_logits_matches_torch(shape, reduction, use_pos_weight, use_weight):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(shape) * 4).astype(np.float32)
    targets = rng.uniform(size=shape).astype(np.float32)
    pos_weight = rng.uniform(0.5, 3.0, size=shape[-1:]).astype(np.float32)
    weight = rng.uniform(0.1, 2.0, size=shape).astype(np.float32)
    t_logits = torch.tensor(logits, requires_grad=True)
    expected = F.binary_cross_entropy_with_logits(
        t_logits,
        torch.tensor(targets),
        reduction=reduction,
        pos_weight=torch.tensor(pos_weight) if use_pos_weight else None,
        weight=torch.tensor(weight) if use_weight else None,
    )

    def ours(x):
        return losses.binary_cross_entropy_with_logits(
            x,
            jnp.asarray(targets),
            reduction=reduction,
            pos_weight=jnp.asarray(pos_weight) if use_pos_weight else None,
            weight=jnp.asarray(weight) if use_weight else None,
        )

    _close(ours(jnp.asarray(logits)), expected.detach().numpy())
    expected.sum().backward()
    _close(jax.grad(lambda x: jnp.sum(ours(x)))(jnp.asarray(logits)), t_logits.grad.numpy())


def test_bce_with_logits_is_stable_for_huge_logits():
    logits = jnp.array([1000.0, -1000.0, 1000.0, -1000.0])
    targets = jnp.array([1.0, 0.0, 0.0, 1.0])
    loss = losses.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    np.testing.assert_allclose(loss, [0.0, 0.0, 1000.0, 1000.0])
    grad = jax.grad(lambda x: jnp.sum(losses.binary_cross_entropy_with_logits(x, targets)))(logits)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "fn,args",
    [
        (losses.cross_entropy, (jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))),
        (losses.nll_loss, (jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))),
        (losses.mse_loss, (jnp.zeros(2), jnp.zeros(2))),
        (losses.kl_div, (jnp.zeros(2), jnp.zeros(2))),
        (losses.binary_cross_entropy_with_logits, (jnp.zeros(2), jnp.zeros(2))),
    ],
)
def test_unknown_reduction_raises_config_error(fn, args):
    with pytest.raises(ConfigError, match="unknown reduction 'avg'"):
        fn(*args, reduction="avg")


def test_bad_inputs_raise_with_the_fix():
    with pytest.raises(JaxnetError, match="moveaxis"):
        losses.cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer class indices"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(JaxnetError, match=r"labels must lie in \[0, 3\)"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(JaxnetError, match="reshape"):
        losses.mse_loss(jnp.zeros((4, 1)), jnp.zeros((4,)))
    with pytest.raises(ConfigError, match="label_smoothing"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), label_smoothing=1.5)
    with pytest.raises(JaxnetError, match=r"weight must have shape \(3,\)"):
        losses.nll_loss(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), weight=jnp.ones(2))
