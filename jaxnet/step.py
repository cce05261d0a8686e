"""Step factories: the pure, jit-compiled heart of training.

PyTorch's loop body is five statements that mutate objects::

    optimizer.zero_grad(); out = model(x); loss = crit(out, y)
    loss.backward(); optimizer.step()

jaxnet's is one pure function, ``state, metrics = train_step(state, batch)``,
built once by :func:`make_train_step` and compiled by XLA as a whole (forward,
backward and update fused). Nothing accumulates between calls, so there is
nothing to zero. The model crosses the jit boundary as ``nnx.split`` state,
and the state is donated so XLA updates the parameters in place.

Every step of jaxnet has one type, :data:`StepFn`, and is compiled by one
helper, :func:`compile_step` (``jax.jit`` with the state donated): the
mixed-precision step (:mod:`jaxnet.precision`) and the multi-device ones
(:mod:`jaxnet.parallel`) are built from :func:`train_step_fn` and take its
keyword arguments as they are, so that a new option reaches them all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.typing import ArrayLike

from jaxnet import losses
from jaxnet.errors import ConfigError
from jaxnet.outputs import CLASSIFIER_KINDS, OUTPUT_KINDS
from jaxnet.state import TrainState

Batch = Mapping[str, jax.Array]  # {"image": (B, ...), "label": (B,), optional "mask": (B,)}
# (outputs, labels) -> () mean loss; a loss may also take the batch: (outputs, labels, batch).
LossFn = Callable[..., jax.Array]
MetricFn = Callable[..., jax.Array]  # (outputs, labels[, batch]) -> () batch mean
# transform(key, images, train) -> model inputs; runs on device inside the step.
Transform = Callable[[jax.Array, jax.Array, bool], jax.Array]
# train_step(state, batch) -> (state, metrics): every train step, compiled or not, on any devices.
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
# eval_step(state, batch) -> {"outputs": (B, ...), "loss": (B,), "metrics": {name: (B,)}}.
EvalFn = Callable[[TrainState, Batch], dict[str, Any]]
# train_epoch(state, images, labels, batch_indices) -> (state, per-step metrics): a scanned epoch;
# the (S, B) indices come from the host (jaxnet.data.epoch_permutation), a numpy array.
EpochFn = Callable[[TrainState, jax.Array, jax.Array, ArrayLike], tuple[TrainState, dict[str, jax.Array]]]


def compile_step(
    fn: Callable[..., Any], *, donate: bool = True, compiler: Callable[..., Any] = jax.jit, **compile_kwargs: Any
) -> Callable[..., Any]:
    """Compiles a step whose first argument is the state, donating the state's buffers.

    The one place where jaxnet's steps are compiled: ``jax.jit(fn,
    donate_argnums=(0,))``, so XLA writes the new parameters and optimizer
    state into the old ones' memory instead of holding both.

    Args:
        fn: a pure step, ``fn(state, ...) -> (state, ...)``.
        donate: donate the state (the caller must not read the state it passed
            in afterwards; keep :func:`jaxnet.state.copy_state` of it instead).
        compiler: ``jax.jit`` (default) or ``jax.pmap``; both take ``donate_argnums``.
        **compile_kwargs: passed on, e.g. ``in_shardings``/``out_shardings``
            for ``jax.jit`` or ``axis_name``/``devices`` for ``jax.pmap``.

    Returns:
        The compiled function.

    >>> double = compile_step(lambda state, x: (state * 2, x))
    >>> state, _ = double(jnp.ones(3), 0)
    >>> state.tolist()
    [2.0, 2.0, 2.0]
    """
    return compiler(fn, donate_argnums=(0,) if donate else (), **compile_kwargs)


def loss_for_output(output: str) -> LossFn:
    """The PyTorch loss for a model's kind of output.

    Args:
        output: ``"logits"`` (``nn.CrossEntropyLoss``), ``"log_probs"``
            (``nn.NLLLoss``, for models ending in ``log_softmax``), ``"binary"``
            (one logit per example, ``nn.BCEWithLogitsLoss`` on 0/1 labels),
            ``"regression"`` (``nn.MSELoss``), ``"l1"`` (``nn.L1Loss``) or
            ``"huber"`` (``nn.HuberLoss(delta=1)``).

    Returns:
        ``loss_fn(outputs, labels) -> ()`` mean loss over the batch; the
        regression and binary losses reshape the labels to the outputs' shape
        (``(B,)`` targets for ``(B, 1)`` outputs).

    Raises:
        ConfigError: for any other ``output``.
    """

    def reshaped(loss: Callable[[jax.Array, jax.Array], jax.Array]) -> LossFn:
        return lambda pred, target: loss(pred, target.reshape(pred.shape).astype(pred.dtype))

    kinds: dict[str, LossFn] = {
        "logits": losses.cross_entropy,
        "log_probs": losses.nll_loss,
        "binary": reshaped(losses.binary_cross_entropy_with_logits),
        "regression": reshaped(losses.mse_loss),
        "l1": reshaped(losses.l1_loss),
        "huber": reshaped(losses.huber_loss),
    }
    if output not in kinds:
        raise ConfigError(f"unknown model output kind {output!r}; expected one of {OUTPUT_KINDS}")
    return kinds[output]


def accuracy_for_output(output: str) -> MetricFn | None:
    """The batch accuracy of a classifier's outputs (``None`` for regression kinds).

    ``argmax`` of the class axis for ``"logits"``/``"log_probs"``; ``logit > 0``
    for ``"binary"``.
    """
    if output == "binary":
        return lambda out, y: jnp.mean(((out.reshape(y.shape) > 0).astype(jnp.int32) == y).astype(jnp.float32))
    if output in CLASSIFIER_KINDS:
        return lambda out, y: jnp.mean((jnp.argmax(out, -1) == y).astype(jnp.float32))
    return None


def takes_batch(fn: Callable[..., Any]) -> bool:
    """Whether a loss or metric function takes the batch as its third argument."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (
        len(positional) >= 3
        or any(p.kind is p.VAR_POSITIONAL for p in params)
        or any(p.name == "batch" for p in params)
    )


