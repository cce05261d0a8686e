"""Every tutorial model against its PyTorch original: outputs, gradients, weights, shapes, init."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.interop import load_torch_state_dict, to_torch_state_dict
from jaxnet.models import MODELS, CifarCNN, ConvNet, LinearRegression, create_model

# --- The tutorials' PyTorch models, as written (see shared/seeds) -------------


class TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(p=0.2)
        self.fc2 = nn.Linear(512, 256)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(p=0.2)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x):
        x = x.view(-1, 784)
        x = self.dropout1(self.relu1(self.fc1(x)))
        x = self.dropout2(self.relu2(self.fc2(x)))
        return self.fc3(x)


class TorchMLP512(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        return self.fc2(self.relu1(self.fc1(x)))


class TorchMLP128(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(28 * 28, 128)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(self.flatten(x))))


class TorchConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout2d(0.25)
        self.dropout2 = nn.Dropout(0.5)  # the tutorial's Dropout2d(0.5) on 2-D input is deprecated
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class TorchCifarCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=16, kernel_size=3, stride=1, padding=1)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(in_channels=16, out_channels=32, kernel_size=3, stride=1, padding=1)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(in_features=32 * 8 * 8, out_features=128)  # the tutorial's 32 * 7 * 7, fixed
        self.fc2 = nn.Linear(in_features=128, out_features=10)

    def forward(self, x):
        out = self.pool1(self.conv1(x))
        out = self.pool2(self.conv2(out))
        out = out.view(out.size(0), -1)
        return self.fc2(self.fc1(out))


class TorchLinearRegression(nn.Module):
    def __init__(self, input_size=1, output_size=1):
        super().__init__()
        self.linear = nn.Linear(input_size, output_size)

    def forward(self, x):
        return self.linear(x)


TORCH_MODELS = {
    "mlp": TorchMLP,
    "mlp512": TorchMLP512,
    "mlp128": TorchMLP128,
    "convnet": TorchConvNet,
    "cifar_cnn": TorchCifarCNN,
    "linear": TorchLinearRegression,
}
NAMES = sorted(TORCH_MODELS)
BATCH = 4


def make_pair(name: str, seed: int = 0):
    """A PyTorch model, the jaxnet one holding the same weights, and a batch for both."""
    torch.manual_seed(seed)
    ref = TORCH_MODELS[name]()
    model = create_model(name, seed=seed + 1)
    load_torch_state_dict(model, ref.state_dict())
    shape = MODELS[name].input_shape
    x = torch.rand(BATCH, *shape)  # NHWC images in [0, 1), or (B, 1) regression inputs
    x_torch = x.permute(0, 3, 1, 2).contiguous() if len(shape) == 3 else x
    return ref, model, x_torch, jnp.asarray(x.numpy())


def assert_close(actual, expected, tol: float = 1e-5) -> None:
    """``|actual - expected| <= tol * max(1, |expected|)`` elementwise: abs for small values, relative for large."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= tol * np.maximum(1.0, np.abs(expected))), np.abs(actual - expected).max()


def loss_on(out, target):
    """A loss that depends on every output: mean squared error to a fixed target."""
    return ((out - target) ** 2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_eval_outputs_match_torch(name):
    ref, model, x_torch, x = make_pair(name)
    ref.eval()
    model.eval()
    with torch.no_grad():
        expected = ref(x_torch).numpy()
    out = model(x)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - expected).max() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_torch(name):
    ref, model, x_torch, x = make_pair(name)
    ref.eval()
    model.eval()
    target = torch.randn(ref(x_torch).shape)
    loss_on(ref(x_torch), target).backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    target_j = jnp.asarray(target.numpy())
    grads = jax.grad(lambda p: loss_on(nnx.merge(graphdef, p, rest, copy=True)(x), target_j))(params)
    # Put the gradients where the weights were and export them in PyTorch's layout.
    grad_model = nnx.merge(graphdef, grads, rest, copy=True)
    torch_grads = to_torch_state_dict(grad_model)
    assert sorted(torch_grads) == sorted(k for k, _ in ref.named_parameters())
    for key, param in ref.named_parameters():
        assert_close(torch_grads[key], param.grad.numpy())


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_exactly(name):
    ref, model, _, _ = make_pair(name)
    back = TORCH_MODELS[name]()
    result = back.load_state_dict(to_torch_state_dict(model, as_tensors=True))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", NAMES)
