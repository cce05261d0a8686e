"""Optimizers and learning-rate schedules by name, with PyTorch's defaults and update rules.

``create_optimizer("adam")`` is the counterpart of
``torch.optim.Adam(model.parameters())``: same default hyper-parameters, same
update numbers (the tests run 10 steps of each against ``torch.optim``). It
returns a plain ``optax.GradientTransformation``, built from optax pieces
where their formula is torch's, and from the small transforms below where it
is not:

* SGD with ``dampening``: torch's buffer starts as the first gradient itself
  (undampened); ``optax.trace`` only matches when ``dampening == 0``.
* Adam: torch keeps the max of the *raw* second moment for ``amsgrad`` and
  bias-corrects it afterwards (``optax.scale_by_amsgrad`` takes the max of
  the corrected, or never corrected, moment), and computes ``1 - beta**t``
  in float64, which float32 ``optax.scale_by_adam`` misses by up to 1e-5.
* Adagrad: torch adds ``eps`` outside the square root, starts the sum at
  ``initial_accumulator_value`` (0) and has ``lr_decay``; ``optax.adagrad``
  puts ``eps`` inside the root and starts at 0.1.

``weight_decay`` is torch's: L2 added to the gradient before everything else
(SGD, Adam, RMSprop, Adagrad, Adadelta), and decoupled ``p -= lr * wd * p``
for AdamW. Gradient clipping (``clip_norm``/``clip_value``) runs first, as
``clip_grad_norm_``/``clip_grad_value_`` run before ``optimizer.step()``.

The learning-rate schedules (``torch.optim.lr_scheduler``'s counterparts)
live in :mod:`jaxnet.schedules` and are importable from here too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError
from jaxnet.schedules import SCHEDULES, WARMUP_FRACTION, create_schedule

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "WARMUP_FRACTION",
    "DampenedTraceState",
    "TorchAdagradState",
    "TorchAmsgradState",
    "create_optimizer",
    "create_schedule",
    "dampened_trace",
    "describe",
    "learning_rate_of",
    "scale_by_torch_adagrad",
    "scale_by_torch_adam",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")

# torch.optim's defaults; None means torch has none (SGD's lr is required).
_DEFAULT_LR = {"sgd": None, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-2, "adagrad": 1e-2, "adadelta": 1.0}
_DEFAULT_EPS = {"sgd": None, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10, "adadelta": 1e-6}
_DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2}  # 0 for the others
# Options that only some optimizers read, with the value that means "unset".
_OPTION_DEFAULTS = {
    "momentum": 0.0,
    "nesterov": False,
    "dampening": 0.0,
    "betas": (0.9, 0.999),
    "alpha": 0.99,
    "rho": 0.9,
    "centered": False,
    "initial_accumulator_value": 0.0,
    "lr_decay": 0.0,
    "amsgrad": False,
}
_OPTIONS_OF = {
    "sgd": {"momentum", "nesterov", "dampening"},
    "adam": {"betas", "amsgrad"},
    "adamw": {"betas", "amsgrad"},
    "rmsprop": {"momentum", "alpha", "centered"},
    "adagrad": {"initial_accumulator_value", "lr_decay"},
    "adadelta": {"rho"},
}


class DampenedTraceState(NamedTuple):
    """State of :func:`dampened_trace`: steps taken and the momentum buffer."""

    count: jax.Array  # type: ignore[assignment]  # () int32; the field shadows tuple.count, as in optax's states
    trace: optax.Updates


def dampened_trace(momentum: float, dampening: float) -> optax.GradientTransformation:
    """SGD momentum with dampening, torch's rule.

    ``buf = g`` on the first step, then ``buf = momentum * buf + (1 - dampening) * g``;
    the update is ``buf``. Counterpart of ``torch.optim.SGD(momentum=, dampening=)``.

    Args:
        momentum: the buffer's decay factor.
        dampening: fraction of each new gradient left out of the buffer.

    Returns:
        An ``optax.GradientTransformation``.
    """

    def init_fn(params: optax.Params) -> DampenedTraceState:
        return DampenedTraceState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        trace = jax.tree.map(
            lambda g, t: jnp.where(first, g, momentum * t + (1.0 - dampening) * g), updates, state.trace
        )
        return trace, DampenedTraceState(optax.safe_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)


def _one_minus_power(beta: float, count: jax.Array) -> jax.Array:
    """``1 - beta ** count`` in float32 without cancellation.

    torch computes Adam's bias corrections as Python (float64) scalars. In
    float32, ``1 - 0.999 ** 1`` is off by 1.3e-5 relative (optax's
    ``bias_correction`` has this error); ``-expm1(count * log(beta))`` is not.
    """
    if beta == 0.0:
        return jnp.ones([], jnp.float32)
    return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(math.log(beta)))


class TorchAmsgradState(NamedTuple):
    """State of :func:`scale_by_torch_adam` with ``amsgrad``: moments and max of ``nu``."""

    count: jax.Array  # type: ignore[assignment]  # () int32; the field shadows tuple.count, as in optax's states
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_torch_adam(b1: float, b2: float, eps: float, *, amsgrad: bool = False) -> optax.GradientTransformation:
    """Adam's scaling exactly as ``torch.optim.Adam`` computes it.

    With ``t`` the step and ``mu``/``nu`` the first/second moments, the update
    is ``(mu / (1 - b1**t)) / (sqrt(nu) / sqrt(1 - b2**t) + eps)``. With
    ``amsgrad``, ``nu`` in the denominator is ``nu_max = max(nu_max, nu)`` of
    the *raw* moment, corrected afterwards (``optax.scale_by_amsgrad`` takes
    the max of the corrected, or never corrected, moment). Plain Adam keeps
    optax's ``ScaleByAdamState``; it differs from ``optax.scale_by_adam``
    only in computing the bias corrections without float32 cancellation.

    Args:
        b1: decay of the first moment (torch ``betas[0]``).
        b2: decay of the second moment (torch ``betas[1]``).
        eps: added to the denominator, outside the square root.
        amsgrad: use the running maximum of the second moment.

    Returns:
        An ``optax.GradientTransformation``.
    """

    def init_fn(params: optax.Params) -> optax.ScaleByAdamState | TorchAmsgradState:
        # One fresh buffer per moment: aliased buffers cannot be donated to a jit step.
        def zeros():
            return optax.tree.zeros_like(params)

        if amsgrad:
            return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        correction1 = _one_minus_power(b1, count)
        correction2_sqrt = jnp.sqrt(_one_minus_power(b2, count))
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else nu
        new_updates = jax.tree.map(
            lambda m, v: (m / correction1.astype(m.dtype)) / (jnp.sqrt(v) / correction2_sqrt.astype(v.dtype) + eps),
            mu,
            nu_max,
        )
        if amsgrad:
            return new_updates, TorchAmsgradState(count, mu, nu, nu_max)
        return new_updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class TorchAdagradState(NamedTuple):
    """State of :func:`scale_by_torch_adagrad`: steps taken and the sum of squares."""

    count: jax.Array  # type: ignore[assignment]  # () int32; the field shadows tuple.count, as in optax's states
    sum_of_squares: optax.Updates


def scale_by_torch_adagrad(
    initial_accumulator_value: float, eps: float, lr_decay: float
) -> optax.GradientTransformation:
    """Adagrad's scaling exactly as ``torch.optim.Adagrad``.

    ``sum += g**2`` (starting from ``initial_accumulator_value``), then the
    update is ``g / (sqrt(sum) + eps) / (1 + (t - 1) * lr_decay)`` at step
    ``t``; the learning rate is applied afterwards.

    Args:
        initial_accumulator_value: starting value of the sum of squares.
        eps: added outside the square root.
        lr_decay: torch's per-step learning-rate decay.

    Returns:
        An ``optax.GradientTransformation``.
    """

    def init_fn(params: optax.Params) -> TorchAdagradState:
        return TorchAdagradState(jnp.zeros([], jnp.int32), optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda g, s: s + g * g, updates, state.sum_of_squares)
        decay = 1.0 + state.count.astype(jnp.float32) * lr_decay
        new_updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps) / decay.astype(g.dtype), updates, sums)
        return new_updates, TorchAdagradState(optax.safe_increment(state.count), sums)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_options(name: str, given: dict[str, Any]) -> None:
    """Rejects options the chosen optimizer would silently ignore."""
    for option, value in given.items():
        if value != _OPTION_DEFAULTS[option] and option not in _OPTIONS_OF[name]:
            users = [n for n in OPTIMIZERS if option in _OPTIONS_OF[n]]
            raise ConfigError(
                f"{option}={value!r} does not apply to {name!r}; it is an option of "
                f"{', '.join(users)}. Remove it or choose one of those optimizers."
            )


def _check_values(
    name: str,
    lr: Any,
    momentum: float,
    nesterov: bool,
    dampening: float,
    weight_decay: float,
    betas: tuple[float, ...],  # checked here to be two values
    eps: float,
    alpha: float,
    rho: float,
    initial_accumulator_value: float,
    lr_decay: float,
    clip_norm: float | None,
    clip_value: float | None,
) -> None:
    """torch.optim's own argument checks, with the fix in each message."""
    if lr is None:
        raise ConfigError(
            f"{name!r} has no default learning rate in torch.optim; pass one, e.g. create_optimizer({name!r}, 0.01)"
        )
    if not callable(lr) and not lr >= 0.0:
        raise ConfigError(f"learning_rate must be >= 0 (or an optax schedule); got {lr}")
    nonnegative = {
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": weight_decay,
        "eps": eps,
        "alpha": alpha,
        "initial_accumulator_value": initial_accumulator_value,
        "lr_decay": lr_decay,
    }
    for option, value in nonnegative.items():
        if not value >= 0.0:
            raise ConfigError(f"{option} must be >= 0; got {value}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ConfigError(
            "nesterov=True needs momentum > 0 and dampening=0 (as in torch.optim.SGD); "
            f"got momentum={momentum}, dampening={dampening}. E.g. momentum=0.9"
        )
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas must be two values in [0, 1), like (0.9, 0.999); got {betas}")
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"rho must be in [0, 1], like 0.9; got {rho}")
    if clip_norm is not None and clip_value is not None:
        raise ConfigError("pass clip_norm or clip_value, not both")
    for option, clip in (("clip_norm", clip_norm), ("clip_value", clip_value)):
        if clip is not None and not clip > 0.0:
            raise ConfigError(f"{option} must be > 0 (or None for no clipping); got {clip}")


