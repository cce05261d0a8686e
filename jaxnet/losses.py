"""Loss functions with PyTorch's numbers: same formulas, same reductions.

Each function is a pure ``jnp`` function, safe under ``jax.jit`` and
``jax.grad``, and matches its ``torch.nn.functional`` counterpart to float32
rounding (the tests compare values and gradients against torch).

One deliberate difference from PyTorch: the class axis is the **last** axis
(JAX's channels-last convention), so logits are ``(..., C)`` and integer
labels are ``(...)``. For a PyTorch-layout ``(N, C, d1, ...)`` tensor, move
the class axis first: ``jnp.moveaxis(logits, 1, -1)``.

Reductions are PyTorch's strings: ``"mean"`` (weighted mean where torch
weights it), ``"sum"`` and ``"none"`` (per-element losses, unreduced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.errors import ConfigError, JaxnetError

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ConfigError(f"unknown reduction {reduction!r}; use one of {', '.join(map(repr, allowed))}")


def _reduce(loss: jax.Array, reduction: str) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def _is_concrete(x: jax.Array) -> bool:
    """True when ``x`` holds values (not a tracer), so it can be checked on the host."""
    return not isinstance(x, jax.core.Tracer)


def _check_class_inputs(
    scores: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    ignore_index: int | None,
    scores_name: str,
) -> None:
    """Validates ``(..., C)`` float scores against ``(...)`` integer labels."""
    if scores.ndim < 1:
        raise JaxnetError(f"{scores_name} must have a class axis (..., C); got a scalar")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"{scores_name} must be floating point; got dtype {scores.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices; got dtype {labels.dtype}. "
            "For one-hot or soft targets use optax.softmax_cross_entropy."
        )
    if labels.shape != scores.shape[:-1]:
        raise JaxnetError(
            f"labels shape {labels.shape} does not match {scores_name} shape "
            f"{scores.shape} without its class axis; expected {scores.shape[:-1]}. "
            "jaxnet puts the class axis last: for PyTorch's (N, C, ...) layout "
            "use jnp.moveaxis(x, 1, -1)."
        )
    num_classes = scores.shape[-1]
    if weight is not None and jnp.shape(weight) != (num_classes,):
        raise JaxnetError(f"weight must have shape ({num_classes},), one entry per class; got {jnp.shape(weight)}")
    if _is_concrete(labels) and labels.size:
        values = np.asarray(labels)
        if ignore_index is not None:
            values = values[values != ignore_index]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise JaxnetError(
                f"labels must lie in [0, {num_classes}); found values from "
                f"{values.min()} to {values.max()}. Pass ignore_index= for padding labels."
            )


def _picked_and_weights(
    log_probs: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    ignore_index: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``-log_probs[label]`` and each element's weight (0 where ignored)."""
    keep = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    safe_labels = jnp.where(keep, labels, 0)  # ignored labels may be out of range
    picked = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    if weight is None:
        w = keep.astype(log_probs.dtype)
    else:
        w = jnp.where(keep, jnp.asarray(weight, log_probs.dtype)[safe_labels], 0).astype(log_probs.dtype)
    return picked, w