def apply_loss(fn: Callable[..., jax.Array], outputs: jax.Array, labels: jax.Array, batch: Batch | None) -> jax.Array:
    """Calls a loss or metric as ``fn(outputs, labels)``, or with the batch when it takes one."""
    if takes_batch(fn):
        return fn(outputs, labels, batch)
    return fn(outputs, labels)


def _step_metrics(metrics: Mapping[str, MetricFn] | None, classification: bool) -> Mapping[str, MetricFn]:
    if metrics is not None:
        return metrics
    if not classification:
        return {}
    accuracy = accuracy_for_output("logits")
    assert accuracy is not None  # "logits" is a classifier kind
    return {"accuracy": accuracy}


def accepts_rngs(model: nnx.Module) -> bool:
    """Whether ``model(x, rngs=...)`` is a valid call.

    jaxnet's own models take their dropout key per call (``rngs=``); a model
    written as the Flax docs write it, ``__call__(self, x)`` with
    ``nnx.Dropout(rate, rngs=rngs)`` holding its own stream, does not: its
    random state lives in the model's variables (``nnx.RngKey`` and
    ``nnx.RngCount``), so it travels in ``TrainState.model_state``.
    """
    try:
        params = inspect.signature(type(model).__call__).parameters.values()
    except (TypeError, ValueError):  # a builtin or C-level __call__: pass nothing extra
        return False
    return any(p.name == "rngs" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_model(model: nnx.Module, inputs: jax.Array, dropout_key: jax.Array) -> jax.Array:
    """Calls a model in training mode, giving it ``dropout_key`` if it takes ``rngs``."""
    if accepts_rngs(model):
        return model(inputs, rngs=nnx.Rngs(dropout=dropout_key))
    return model(inputs)


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
    metrics: Mapping[str, MetricFn] | None = None,
) -> StepFn:
    """The un-jitted train step; :func:`make_train_step` and :func:`make_scan_epoch` compile it.

    Args:
        graphdef: the model's graph definition (from ``create_train_state``).
        tx: the optax transformation that updates the parameters.
        loss_fn: ``loss_fn(outputs, labels) -> ()``, or ``loss_fn(outputs,
            labels, batch)`` (see :func:`takes_batch`).
        transform: optional on-device preprocessing ``transform(key, images, train)``.
        classification: whether to report ``accuracy`` besides ``loss``
            (used when ``metrics`` is None).
        metrics: batch metrics computed inside the step, ``name -> fn(outputs,
            labels[, batch]) -> ()``; replaces the default ``accuracy``.

    Returns:
        ``train_step(state, batch) -> (state, metrics)``, pure.
    """

    batch_metrics = _step_metrics(metrics, classification)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)  # a fresh key per step, from the state alone
        aug_key, dropout_key = jax.random.split(key)
        inputs = _prepare(transform, aug_key, batch["image"], True)
        labels = batch["label"]

        def compute_loss(params: nnx.State) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
            # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            model.train()  # model.train() in PyTorch: dropout on, BatchNorm uses batch statistics
            outputs = call_model(model, inputs, dropout_key)
            # The updated running statistics.
            _, _, model_state = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax types nnx.split's result as a variadic tuple
            return apply_loss(loss_fn, outputs, labels, batch), (outputs, model_state)

        (loss, (outputs, model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        values = {"loss": loss}
        for name, fn in batch_metrics.items():
            values[name] = jnp.asarray(apply_loss(fn, outputs, labels, batch), jnp.float32)
        return new_state, values

    return train_step


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    donate: bool = True,
    transform: Transform | None = None,
    classification: bool = True,
    metrics: Mapping[str, MetricFn] | None = None,
) -> StepFn:
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
        donate: donate the input state's buffers (the caller must not reuse
            the state it passed in, as with any in-place update). To keep a
            state (e.g. the best so far) while stepping on, keep
            :func:`jaxnet.state.copy_state` of it.
        transform: optional on-device preprocessing ``transform(key, images, train)``
            (normalization, augmentation).
        classification: whether to report ``accuracy`` besides ``loss``.
        metrics: batch metrics computed in the step (see :func:`train_step_fn`).

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
    step = train_step_fn(graphdef, tx, loss_fn, transform=transform, classification=classification, metrics=metrics)
    return compile_step(step, donate=donate)


