"""The library on a GPU: the convolution switch picks the plain op, and training, checkpoints and precision run there.

The suite pins JAX to the CPU (the root ``conftest.py`` sets
``JAX_PLATFORMS=cpu`` unless it is already set), so these tests skip
everywhere else. On a machine with an NVIDIA GPU run them with::

    JAX_PLATFORMS=cuda,cpu python -m pytest tests/e2e/test_gpu.py
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import checkpoint, train
from jaxnet.checkpoint.workdir import checkpoint_directory
from jaxnet.data import load_dataset
from jaxnet.models import create_model
from jaxnet.models.conv import CONV_IMPLS, conv2d, conv_impl, use_conv_impl
from tests.models.helpers import lowered_convolutions, max_rel_err, reference_values_and_grads, values_and_grads


def _gpu_devices() -> list[jax.Device]:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = pytest.mark.skipif(
    not _gpu_devices(), reason="no GPU visible to JAX: run with JAX_PLATFORMS=cuda,cpu on a machine with one"
)

GEOMETRIES = [  # stride, padding, dilation on a (2, 11, 9, 3) input with a 3x3 kernel to 5 channels
    dict(stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)),
    dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)),
    dict(stride=(1, 1), padding=((3, 0), (0, 4)), dilation=(1, 1)),  # beyond the kernel's extent
    dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2)),
]


def test_gpu_is_the_default_backend_and_auto_compiles_the_plain_convolution():
    assert jax.default_backend() == "gpu" and conv_impl() == "auto"
    geometry = GEOMETRIES[0]
    x, kernel = jnp.ones((2, 11, 9, 3)), jnp.ones((3, 3, 3, 5))
    grads = jax.grad(lambda a, k: conv2d(a, k, **geometry).sum(), argnums=(0, 1))
    convolutions = lowered_convolutions(grads, x, kernel, platforms=("cuda",))
    assert convolutions and all("lhs_dilate = [1, 1]" in c for c in convolutions)
    on_the_gpu = jax.jit(grads)(x, kernel)
    assert {next(iter(g.devices())).platform for g in on_the_gpu} == {"gpu"}
    # the same function on the GPU machine's CPU gets the CPU's forms
    with jax.default_device(jax.devices("cpu")[0]):
        compiled = jax.jit(grads).lower(x, kernel).compile().as_text()
    assert "lhs_dilate=1x2" in compiled


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"s{g['stride']}p{g['padding']}d{g['dilation']}")
@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_every_implementation_matches_the_float64_reference_on_the_gpu(impl, geometry):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 9, 3), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 3, 5), dtype=np.float32)
    with jax.default_matmul_precision("highest"):  # no TF32: the 1e-5 bar is for true fp32 arithmetic
        out = jax.eval_shape(lambda a, k: conv2d(a, k, **geometry), x, kernel)
        cotangent = rng.standard_normal(out.shape, dtype=np.float32)
        with use_conv_impl(impl):
            got = values_and_grads(conv2d, x, kernel, geometry, cotangent)
    assert all(next(iter(g.devices())).platform == "gpu" for g in got)
    expected = reference_values_and_grads(x, kernel, geometry, cotangent)
    for name, g, e in zip(("output", "input grad", "kernel grad"), got, expected):
        assert max_rel_err(g, e) <= 1e-5, (impl, name)


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist", download=False)  # the embedded sample: 6000 train / 1000 test images


def test_convnet_trains_on_the_gpu_and_its_checkpoint_restores_there(sample, tmp_path):
    result = train.fit(
        create_model("convnet"),
        sample,
        optax.adam(1e-3),
        epochs=2,
        batch_size=64,
        output="log_probs",
        workdir=tmp_path,
        progress=False,
    )
    leaves = jax.tree.leaves(result.state)
    assert all(next(iter(leaf.devices())).platform == "gpu" for leaf in leaves)
    assert result.history[-1]["test_accuracy"] > 0.9, result.history[-1]  # 6000 sample images, 2 epochs
    ckpt = checkpoint.create_checkpoint_manager(checkpoint_directory(tmp_path))
    try:
        restored, _ = checkpoint.restore(ckpt, result.state)
    finally:
        checkpoint.close(ckpt)
    for a, b in zip(leaves, jax.tree.leaves(restored)):
        assert next(iter(b.devices())).platform == "gpu"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_gpu(sample, precision):
    result = train.fit(
        create_model("convnet"),
        sample,
        optax.adam(1e-3),
        epochs=1,
        batch_size=64,
        output="log_probs",
        precision=precision,
        progress=False,
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(result.state.params))  # master weights
    assert result.history[-1]["test_accuracy"] > 0.8, result.history[-1]


def test_the_benchmark_on_the_cpu_keeps_jax_on_the_cpu_beside_pytorch():
    from jaxnet.bench.machine import on_the_cpu
    from tests.bench.helpers import run_cli

    with on_the_cpu():
        placed, computed = jax.device_put(np.ones(3)), jax.jit(lambda a: a * 2)(jnp.ones(3))
    assert {next(iter(a.devices())).platform for a in (placed, computed)} == {"cpu"}
    code, stdout, stderr = run_cli(
        ["bench", "--quick", "--device", "cpu", "--variants", "torch-eager,jax-jit", "--json"]
    )
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["machine"]["device"]["platform"] == "cpu"
    assert all(row["losses_agree"] for row in result["rows"])


def test_one_export_runs_on_the_gpu_and_on_the_cpu_with_each_platforms_convolutions(sample, tmp_path):
    from jaxnet.export import export_model, load_exported
    from jaxnet.state import create_train_state

    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(create_model("convnet"), tx)
    path = tmp_path / "convnet.jaxexport"
    path.write_bytes(
        export_model(
            graphdef,
            state,
            input_shape=(28, 28, 1),
            output="log_probs",
            transform=train.make_image_transform(sample.mean, sample.std),
        )
    )
    images = sample.test_images[:64]
    on_gpu = load_exported(path)
    assert {next(iter(w.devices())).platform for w in on_gpu.weights} == {"gpu"}
    with jax.default_device(jax.devices("cpu")[0]):
        on_cpu = load_exported(path)
        cpu_out = on_cpu(images)
    gpu_out = on_gpu(images)
    np.testing.assert_allclose(gpu_out, cpu_out, rtol=0, atol=1e-3 * np.abs(cpu_out).max())  # TF32 on the GPU
    np.testing.assert_array_equal(gpu_out.argmax(1), cpu_out.argmax(1))