def test_eval_shape_matches_actual_shapes(name):
    spec = MODELS[name]
    abstract = nnx.eval_shape(lambda: create_model(name))
    model = create_model(name)
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))  # noqa: E731
    assert shapes(abstract) == shapes(model)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((3, *spec.input_shape), jnp.float32)

    def forward(state, x):
        return nnx.merge(graphdef, state, copy=True)(x, rngs=nnx.Rngs(dropout=0))

    predicted = jax.eval_shape(forward, state, x)
    actual = forward(state, jnp.zeros(x.shape, x.dtype))
    assert (predicted.shape, predicted.dtype) == (actual.shape, actual.dtype)
    assert actual.shape == (3, spec.num_classes or 1)


@pytest.mark.parametrize("name", NAMES)
def test_init_statistics_look_like_torch(name):
    torch.manual_seed(0)
    torch_sd = TORCH_MODELS[name]().state_dict()
    ours = to_torch_state_dict(create_model(name, seed=0))
    assert sorted(ours) == sorted(torch_sd)
    for key, ref in torch_sd.items():
        ref = ref.numpy()
        weight = torch_sd[key.rsplit(".", 1)[0] + ".weight"].numpy()
        bound = 1 / math.sqrt(math.prod(weight.shape[1:]))  # fan_in of the layer, also for its bias
        assert ours[key].shape == ref.shape
        assert np.abs(ours[key]).max() <= bound and np.abs(ref).max() <= bound
        if ref.size >= 1000:  # same spread as torch's U(-bound, bound)
            assert abs(ours[key].std() / ref.std() - 1) < 0.05, key


def test_models_hold_only_params():
    for name in NAMES:
        model = create_model(name)
        # No RNG streams, no BatchStats: the train step's split leaves nothing else.
        assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == [], name


def test_train_mode_dropout_uses_rngs():
    _, model, _, x = make_pair("mlp")
    a = model(x, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(a, model(x, rngs=nnx.Rngs(dropout=0)))
    assert not np.allclose(a, model(x, rngs=nnx.Rngs(dropout=1)))
    with pytest.raises(ConfigError, match="training mode"):
        model(x)
    model.eval()  # model.eval() in PyTorch: dropout off, rngs optional and ignored
    np.testing.assert_array_equal(model(x), model(x, rngs=nnx.Rngs(dropout=5)))
    training_view = nnx.view(model, deterministic=False)  # a train-mode view; model stays in eval mode
    assert not np.allclose(training_view(x, rngs=nnx.Rngs(dropout=0)), model(x))
    assert model.dropout1.deterministic and not training_view.dropout1.deterministic


def test_convnet_returns_log_probabilities():
    out = ConvNet(rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28, 1)), rngs=nnx.Rngs(1))
    np.testing.assert_allclose(jnp.exp(out).sum(axis=1), 1.0, rtol=1e-5)


def test_jit_train_forward_through_split_state():
    """The train step's pattern: split once, merge inside jit with a per-step dropout key."""
    model = create_model("convnet")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, x, step):
        rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(0), step))
        return nnx.merge(graphdef, params, rest, copy=True)(x, rngs=rngs)

    x = jnp.ones((2, 28, 28, 1))
    a, b = forward(params, rest, x, 0), forward(params, rest, x, 1)
    assert a.shape == (2, 10) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, forward(params, rest, x, 0))


def test_registry_and_create_model():
    # cifar_speed's PyTorch twin and its parity tests: jaxnet.bench.speed_torch, tests/bench/test_speed_torch.py
    assert set(MODELS) == set(TORCH_MODELS) | {"cifar_speed"}
    for name, spec in MODELS.items():
        assert spec.name == name
        model = create_model(name)
        assert isinstance(model, spec.cls)
        assert spec.output in ("logits", "log_probs", "regression")
        assert (spec.num_classes == 0) == (spec.output == "regression")
    assert MODELS["convnet"].output == "log_probs"
    assert MODELS["cifar_cnn"].input_shape == (32, 32, 3) and MODELS["cifar_cnn"].default_dataset == "cifar10"
    # seed and rngs decide the weights
    same = [to_torch_state_dict(create_model("mlp128", seed=s))["linear1.weight"] for s in (0, 0, 1)]
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], same[2])
    from_rngs = create_model("mlp128", rngs=nnx.Rngs(params=0))
    np.testing.assert_array_equal(to_torch_state_dict(from_rngs)["linear1.weight"], same[0])
    with pytest.raises(ConfigError) as info:
        create_model("resnet")
    for name in MODELS:
        assert name in str(info.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["mlp"].name = "x"  # frozen


def test_wrong_input_shapes_are_named():
    with pytest.raises(ConfigError, match="784-value examples"):
        create_model("mlp")(jnp.ones((2, 32, 32, 3)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"\(B, H, W, 3\)"):
        CifarCNN(rngs=nnx.Rngs(0))(jnp.ones((2, 3, 32, 32)))  # NCHW by mistake
    assert LinearRegression(3, 2, rngs=nnx.Rngs(0))(jnp.ones((5, 3))).shape == (5, 2)
