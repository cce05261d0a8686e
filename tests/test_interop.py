"""PyTorch state_dict interop: layouts, BatchNorm, files, and strict errors."""

from __future__ import annotations

from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flax import nnx

from jaxnet.errors import ConfigError, DataError
from jaxnet.interop import load_torch_state_dict, to_torch_state_dict
from jaxnet.models import BatchNorm2d, Conv2d, Linear, LinearRegression, flatten, max_pool2d
from jaxnet.models.tutorial import MLP512


class TorchBNNet(nn.Module):
    """Conv + BatchNorm + non-square flatten: every layout the converter handles."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 2), padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 4, 5)

    def forward(self, x):  # (B, 3, 6, 7) -> conv (B, 4, 6, 8) -> pool (B, 4, 3, 4)
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(torch.flatten(x, 1))


class BNNet(nnx.Module):
    torch_flatten_inputs = MappingProxyType({"head": (4, 3, 4)})

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = Conv2d(3, 4, (3, 2), padding=1, rngs=rngs)
        self.bn = BatchNorm2d(4, rngs=rngs)
        self.head = Linear(4 * 3 * 4, 5, rngs=rngs)

    def __call__(self, x, *, rngs=None):
        x = max_pool2d(jax.nn.relu(self.bn(self.conv(x))), 2)
        return self.head(flatten(x))


def to_nhwc(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def trained_torch_bn_net() -> TorchBNNet:
    """A TorchBNNet whose running stats and affine params are not at their defaults."""
    torch.manual_seed(0)
    ref = TorchBNNet()
    with torch.no_grad():
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        for _ in range(2):
            ref(torch.randn(8, 3, 6, 7))  # train mode: updates running stats
    return ref


def test_batchnorm_net_matches_torch_in_eval_and_train_mode():
    ref = trained_torch_bn_net()
    model = BNNet(rngs=nnx.Rngs(0))
    load_torch_state_dict(model, ref.state_dict())  # includes num_batches_tracked, ignored
    np.testing.assert_array_equal(model.bn.mean[...], ref.bn.running_mean.numpy())
    x = torch.randn(4, 3, 6, 7)
    ref.eval()
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(to_nhwc(x)), ref(x).numpy(), atol=1e-5)
    ref.train()
    model.train()
    with torch.no_grad():
        np.testing.assert_allclose(model(to_nhwc(x)), ref(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(model.bn.var[...], ref.bn.running_var.numpy(), atol=1e-6)
    # ... and back: PyTorch accepts the export strictly and gets the same tensors.
    back = TorchBNNet()
    back.load_state_dict(to_torch_state_dict(model, as_tensors=True))
    for key, value in to_torch_state_dict(model).items():
        np.testing.assert_array_equal(back.state_dict()[key].numpy(), value)
    assert "bn.num_batches_tracked" not in to_torch_state_dict(model)


def test_layouts_of_exported_arrays():
    model = BNNet(rngs=nnx.Rngs(0))
    sd = to_torch_state_dict(model)
    assert sd["conv.weight"].shape == (4, 3, 3, 2)  # OIHW
    np.testing.assert_array_equal(sd["conv.weight"], np.asarray(model.conv.kernel[...]).transpose(3, 2, 0, 1))
    assert sd["head.weight"].shape == (5, 48)
    # head's input row (h, w, c) in jaxnet is column c*12 + h*4 + w in PyTorch.
    kernel = np.asarray(model.head.kernel[...])
    h, w, c = 2, 1, 3
    np.testing.assert_array_equal(sd["head.weight"][:, c * 12 + h * 4 + w], kernel[(h * 4 + w) * 4 + c])
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in sd.values())
    assert all(isinstance(v, torch.Tensor) for v in to_torch_state_dict(model, as_tensors=True).values())


def test_numpy_and_bfloat16_values_are_accepted():
    ref = nn.Linear(1, 1)
    model = LinearRegression(rngs=nnx.Rngs(0))
    load_torch_state_dict(model, {"linear.weight": np.full((1, 1), 2.0), "linear.bias": np.array([0.5])})
    np.testing.assert_allclose(model(jnp.ones((1, 1))), [[2.5]])
    assert model.linear.kernel[...].dtype == jnp.float32
    sd = {f"linear.{k}": v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    load_torch_state_dict(model, sd)
    np.testing.assert_array_equal(model.linear.bias[...], sd["linear.bias"].float().numpy())


def test_load_from_file(tmp_path):
    ref = trained_torch_bn_net()
    path = tmp_path / "net.pt"
    torch.save(ref.state_dict(), path)
    for source in (path, str(path)):
        model = BNNet(rngs=nnx.Rngs(1))
        load_torch_state_dict(model, source)
        np.testing.assert_array_equal(to_torch_state_dict(model)["head.weight"], ref.head.weight.detach().numpy())


def test_file_errors(tmp_path):
    model = BNNet(rngs=nnx.Rngs(0))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch_state_dict(model, tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="corrupt.pt"):
        load_torch_state_dict(model, corrupt)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"conv.weight": torch.zeros(1), "obj": DataError("x")}, unsafe)  # not loadable with weights_only
    with pytest.raises(DataError, match="weights_only=True"):
        load_torch_state_dict(model, unsafe)
    whole = tmp_path / "model.pt"
    torch.save(nn.Linear(1, 1), whole)
    with pytest.raises(DataError, match="model.pt"):
        load_torch_state_dict(model, whole)
    with pytest.raises(TypeError, match=r"module.state_dict\(\)"):
        load_torch_state_dict(model, nn.Linear(1, 1))


def test_strict_errors_list_every_problem_and_change_nothing():
    model = BNNet(rngs=nnx.Rngs(0))
    before = to_torch_state_dict(model)
    sd = dict(trained_torch_bn_net().state_dict())
    sd["head.weight"] = torch.zeros(5, 47)
    sd["conv.weight"] = torch.zeros(4, 3, 2, 3)
    del sd["bn.running_var"], sd["head.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as info:
        load_torch_state_dict(model, sd)
    message = str(info.value)
    assert "BNNet" in message
    assert "Missing key(s): bn.running_var, head.bias" in message
    assert "Unexpected key(s): extra.weight" in message
    assert "head.weight: copying a param with shape (5, 47), the model expects (5, 48)" in message
    assert "conv.weight: copying a param with shape (4, 3, 2, 3), the model expects (4, 3, 3, 2)" in message
    for key, value in to_torch_state_dict(model).items():
        np.testing.assert_array_equal(value, before[key])


def test_error_hints_for_ddp_prefix_and_checkpoints():
    model = MLP512(rngs=nnx.Rngs(0))
    sd = {f"module.{k}": v for k, v in to_torch_state_dict(model).items()}
    with pytest.raises(ConfigError, match="DistributedDataParallel"):
        load_torch_state_dict(model, sd)
    with pytest.raises(ConfigError, match=r"checkpoint\['model_state_dict'\]"):
        load_torch_state_dict(model, {"model_state_dict": to_torch_state_dict(model), "epoch": 3})
    with pytest.raises(ConfigError, match="fc1.weight"):
        load_torch_state_dict(model, {**to_torch_state_dict(model), "fc1.weight": "abc"})


def test_layers_without_a_known_layout_are_refused():
    class Foreign(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    with pytest.raises(ConfigError, match="no known PyTorch layout"):
        to_torch_state_dict(Foreign())

    class BadFlatten(nnx.Module):
        torch_flatten_inputs = MappingProxyType({"fc": (2, 2, 2)})

        def __init__(self):
            self.fc = Linear(9, 2, rngs=nnx.Rngs(0))

    with pytest.raises(ConfigError, match="has 9 inputs"):
        to_torch_state_dict(BadFlatten())


def test_loading_keeps_the_sharding_of_the_parameters():
    mesh = jax.make_mesh((8,), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model = MLP512(rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, replicated))
    load_torch_state_dict(model, {k: v + 1 for k, v in to_torch_state_dict(model).items()})
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert leaf.sharding == replicated
