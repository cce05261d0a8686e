"""``jaxnet.predict``: a trained model's outputs on new inputs, batched and compiled once.

Counterpart of ``model.eval()`` plus ``with torch.no_grad(): model(x)`` over a
``DataLoader``: dropout off, BatchNorm on its running statistics, the inputs
preprocessed as in training (``ToTensor``/``Normalize`` for pixels), and the
last partial batch padded so that one compiled function serves every batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.state import TrainState, copy_state
from jaxnet.step import Transform, make_predict_fn


def _graph_and_state(model_or_result: Any) -> tuple[nnx.GraphDef, TrainState, Transform | None]:
    from jaxnet.training.result import _PREPROCESSING, FitResult

    if isinstance(model_or_result, FitResult):
        return model_or_result.graphdef, model_or_result.state, model_or_result.transform
    if isinstance(model_or_result, nnx.Module):
        graphdef, params, rest = nnx.split(model_or_result, nnx.Param, ...)  # type: ignore[misc]  # flax types nnx.split's result as a variadic tuple
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=copy_state(params),
            opt_state=(),
            model_state=copy_state(rest),
            rng=jax.random.PRNGKey(0),
        )
        return graphdef, state, _PREPROCESSING.get(model_or_result)
    raise ConfigError(f"predict takes a model (nnx.Module) or fit's result; got a {type(model_or_result).__name__}")


def predict(
    model_or_result: Any,
    x: Any,
    *,
    batch_size: int = 256,
    transform: Transform | None = None,
) -> np.ndarray:
    """The model's outputs on ``x``, in evaluation mode, ``batch_size`` examples per compiled call.

    Args:
        model_or_result: the :class:`~jaxnet.train.FitResult` of a run, or a
            model (the object passed to :func:`jaxnet.fit` remembers the run's
            preprocessing; any other model gets ``transform`` or none).
        x: inputs ``(N, ...)`` as the training data had them (e.g. uint8 images).
        batch_size: examples per call; the last batch is padded (compiles once).
        transform: preprocessing to use instead of the run's.

    Returns:
        ``(N, ...)`` float32 raw outputs: logits (``jax.nn.softmax`` for
        probabilities), log-probabilities, one binary logit, or regression values.

    Raises:
        ConfigError: not a model or a result, bad ``batch_size``, empty ``x``.

    >>> from jaxnet.models import create_model
    >>> predict(create_model("linear"), np.ones((3, 1), np.float32)).shape
    (3, 1)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    graphdef, state, run_transform = _graph_and_state(model_or_result)
    fn = make_predict_fn(graphdef, transform=transform if transform is not None else run_transform)
    n = len(x)
    if n == 0:
        raise ConfigError("predict got no examples (x is empty)")
    size = min(batch_size, n)
    outputs = []
    for start in range(0, n, size):
        chunk = np.asarray(x[start : start + size])
        real = len(chunk)
        if real < size:  # pad the last batch: one compiled shape for every call
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        if np.issubdtype(chunk.dtype, np.floating) and chunk.dtype != np.float32:
            chunk = chunk.astype(np.float32)
        outputs.append(np.asarray(fn(state, chunk), np.float32)[:real])
    return np.concatenate(outputs)
