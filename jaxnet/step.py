"""Step factories: the pure, jit-compiled heart of training.

PyTorch's loop body is five statements that mutate objects::

    optimizer.zero_grad(); out = model(x); loss = crit(out, y)
    loss.backward(); optimizer.step()

jaxnet's is one pure function, ``state, metrics = train_step(state, batch)``,
built once by :func:`make_train_step` and compiled by XLA as a whole (forward,
backward and update fused). Nothing accumulates between calls, so there is
nothing to zero. The model crosses the jit boundary as ``nnx.split`` state,
and the state is donated so XLA updates the parameters in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxnet import losses
from jaxnet.errors import ConfigError
from jaxnet.state import TrainState

Batch = Mapping[str, jax.Array]  # {"image": (B, ...), "label": (B,), optional "mask": (B,)}
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, labels) -> () mean loss
# transform(key, images, train) -> model inputs; runs on device inside the step.
Transform = Callable[[jax.Array, jax.Array, bool], jax.Array]

OUTPUT_KINDS = ("logits", "log_probs", "regression")


def loss_for_output(output: str) -> LossFn:
    """The PyTorch tutorials' loss for a model's kind of output.

    Args:
        output: ``"logits"`` (``nn.CrossEntropyLoss``), ``"log_probs"``
            (``nn.NLLLoss``, for models ending in ``log_softmax``) or
            ``"regression"`` (``nn.MSELoss``).

    Returns:
        ``loss_fn(outputs, labels) -> ()`` mean loss over the batch.

    Raises:
        ConfigError: for any other ``output``.
    """
    if output == "logits":
        return losses.cross_entropy
    if output == "log_probs":
        return losses.nll_loss
    if output == "regression":
        return lambda pred, target: losses.mse_loss(pred, target.reshape(pred.shape))
    raise ConfigError(f"unknown model output kind {output!r}; expected one of {OUTPUT_KINDS}")


def _prepare(transform: Transform | None, key: jax.Array, images: jax.Array, train: bool) -> jax.Array:
    if transform is None:
        return images
    return transform(key, images, train)


def train_step_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    transform: Transform | None = None,
    classification: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted train step; :func:`make_train_step` and :func:`make_scan_epoch` compile it.

    Args:
        graphdef: the model's graph definition (from ``create_train_state``).
        tx: the optax transformation that updates the parameters.
        loss_fn: ``loss_fn(outputs, labels) -> ()``.
        transform: optional on-device preprocessing ``transform(key, images, train)``.
        classification: whether to report ``accuracy`` besides ``loss``.

    Returns:
        ``train_step(state, batch) -> (state, metrics)``, pure.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)  # a fresh key per step, from the state alone
        aug_key, dropout_key = jax.random.split(key)
        inputs = _prepare(transform, aug_key, batch["image"], True)
        labels = batch["label"]

        def compute_loss(params: nnx.State) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
            # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            model.train()  # model.train() in PyTorch: dropout on, BatchNorm uses batch statistics
            outputs = model(inputs, rngs=nnx.Rngs(dropout=dropout_key))
            _, _, model_state = nnx.split(model, nnx.Param, ...)  # updated running statistics
            return loss_fn(outputs, labels), (outputs, model_state)

        (loss, (outputs, model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        metrics = {"loss": loss}
        if classification:
            metrics["accuracy"] = jnp.mean((jnp.argmax(outputs, -1) == labels).astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    transform: Transform | None = None,
    classification: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jit-compiled ``train_step(state, batch) -> (state, metrics)``.

    The counterpart of one iteration of the PyTorch loop (``zero_grad``,
    forward, loss, ``backward``, ``optimizer.step``). Dropout's key is
    ``fold_in(state.rng, state.step)``; ``metrics`` holds the batch's mean
    ``loss`` (and ``accuracy`` for classifiers) as device scalars, so calling
    the step never waits for the device.

    Args:
        graphdef: the model's graph definition (from ``create_train_state``).
        tx: the optax transformation that updates the parameters.
        loss_fn: ``loss_fn(outputs, labels) -> ()``, e.g. ``loss_for_output("logits")``.
        transform: optional on-device preprocessing ``transform(key, images, train)``
            (normalization, augmentation).
        classification: whether to report ``accuracy`` besides ``loss``.
        donate: donate the input state's buffers (the caller must not reuse
            the state it passed in, as with any in-place update).

    Returns:
        The compiled step. A second call with the same shapes does not recompile.

    Example:
        >>> import optax, numpy as np
        >>> from jaxnet.models import create_model
        >>> from jaxnet.state import create_train_state
        >>> graphdef, state = create_train_state(create_model("mlp128"), optax.sgd(0.1))
        >>> step = make_train_step(graphdef, optax.sgd(0.1), loss_for_output("logits"))
        >>> batch = {"image": np.zeros((8, 28, 28, 1), np.float32), "label": np.zeros(8, np.int32)}
        >>> state, metrics = step(state, batch)
        >>> int(state.step)
        1
    """
    step = train_step_fn(graphdef, tx, loss_fn, transform=transform, classification=classification)
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_scan_epoch(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    transform: Transform | None = None,
    classification: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds a whole training epoch as one compiled ``lax.scan`` over device-resident data.

    For small data sets that fit on the device: the host sends one array of
    batch indices per epoch and the device runs every step without returning
    to Python. Each step is exactly :func:`train_step_fn`'s, so a scanned epoch
    gives the same parameters as the same batches fed to :func:`make_train_step`.

    Args:
        graphdef, tx, loss_fn, transform, classification, donate: as for
            :func:`make_train_step`.

    Returns:
        ``train_epoch(state, images, labels, batch_indices) -> (state, metrics)``
        where ``images`` is ``(N, ...)`` and ``labels`` ``(N,)`` on the device,
        ``batch_indices`` is ``(S, B)`` int32 (one row per step, e.g. from
        :func:`jaxnet.data.epoch_permutation`), and ``metrics`` holds ``(S,)``
        per-step values.
    """
    step = train_step_fn(graphdef, tx, loss_fn, transform=transform, classification=classification)

    def train_epoch(state, images, labels, batch_indices):
        def body(state, idx):  # idx: (B,) int32
            batch = {"image": jnp.take(images, idx, axis=0), "label": jnp.take(labels, idx, axis=0)}
            return step(state, batch)

        return jax.lax.scan(body, state, batch_indices)

    return jax.jit(train_epoch, donate_argnums=(0,) if donate else ())


def make_predict_fn(
    graphdef: nnx.GraphDef, *, transform: Transform | None = None
) -> Callable[[TrainState, jax.Array], jax.Array]:
    """Builds the jit-compiled ``predict(state, images) -> outputs`` in eval mode.

    Counterpart of ``model.eval()`` plus ``with torch.no_grad(): model(x)``:
    dropout is off, BatchNorm uses its running statistics, and nothing is
    differentiated.

    Args:
        graphdef: the model's graph definition.
        transform: the same on-device preprocessing as training (applied with
            ``train=False``, so no augmentation).

    Returns:
        The compiled predict function; outputs are the model's raw outputs
        (logits, log-probabilities or regression values).
    """

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        inputs = _prepare(transform, state.rng, images, False)
        model = nnx.merge(graphdef, state.params, state.model_state)
        model.eval()
        return model(inputs)

    return jax.jit(predict)


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    transform: Transform | None = None,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Builds the jit-compiled ``eval_step(state, batch) -> {"outputs", "loss"}``.

    Evaluation batches keep one shape (a final partial batch is padded, and a
    ``"mask"`` marks the real examples, see :func:`jaxnet.train.evaluate`), so
    evaluation compiles once.

    Args:
        graphdef: the model's graph definition.
        loss_fn: the training loss; it is reported per example.
        transform: on-device preprocessing, applied with ``train=False``.

    Returns:
        ``eval_step(state, batch)`` returning the model's ``outputs`` ``(B, K)``
        and the per-example ``loss`` ``(B,)``.
    """
    return jax.jit(eval_step_fn(graphdef, loss_fn, transform=transform))


def eval_step_fn(
    graphdef: nnx.GraphDef, loss_fn: LossFn, *, transform: Transform | None = None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """The un-jitted evaluation step that :func:`make_eval_step` (and the sharded one) compile."""
    predict = make_predict_fn(graphdef, transform=transform)

    def eval_step(state: TrainState, batch: Batch) -> dict[str, Any]:
        outputs = predict(state, batch["image"])
        per_example = jax.vmap(lambda o, y: loss_fn(o[None], y[None]))(outputs, batch["label"])
        return {"outputs": outputs, "loss": per_example}

    return eval_step