def nll_loss(
    log_probs: jax.Array,
    labels: jax.Array,
    *,
    reduction: str = "mean",
    weight: jax.Array | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    """Negative log-likelihood of integer labels under given log-probabilities.

    Counterpart of ``torch.nn.functional.nll_loss`` (``nn.NLLLoss``), usually
    after ``log_softmax``. Per element the loss is ``-weight[y] * log_probs[y]``;
    ``"mean"`` divides the sum by the sum of the weights of the non-ignored
    elements (not by their count), exactly as torch does.

    Args:
        log_probs: ``(..., C)`` floating log-probabilities.
        labels: ``(...)`` integer class indices in ``[0, C)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weight: optional ``(C,)`` per-class weights.
        ignore_index: a label value whose elements contribute nothing (loss 0,
            weight 0). ``None`` (the default) ignores nothing; torch's default
            is ``-100``.

    Returns:
        A scalar, or the ``(...)`` per-element losses for ``"none"``. If every
        element is ignored, ``"mean"`` is NaN, as in torch.

    Raises:
        ConfigError: unknown ``reduction``.
        TypeError: non-integer labels or non-float log-probabilities.
        JaxnetError: mismatched shapes, or (outside jit) labels out of range.

    >>> nll_loss(jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([1]))
    Array(0.6931472, dtype=float32)
    """
    _check_reduction(reduction)
    log_probs, labels = jnp.asarray(log_probs), jnp.asarray(labels)
    _check_class_inputs(log_probs, labels, weight, ignore_index, "log_probs")
    picked, w = _picked_and_weights(log_probs, labels, weight, ignore_index)
    loss = picked * w
    if reduction == "mean":
        return jnp.sum(loss) / jnp.sum(w)
    return _reduce(loss, reduction)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: jax.Array | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    """Softmax cross-entropy of integer labels, PyTorch's definition.

    Counterpart of ``torch.nn.functional.cross_entropy`` (``nn.CrossEntropyLoss``)
    with class-index targets: ``nll_loss(log_softmax(logits), labels)``. With
    ``label_smoothing=eps`` torch's formula is used:
    ``(1 - eps) * nll + eps / C * smooth``, where ``smooth`` is
    ``-sum_c weight[c] * log_softmax(logits)[c]`` per element, reduced the
    same way as ``nll`` (its ``"mean"`` divides by the summed label weights).

    Args:
        logits: ``(..., C)`` unnormalized scores.
        labels: ``(...)`` integer class indices in ``[0, C)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``.
        weight: optional ``(C,)`` per-class weights.
        ignore_index: a label value whose elements contribute nothing;
            ``None`` ignores nothing (torch's default is ``-100``).

    Returns:
        A scalar, or the ``(...)`` per-element losses for ``"none"``.

    Raises:
        ConfigError: unknown ``reduction`` or ``label_smoothing`` outside [0, 1].
        TypeError: non-integer labels or non-float logits.
        JaxnetError: mismatched shapes, or (outside jit) labels out of range.

    >>> cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([0]))
    Array(0.6931472, dtype=float32)
    """
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_inputs(logits, labels, weight, ignore_index, "logits")
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked, w = _picked_and_weights(log_probs, labels, weight, ignore_index)
    loss = picked * w
    if label_smoothing > 0.0:
        class_w = 1.0 if weight is None else jnp.asarray(weight, log_probs.dtype)
        keep = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
        smooth = jnp.where(keep, -jnp.sum(log_probs * class_w, axis=-1), 0).astype(logits.dtype)
        num_classes = logits.shape[-1]
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth
    if reduction == "mean":
        return jnp.sum(loss) / jnp.sum(w)
    return _reduce(loss, reduction)


def mse_loss(pred: jax.Array, target: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Mean squared error, ``(pred - target) ** 2`` reduced.

    Counterpart of ``torch.nn.functional.mse_loss`` (``nn.MSELoss``). Unlike
    torch, which broadcasts mismatched shapes with only a warning (a classic
    ``(N, 1)`` vs ``(N,)`` bug), mismatched shapes raise here.

    Args:
        pred: predictions, any shape.
        target: targets, the same shape as ``pred``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or the element-wise squared errors for ``"none"``.

    Raises:
        ConfigError: unknown ``reduction``.
        JaxnetError: ``pred`` and ``target`` shapes differ.

    >>> mse_loss(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0]))
    Array(2., dtype=float32)
    """
    _check_reduction(reduction)
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise JaxnetError(
            f"pred shape {pred.shape} differs from target shape {target.shape}; "
            f"reshape one of them (e.g. target.reshape({pred.shape}))"
        )
    return _reduce(jnp.square(pred - target.astype(pred.dtype)), reduction)


def _check_same_shape(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape:
        raise JaxnetError(
            f"pred shape {pred.shape} differs from target shape {target.shape}; "
            f"reshape one of them (e.g. target.reshape({pred.shape}))"
        )


def l1_loss(pred: jax.Array, target: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Mean absolute error, ``|pred - target|`` reduced.

    Counterpart of ``torch.nn.functional.l1_loss`` (``nn.L1Loss``); shapes
    must match, as for :func:`mse_loss`.

    Raises:
        ConfigError: unknown ``reduction``.
        JaxnetError: ``pred`` and ``target`` shapes differ.

    >>> l1_loss(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0]))
    Array(1., dtype=float32)
    """
    _check_reduction(reduction)
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _check_same_shape(pred, target)
    return _reduce(jnp.abs(pred - target.astype(pred.dtype)), reduction)


def huber_loss(pred: jax.Array, target: jax.Array, *, delta: float = 1.0, reduction: str = "mean") -> jax.Array:
    """Huber loss: squared error near 0, absolute error beyond ``delta``.

    Counterpart of ``torch.nn.functional.huber_loss`` (``nn.HuberLoss``): per
    element ``0.5 * d**2`` if ``|d| < delta`` else ``delta * (|d| - 0.5 * delta)``,
    with ``d = pred - target``. (``nn.SmoothL1Loss`` with ``beta`` is this
    divided by ``beta``.)

    Raises:
        ConfigError: unknown ``reduction`` or ``delta <= 0``.
        JaxnetError: ``pred`` and ``target`` shapes differ.

    >>> huber_loss(jnp.array([0.5, 3.0]), jnp.array([0.0, 0.0]))
    Array(1.3125, dtype=float32)
    """
    _check_reduction(reduction)
    if not delta > 0:
        raise ConfigError(f"huber_loss delta must be > 0; got {delta}")
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _check_same_shape(pred, target)
    d = jnp.abs(pred - target.astype(pred.dtype))
    return _reduce(jnp.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta)), reduction)