def create_optimizer(
    name: str,
    learning_rate: float | optax.Schedule | None = None,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    alpha: float = 0.99,
    rho: float = 0.9,
    centered: bool = False,
    initial_accumulator_value: float = 0.0,
    lr_decay: float = 0.0,
    amsgrad: bool = False,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> optax.GradientTransformation:
    """Builds a ``torch.optim`` optimizer's exact update rule as an optax transform.

    Counterpart of ``torch.optim.SGD``, ``Adam``, ``AdamW``, ``RMSprop``,
    ``Adagrad`` and ``Adadelta``, with the same argument names and defaults
    (``None`` means torch's default). Options that the chosen optimizer does
    not read must stay at their defaults.

    Args:
        name: one of :data:`OPTIMIZERS`.
        learning_rate: a float, or an optax schedule (see :func:`create_schedule`,
            the counterpart of ``torch.optim.lr_scheduler``); ``None`` is torch's
            default (1e-3 Adam/AdamW, 1e-2 RMSprop/Adagrad, 1.0 Adadelta; SGD has none).
        momentum: SGD and RMSprop momentum.
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``, ``dampening == 0``).
        dampening: SGD dampening of the momentum buffer.
        weight_decay: L2 coefficient, added to the gradient (AdamW: decoupled).
            ``None`` is torch's default: 1e-2 for AdamW, 0 otherwise.
        betas: Adam/AdamW moment decays.
        eps: denominator term; ``None`` is torch's default per optimizer.
        alpha: RMSprop's squared-gradient decay.
        rho: Adadelta's decay.
        centered: RMSprop divides by the centered (variance) estimate.
        initial_accumulator_value: Adagrad's starting sum of squares.
        lr_decay: Adagrad's learning-rate decay per step.
        amsgrad: Adam/AdamW AMSGrad variant.
        clip_norm: clip the global gradient norm first (``clip_grad_norm_``).
            optax divides by the norm itself where torch divides by
            ``norm + 1e-6``, a relative difference of ``1e-6 / norm``.
        clip_value: clip each gradient element to ``[-v, v]`` first
            (``clip_grad_value_``).

    Returns:
        An ``optax.GradientTransformation`` whose updates are added to the
        params with ``optax.apply_updates``.

    Raises:
        ConfigError: unknown name (the message lists :data:`OPTIMIZERS`),
            invalid values, or options that do not apply to ``name``.

    >>> tx = create_optimizer("sgd", 0.1, momentum=0.9)
    >>> opt_state = tx.init({"w": jnp.ones(2)})
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    options = dict(
        momentum=momentum,
        nesterov=nesterov,
        dampening=dampening,
        betas=tuple(betas),
        alpha=alpha,
        rho=rho,
        centered=centered,
        lr_decay=lr_decay,
        amsgrad=amsgrad,
        initial_accumulator_value=initial_accumulator_value,
    )
    _check_options(name, options)
    if name == "sgd" and eps is not None:
        raise ConfigError("eps does not apply to 'sgd'; remove it")
    lr = _DEFAULT_LR[name] if learning_rate is None else learning_rate
    if eps is None:
        eps = _DEFAULT_EPS[name] or 0.0
    weight_decay = _DEFAULT_WEIGHT_DECAY.get(name, 0.0) if weight_decay is None else weight_decay
    _check_values(
        name,
        lr,
        momentum,
        nesterov,
        dampening,
        weight_decay,
        tuple(betas),
        eps,
        alpha,
        rho,
        initial_accumulator_value,
        lr_decay,
        clip_norm,
        clip_value,
    )
    tx = optax.chain(*_chain(name, lr, weight_decay, eps, clip_norm, clip_value, options))
    _BUILT[id(tx)] = (tx, lr, _settings(name, lr, weight_decay, eps, clip_norm, clip_value, options))
    return tx


def _chain(
    name: str,
    lr: Any,
    weight_decay: float,
    eps: float,
    clip_norm: float | None,
    clip_value: float | None,
    options: dict[str, Any],
) -> list[optax.GradientTransformation]:
    """The optimizer's transforms in torch's order: clipping, L2 decay, the update rule, decoupled decay, the lr."""
    chain: list[optax.GradientTransformation] = []
    if clip_norm is not None:
        chain.append(optax.clip_by_global_norm(clip_norm))
    if clip_value is not None:
        chain.append(optax.clip(clip_value))
    if weight_decay and name != "adamw":
        chain.append(optax.add_decayed_weights(weight_decay))  # torch: grad += wd * p
    chain.extend(_core(name, eps=eps, **options))
    if weight_decay and name == "adamw":
        # -lr * (adam + wd * p) == torch's p *= 1 - lr * wd, then p -= lr * adam.
        chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.scale_by_learning_rate(lr))
    return chain


def _settings(
    name: str,
    lr: Any,
    weight_decay: float,
    eps: float,
    clip_norm: float | None,
    clip_value: float | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """What :func:`describe` reports: every setting, torch's defaults filled in (JSON)."""
    return {
        "optimizer": name,
        "lr": lr if not callable(lr) else getattr(lr, "__name__", "schedule"),
        "momentum": options["momentum"],
        "nesterov": options["nesterov"],
        "dampening": options["dampening"],
        "weight_decay": weight_decay,
        "betas": list(options["betas"]),
        "eps": eps,
        "alpha": options["alpha"],
        "rho": options["rho"],
        "centered": options["centered"],
        "initial_accumulator_value": options["initial_accumulator_value"],
        "lr_decay": options["lr_decay"],
        "amsgrad": options["amsgrad"],
        "clip_norm": clip_norm,
        "clip_value": clip_value,
    }


# The optimizers create_optimizer built: id -> (tx, learning rate or schedule, settings). The
# transform is held so that its id is never reused; a run builds a handful.
_BUILT: dict[int, tuple[optax.GradientTransformation, Any, dict[str, Any]]] = {}


def learning_rate_of(tx: optax.GradientTransformation) -> Any:
    """The learning rate (a float or a schedule) :func:`create_optimizer` built ``tx`` with, or ``None``."""
    built = _BUILT.get(id(tx))
    return built[1] if built is not None and built[0] is tx else None


def describe(tx: optax.GradientTransformation) -> dict[str, Any] | None:
    """The settings :func:`create_optimizer` built ``tx`` with (JSON), or ``None`` for other transforms."""
    built = _BUILT.get(id(tx))
    return dict(built[2]) if built is not None and built[0] is tx else None


def _core(
    name: str,
    momentum: float,
    nesterov: bool,
    dampening: float,
    betas: tuple[float, float],
    eps: float,
    alpha: float,
    centered: bool,
    rho: float,
    initial_accumulator_value: float,
    lr_decay: float,
    amsgrad: bool,
) -> list[optax.GradientTransformation]:
    """The optimizer-specific part, between weight decay and the learning rate."""
    if name == "sgd":
        if momentum == 0.0:
            return []
        if dampening == 0.0:
            return [optax.trace(decay=momentum, nesterov=nesterov)]
        return [dampened_trace(momentum, dampening)]
    if name in ("adam", "adamw"):
        b1, b2 = betas
        return [scale_by_torch_adam(b1, b2, eps, amsgrad=amsgrad)]
    if name == "rmsprop":
        # torch: g / (sqrt(avg) + eps), accumulators start at 0.
        scale = optax.scale_by_stddev if centered else optax.scale_by_rms
        core = [scale(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False)]
        if momentum > 0.0:
            core.append(optax.trace(decay=momentum))  # buf = m * buf + g / avg
        return core
    if name == "adagrad":
        return [scale_by_torch_adagrad(initial_accumulator_value, eps, lr_decay)]
    return [optax.scale_by_adadelta(rho=rho, eps=eps)]  # same formula as torch