def scan_epoch_fn(step: StepFn) -> EpochFn:
    """A whole epoch of ``step`` as one ``lax.scan`` over device-resident data (un-jitted).

    Args:
        step: a pure train step (:data:`StepFn`), e.g. :func:`train_step_fn`'s
            or :func:`jaxnet.precision.loss_scaled_train_step_fn`'s.

    Returns:
        ``train_epoch(state, images, labels, batch_indices) -> (state, metrics)``
        (see :func:`make_scan_epoch`).
    """

    def train_epoch(
        state: TrainState, images: jax.Array, labels: jax.Array, batch_indices: ArrayLike
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        def body(state: TrainState, idx: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:  # idx: (B,)
            batch = {"image": jnp.take(images, idx, axis=0), "label": jnp.take(labels, idx, axis=0)}
            return step(state, batch)

        return jax.lax.scan(body, state, jnp.asarray(batch_indices))

    return train_epoch


def make_scan_epoch(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    donate: bool = True,
    **step_options: Any,
) -> EpochFn:
    """Builds a whole training epoch as one compiled ``lax.scan`` over device-resident data.

    For small data sets that fit on the device: the host sends one array of
    batch indices per epoch and the device runs every step without returning
    to Python. Each step is exactly :func:`train_step_fn`'s, so a scanned epoch
    gives the same parameters as the same batches fed to :func:`make_train_step`.

    Args:
        graphdef, tx, loss_fn, donate: as for :func:`make_train_step`.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`train_step_fn`.

    Returns:
        ``train_epoch(state, images, labels, batch_indices) -> (state, metrics)``
        where ``images`` is ``(N, ...)`` and ``labels`` ``(N,)`` on the device,
        ``batch_indices`` is ``(S, B)`` int32 (one row per step, e.g. from
        :func:`jaxnet.data.epoch_permutation`), and ``metrics`` holds ``(S,)``
        per-step values.
    """
    return compile_step(scan_epoch_fn(train_step_fn(graphdef, tx, loss_fn, **step_options)), donate=donate)


def make_predict_fn(
    graphdef: nnx.GraphDef, *, transform: Transform | None = None
) -> Callable[[TrainState, ArrayLike], jax.Array]:
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
    metrics: Mapping[str, MetricFn] | None = None,
) -> EvalFn:
    """Builds the jit-compiled ``eval_step(state, batch) -> {"outputs", "loss", "metrics"}``.

    Evaluation batches keep one shape (a final partial batch is padded, and a
    ``"mask"`` marks the real examples, see :func:`jaxnet.training.evaluation.evaluate`), so
    evaluation compiles once.

    Args:
        graphdef: the model's graph definition.
        loss_fn: the training loss; it is reported per example.
        transform: on-device preprocessing, applied with ``train=False``.
        metrics: ``name -> fn(outputs, labels[, batch])``, each also reported
            per example (so that padded rows can be masked out).

    Returns:
        ``eval_step(state, batch)`` returning the model's ``outputs`` ``(B, K)``,
        the per-example ``loss`` ``(B,)`` and ``metrics`` ``{name: (B,)}``.
    """
    return jax.jit(eval_step_fn(graphdef, loss_fn, transform=transform, metrics=metrics))


def eval_step_fn(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    transform: Transform | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
) -> EvalFn:
    """The un-jitted evaluation step that :func:`make_eval_step` (and the sharded one) compile."""
    predict = make_predict_fn(graphdef, transform=transform)
    fns = {"loss": loss_fn, **(metrics or {})}

    def per_example(fn: Callable[..., jax.Array], outputs: jax.Array, batch: Batch) -> jax.Array:
        def one(o: jax.Array, example: Batch) -> jax.Array:
            example = jax.tree.map(lambda a: a[None], example)
            return jnp.asarray(apply_loss(fn, o[None], example["label"], example), jnp.float32)

        return jax.vmap(one)(outputs, dict(batch))

    def eval_step(state: TrainState, batch: Batch) -> dict[str, Any]:
        outputs = predict(state, batch["image"])
        values = {name: per_example(fn, outputs, batch) for name, fn in fns.items()}
        return {"outputs": outputs, "loss": values.pop("loss"), "metrics": values}

    return eval_step