def kl_div(
    input: jax.Array,  # noqa: A002 -- torch's argument name
    target: jax.Array,
    *,
    reduction: str = "mean",
    log_target: bool = False,
) -> jax.Array:
    """Kullback-Leibler divergence ``KL(target || exp(input))``, torch's convention.

    Counterpart of ``torch.nn.functional.kl_div`` (``nn.KLDivLoss``):
    ``input`` holds log-probabilities and ``target`` probabilities (or
    log-probabilities with ``log_target=True``). Per element the loss is
    ``target * (log(target) - input)``, with ``0 * log 0 = 0``.

    Note torch's reductions: ``"mean"`` averages over *all elements* (not the
    true KL per example); ``"batchmean"`` divides the sum by the batch size
    ``input.shape[0]`` and is the mathematically correct KL per example.

    Args:
        input: log-probabilities, shape ``(N, ...)``.
        target: probabilities (or log-probabilities), the same shape.
        reduction: ``"mean"``, ``"batchmean"``, ``"sum"`` or ``"none"``.
        log_target: whether ``target`` is given as log-probabilities.

    Returns:
        A scalar, or the element-wise terms for ``"none"``.

    Raises:
        ConfigError: unknown ``reduction``.
        JaxnetError: shapes differ.

    >>> kl_div(jnp.log(jnp.array([[0.5, 0.5]])), jnp.array([[0.5, 0.5]]))
    Array(0., dtype=float32)
    """
    _check_reduction(reduction, REDUCTIONS + ("batchmean",))
    input, target = jnp.asarray(input), jnp.asarray(target).astype(jnp.asarray(input).dtype)
    if input.shape != target.shape:
        raise JaxnetError(f"input shape {input.shape} differs from target shape {target.shape}")
    if log_target:
        loss = jnp.exp(target) * (target - input)
    else:
        loss = jax.scipy.special.xlogy(target, target) - target * input
    if reduction == "batchmean":
        batch = input.shape[0] if input.ndim else 1
        return jnp.sum(loss) / batch
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    reduction: str = "mean",
    pos_weight: jax.Array | None = None,
    weight: jax.Array | None = None,
) -> jax.Array:
    """Sigmoid binary cross-entropy on logits, numerically stable.

    Counterpart of ``torch.nn.functional.binary_cross_entropy_with_logits``
    (``nn.BCEWithLogitsLoss``). Per element, with ``x`` the logit and ``t``
    the target in [0, 1]:
    ``weight * (pos_weight * t * softplus(-x) + (1 - t) * softplus(x))``,
    computed as ``(1 - t) * x + (1 + (pos_weight - 1) * t) * softplus(-x)``,
    which never overflows.

    Args:
        logits: raw scores, any shape.
        targets: targets in [0, 1], the same shape (float or integer).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        pos_weight: optional weight of positive examples, broadcast against
            ``logits`` (typically ``(C,)`` for ``(N, C)`` multi-label logits).
        weight: optional element weights, broadcast against ``logits``.

    Returns:
        A scalar, or the element-wise losses for ``"none"``.

    Raises:
        ConfigError: unknown ``reduction``.
        JaxnetError: ``logits`` and ``targets`` shapes differ.

    >>> binary_cross_entropy_with_logits(jnp.array([0.0]), jnp.array([1.0]))
    Array(0.6931472, dtype=float32)
    """
    _check_reduction(reduction)
    logits = jnp.asarray(logits)
    dtype = logits.dtype
    targets = jnp.asarray(targets).astype(dtype)
    if logits.shape != targets.shape:
        raise JaxnetError(
            f"logits shape {logits.shape} differs from targets shape {targets.shape}; "
            "BCE is element-wise, so they must match"
        )
    softplus_neg = jax.nn.softplus(-logits)  # -log(sigmoid(x)), stable
    if pos_weight is None:
        loss = (1.0 - targets) * logits + softplus_neg
    else:
        log_weight = 1.0 + (jnp.asarray(pos_weight, dtype) - 1.0) * targets
        loss = (1.0 - targets) * logits + log_weight * softplus_neg
    if weight is not None:
        loss = loss * jnp.asarray(weight, dtype)
    return _reduce(loss, reduction)
