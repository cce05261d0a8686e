"""Generated data sets, for the regression tutorial and for tests."""

from __future__ import annotations

import numpy as np

from jaxnet.data.dataset import ArrayDataset


def make_linear_regression(
    *,
    train_x: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0),
    test_x: tuple[float, ...] = (5.0, 6.0),
    weight: float = 2.0,
    bias: float = 0.0,
) -> ArrayDataset:
    """The autograd tutorial's toy regression: ``y = weight * x + bias``.

    The tutorial fits ``nn.Linear(1, 1)`` to ``x = [1, 2, 3, 4]``,
    ``y = [2, 4, 6, 8]``; jaxnet keeps those four points for training and
    holds out ``x = 5, 6`` to test extrapolation.

    Args:
        train_x: inputs of the training split.
        test_x: inputs of the test split.
        weight, bias: the true line.

    Returns:
        An :class:`ArrayDataset` with float32 features of shape ``(N, 1)``,
        float32 targets of shape ``(N,)`` and ``num_classes=0``.

    Example:
        >>> make_linear_regression().train_labels.tolist()
        [2.0, 4.0, 6.0, 8.0]
    """

    def split(xs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(xs, np.float32).reshape(-1, 1)  # (N, 1)
        return x, (weight * x[:, 0] + bias).astype(np.float32)

    (x_train, y_train), (x_test, y_test) = split(train_x), split(test_x)
    return ArrayDataset(
        name="linear",
        train_images=x_train,
        train_labels=y_train,
        test_images=x_test,
        test_labels=y_test,
        num_classes=0,
        mean=(0.0,),
        std=(1.0,),
        source=f"generated: y = {weight:g} x + {bias:g} at x = {list(train_x)} (test x = {list(test_x)})",
    )
