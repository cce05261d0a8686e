"""BatchNorm1d and BatchNorm2d against PyTorch: train and eval outputs, running stats, gradients, state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models.normalization import BatchNorm1d, BatchNorm2d
from tests.models.helpers import close, grads, nchw_to_nhwc, nhwc_to_numpy_nchw

# --- BatchNorm --------------------------------------------------------------


def _copy_bn(ref: torch.nn.Module, bn) -> None:
    bn.scale[...] = jnp.asarray(ref.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(ref.bias.detach().numpy())


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_batchnorm2d_matches_torch_train_and_eval(momentum):
    torch.manual_seed(4)
    ref = torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = BatchNorm2d(6, momentum=momentum)
    _copy_bn(ref, bn)
    for step in range(3):
        x = torch.randn(4, 6, 5, 3) * (step + 1) + step
        close(nhwc_to_numpy_nchw(bn(nchw_to_nhwc(x))), ref(x).detach().numpy())
    close(bn.mean[...], ref.running_mean.numpy())
    close(bn.var[...], ref.running_var.numpy())
    ref.eval()
    bn.eval()
    x = torch.randn(2, 6, 5, 3)
    close(nhwc_to_numpy_nchw(bn(nchw_to_nhwc(x))), ref(x).detach().numpy())
    close(bn.var[...], ref.running_var.numpy())  # eval mode leaves the stats alone


def test_batchnorm2d_train_grads_match_torch():
    torch.manual_seed(5)
    ref = torch.nn.BatchNorm2d(3)
    bn = BatchNorm2d(3)
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    weights = torch.randn(4, 3, 4, 4)
    (ref(x) * weights).sum().backward()
    g, gx = grads(bn, lambda m, a: (m(a) * nchw_to_nhwc(weights)).sum(), nchw_to_nhwc(x))
    close(nhwc_to_numpy_nchw(gx), x.grad.numpy())
    close(g["scale"][...], ref.weight.grad.numpy())
    close(g["bias"][...], ref.bias.grad.numpy())


@pytest.mark.parametrize("shape", [(8, 5), (4, 7, 5)])
def test_batchnorm1d_matches_torch(shape):
    torch.manual_seed(6)
    ref = torch.nn.BatchNorm1d(5)
    bn = BatchNorm1d(5)
    for _ in range(3):
        x = torch.randn(*shape) * 2 + 1
        if len(shape) == 2:
            expected = ref(x).detach().numpy()
        else:  # jaxnet (B, L, C) is PyTorch's (B, C, L)
            expected = ref(x.transpose(1, 2)).detach().numpy().transpose(0, 2, 1)
        close(bn(jnp.asarray(x.numpy())), expected)
    close(bn.mean[...], ref.running_mean.numpy())
    close(bn.var[...], ref.running_var.numpy())


def test_batchnorm_state_is_param_and_batchstat_and_jit_updates_stats():
    bn = BatchNorm2d(3)
    graphdef, params, stats, rest = nnx.split(bn, nnx.Param, nnx.BatchStat, ...)
    assert set(params.keys()) == {"scale", "bias"}
    assert set(stats.keys()) == {"mean", "var"}
    assert jax.tree.leaves(rest) == []

    @jax.jit
    def forward(params, stats, x):
        model = nnx.merge(graphdef, params, stats)
        y = model(x)
        return y, nnx.state(model, nnx.BatchStat)

    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 3))
    y, new_stats = forward(params, stats, x)
    close(y, bn(x))  # eager call on the module updates bn's own stats
    close(new_stats["mean"][...], bn.mean[...])
    close(new_stats["var"][...], bn.var[...])


def test_batchnorm_errors():
    with pytest.raises(ConfigError, match="more than 1 value"):
        BatchNorm1d(3)(jnp.ones((1, 3)))
    with pytest.raises(ConfigError, match=r"\(B, H, W, C\)"):
        BatchNorm2d(3)(jnp.ones((4, 3)))
    with pytest.raises(ConfigError, match="momentum=None"):
        BatchNorm2d(3, momentum=None)
