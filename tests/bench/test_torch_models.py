"""jaxnet.bench.torch_models: each tutorial model's PyTorch twin computes what the jaxnet model does."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.models import create_model
from tests.helpers import needs_torch


@needs_torch
@pytest.mark.parametrize("name", ["mlp", "mlp512", "mlp128", "convnet", "cifar_cnn", "linear"])
def test_torch_twins_give_the_same_outputs_from_the_same_weights(name):
    import torch

    from jaxnet.bench.torch_models import build_torch_model
    from jaxnet.interop import to_torch_state_dict

    model = create_model(name, seed=3)
    model.eval()
    twin = build_torch_model(name, to_torch_state_dict(model)).eval()
    shape = (2, 1) if name == "linear" else (2, *((32, 32, 3) if name == "cifar_cnn" else (28, 28, 1)))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nchw = x if x.ndim == 2 else x.transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = twin(torch.from_numpy(np.ascontiguousarray(nchw))).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)
