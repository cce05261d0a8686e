"""jaxnet.bench.workload: the batches every variant trains on."""

from __future__ import annotations

import numpy as np

from jaxnet.bench.workload import make_batch_pool, make_workload


def test_batch_pool_is_identical_across_calls_and_fits_the_model():
    workload = make_workload("cifar_cnn", 4, 2)
    images, labels = make_batch_pool(workload)
    again, _ = make_batch_pool(workload)
    assert images.shape == (8, 4, 32, 32, 3) and labels.shape == (8, 4) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, again)  # subprocesses regenerate the same batches
    x, y = make_batch_pool(make_workload("linear", 4, 2))
    np.testing.assert_allclose(y, 2.0 * x[..., 0])
