"""Mixed precision: a dtype policy and dynamic loss scaling.

PyTorch's recipe is ``with torch.autocast(dtype=...)`` around the forward
pass plus ``torch.cuda.amp.GradScaler`` for float16. jaxnet's counterpart:

- :class:`Policy`: parameters and optimizer state stay float32; the step casts
  the model's *inputs* to the compute dtype, and jaxnet's layers compute in
  their input's dtype (they cast their float32 weights), so matmuls and
  convolutions run in bfloat16/float16; the model's outputs are cast back to
  float32 before the loss (softmax/log-softmax inside the loss is float32).
  Gradients arrive in float32, since the cast of a float32 parameter
  transposes to a float32 gradient. Apply it with :func:`apply_policy`.
- :func:`apply_to_model`: Flax's own layers (``nnx.Linear``, ``nnx.Conv``,
  ...) promote a bfloat16 input and their float32 parameters to float32, so
  casting the inputs alone would silently leave them in float32. It returns a
  copy of the model whose Flax layers compute in the compute dtype (their
  ``dtype`` attribute, ``torch.autocast``'s per-op cast), and refuses a
  hand-written layer that it cannot make follow the policy.
- :func:`dynamic_loss_scaling`: an optax wrapper holding the loss scale in the
  optimizer state, and :func:`loss_scaled_train_step_fn`, the train step
  that multiplies the loss by it. float16's range ends at 65504 and its small
  gradients underflow; scaling the loss by ``S`` scales every gradient by
  ``S``, the wrapper divides by ``S`` again, skips steps whose gradients
  overflowed to inf/NaN and adapts ``S`` as ``GradScaler`` does. bfloat16
  has float32's range and needs no scaling.

Models that end in ``log_softmax`` (the ConvNet) compute it in the compute
dtype, inside the model; the loss that follows is float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxnet.errors import ConfigError
from jaxnet.models import layers
from jaxnet.state import TrainState
from jaxnet.step import Batch, LossFn, StepFn, Transform, apply_loss, compile_step, train_step_fn

# The one list of precision names (``fit(precision=)``, ``jaxnet train --precision``): name -> compute dtype.
_COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
PRECISIONS = tuple(_COMPUTE_DTYPES)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype each part of a training step uses."""

    param_dtype: Any = jnp.float32  # storage of parameters and optimizer state (never cast)
    compute_dtype: Any = jnp.float32  # activations, matmuls and convolutions
    output_dtype: Any = jnp.float32  # model outputs entering the loss (and the loss itself)

    @property
    def needs_loss_scaling(self) -> bool:
        """Whether gradients can underflow/overflow: float16 compute."""
        return jnp.dtype(self.compute_dtype) == jnp.dtype(jnp.float16)


def get_policy(name: str) -> Policy:
    """The policy for ``--precision NAME``.

    Args:
        name: ``"fp32"`` (everything float32), ``"bf16"`` (bfloat16 compute,
            ``torch.autocast(dtype=torch.bfloat16)``) or ``"fp16"`` (float16
            compute, ``autocast(dtype=torch.float16)``; use with
            :func:`dynamic_loss_scaling`).

    Returns:
        The :class:`Policy`.

    Raises:
        ConfigError: for any other name.

    >>> get_policy("bf16").compute_dtype
    <class 'jax.numpy.bfloat16'>
    """
    if name not in _COMPUTE_DTYPES:
        raise ConfigError(f"unknown precision {name!r}; expected one of {PRECISIONS}")
    return Policy(compute_dtype=_COMPUTE_DTYPES[name])


def apply_policy(policy: Policy, transform: Transform | None, loss_fn: LossFn) -> tuple[Transform, LossFn]:
    """Wraps a step's preprocessing and loss so that the step follows ``policy``.

    Args:
        policy: from :func:`get_policy`.
        transform: the step's on-device preprocessing (or ``None``).
        loss_fn: ``loss_fn(outputs, labels[, batch]) -> ()``.

    Returns:
        ``(transform, loss_fn)`` to pass to any step factory: the transform's
        result is cast to ``policy.compute_dtype``; the outputs are cast to
        ``policy.output_dtype`` before ``loss_fn`` (which gets the batch too
        when it takes one). Use the same transform for evaluation.

    >>> t, _ = apply_policy(get_policy("bf16"), None, lambda o, y: o.mean())
    >>> t(None, jnp.ones((2, 3)), True).dtype
    dtype(bfloat16)
    """

    def policy_transform(key: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        x = images if transform is None else transform(key, images, train)
        if not jnp.issubdtype(x.dtype, jnp.floating):  # raw uint8 pixels: plain float first
            x = x.astype(jnp.float32)
        return x.astype(policy.compute_dtype)

    def policy_loss(outputs: jax.Array, labels: jax.Array, batch: Batch | None = None) -> jax.Array:
        loss = apply_loss(loss_fn, outputs.astype(policy.output_dtype), labels, batch)
        return jnp.asarray(loss, policy.output_dtype)

    return policy_transform, policy_loss


# jaxnet's own layers cast their float32 parameters to the input's dtype: the
# input cast of apply_policy is all they need.
_FOLLOWS_INPUT_DTYPE = (layers.Linear, layers.Conv2d, layers.BatchNorm1d, layers.BatchNorm2d)
# Containers hold parameters on behalf of the module around them.
_CONTAINERS = (nnx.List, nnx.Dict)


def _param_owners(model: nnx.Module) -> dict[tuple[Any, ...], nnx.Module]:
    """``{path: module}`` of the modules that hold ``nnx.Param`` variables themselves (not via a sub-module)."""
    modules = dict(nnx.iter_modules(model))
    owners = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            owner = next(
                (
                    path[:i]
                    for i in range(len(path) - 1, 0, -1)
                    if path[:i] in modules and not isinstance(modules[path[:i]], _CONTAINERS)
                ),
                (),
            )
            owners[owner] = modules[owner]
    return owners


def _layer_name(path: tuple[Any, ...]) -> str:
    return "model." + ".".join(str(part) for part in path) if path else "the model itself"


def apply_to_model(model: nnx.Module, policy: Policy) -> nnx.Module:
    """A copy of ``model`` whose layers compute in ``policy.compute_dtype``; ``model`` is unchanged.

    Counterpart of ``torch.autocast``'s per-layer casts, for the Flax layers
    that :func:`apply_policy`'s input cast does not reach: ``nnx.Linear``,
    ``nnx.Conv`` and the rest promote a bfloat16 input and their float32
    parameters to float32. Every sub-module that has a ``dtype`` attribute
    (``Linear``, ``Conv``, ``ConvTranspose``, ``LinearGeneral``, ``Einsum``,
    ``Embed``, ``MultiHeadAttention``, ``PReLU``, the recurrent cells, the
    normalization layers, and any user module following that convention)
    gets ``dtype = policy.compute_dtype``: it casts its input and parameters
    to it, so its matmuls and convolutions run in it and it returns it. Its
    ``param_dtype`` (initialization only) and its parameters stay float32;
    the cast of a float32 parameter transposes to a float32 gradient.

    Flax's normalization layers (``BatchNorm``, ``LayerNorm``, ``RMSNorm``,
    ``GroupNorm``, ``InstanceNorm``) compute the mean and variance of their
    input in float32 (``flax.nnx.nn.normalization._compute_stats`` promotes
    to at least float32), normalize in float32 with them, and return the
    compute dtype. ``BatchNorm``'s running statistics stay float32 and are
    updated in float32; in evaluation mode it casts them to the compute
    dtype and normalizes in it. Mixing a bfloat16 input with float32
    statistics relies on JAX's standard dtype promotion (the default): under
    ``jax_numpy_dtype_promotion="strict"`` Flax's own normalization code
    raises ``TypePromotionError``.

    ``dtype`` is a static attribute, so it lives in the copy's graph
    definition: ``nnx.split(copy, nnx.Param, ...)`` gives a different
    ``graphdef`` but variables of the same structure, shapes and float32
    dtypes as the original's, and ``nnx.update(model, params, model_state)``
    puts the trained variables back into the user's float32 model.

    Args:
        model: an NNX model; never modified.
        policy: from :func:`get_policy`.

    Returns:
        A copy (``nnx.clone``: new Variables sharing the arrays) of ``model``;
        for a float32 policy, a plain copy.

    Raises:
        ConfigError: a module that holds ``nnx.Param`` variables itself and
            has no ``dtype`` attribute (a hand-written layer computing
            ``x @ self.w``), other than jaxnet's own layers (which compute in
            their input's dtype); the message names its path and type.

    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> apply_to_model(model, get_policy("bf16"))(jnp.ones((1, 3))).dtype
    dtype(bfloat16)
    >>> model.kernel[...].dtype, model.dtype is None
    (dtype('float32'), True)
    """
    copy = nnx.clone(model)
    if jnp.dtype(policy.compute_dtype) == jnp.dtype(jnp.float32):
        return copy
    refused = [
        f"{_layer_name(path)} ({type(module).__name__})"
        for path, module in sorted(_param_owners(copy).items(), key=lambda item: [str(p) for p in item[0]])
        if not hasattr(module, "dtype") and not isinstance(module, _FOLLOWS_INPUT_DTYPE)
    ]
    if refused:
        name = jnp.dtype(policy.compute_dtype).name
        holds, it = ("holds", "it") if len(refused) == 1 else ("each hold", "each")
        raise ConfigError(
            f"cannot compute in {name}: {', '.join(refused)} {holds} nnx.Param variables and no "
            f"dtype attribute, so would silently compute in float32. Give {it} a dtype attribute that "
            "its __call__ honours, as nnx.Linear does (self.dtype = dtype in __init__; then "
            "x, w = flax.nnx.nn.dtypes.promote_dtype((x, self.w[...]), dtype=self.dtype)), "
            "or train with precision='fp32'"
        )
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "dtype"):
            module.dtype = policy.compute_dtype
    return copy


class DynamicScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scaling` (``GradScaler.state_dict()``).

    Attributes:
        loss_scale: () float32, the factor the loss is multiplied by (``S``).
        good_steps: () int32, finite steps since ``S`` last changed
            (``GradScaler``'s growth tracker).
        inner_state: the wrapped optimizer's state.
    """

    loss_scale: jax.Array
    good_steps: jax.Array
    inner_state: optax.OptState


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def dynamic_loss_scaling(
    tx: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> optax.GradientTransformation:
    """Wraps an optimizer to take gradients of a scaled loss. Counterpart of ``GradScaler``.

    Its ``update`` receives the gradients of ``loss * S`` (see
    :func:`loss_scaled_train_step_fn`), divides them by ``S`` (``scaler.unscale_``),
    and then: if every gradient is finite, applies ``tx`` and, after
    ``growth_interval`` such steps in a row, multiplies ``S`` by
    ``growth_factor``; otherwise it returns zero updates, keeps ``tx``'s state
    (the step is skipped, ``scaler.step``) and multiplies ``S`` by
    ``backoff_factor`` (``scaler.update``). Put it outermost, around clipping
    and accumulation, so those see unscaled gradients.

    Args:
        tx: the optimizer.
        init_scale: the first ``S``.
        growth_factor: factor applied to ``S`` after ``growth_interval`` finite steps.
        backoff_factor: factor applied to ``S`` after a non-finite step.
        growth_interval: finite steps in a row before ``S`` grows.

    Returns:
        A ``GradientTransformation`` whose state is a :class:`DynamicScaleState`.

    Raises:
        ConfigError: for a non-positive scale, a growth factor <= 1, a backoff
            factor outside (0, 1) or an interval < 1.
    """
    if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
        raise ConfigError(
            f"loss scaling needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
            f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval}"
        )

    def init_fn(params: optax.Params) -> DynamicScaleState:
        return DynamicScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), tx.init(params))

    def update_fn(grads, state: DynamicScaleState, params=None):
        inv = 1.0 / state.loss_scale  # () float32
        grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)
        finite = _all_finite(grads)
        updates, inner = tx.update(grads, state.inner_state, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner, state.inner_state)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(
            finite,
            jnp.where(grow, state.loss_scale * growth_factor, state.loss_scale),
            state.loss_scale * backoff_factor,
        ).astype(jnp.float32)
        good = jnp.where(grow, 0, good).astype(jnp.int32)
        return updates, DynamicScaleState(scale, good, inner)

    return optax.GradientTransformation(init_fn, update_fn)


def loss_scale_of(opt_state: Any) -> jax.Array:
    """The current loss scale ``S`` of a state built with :func:`dynamic_loss_scaling` outermost.

    Raises:
        ConfigError: if ``opt_state`` is not a :class:`DynamicScaleState`.
    """
    if not isinstance(opt_state, DynamicScaleState):
        raise ConfigError(
            f"the optimizer state is a {type(opt_state).__name__}, not a DynamicScaleState; build the "
            "optimizer as dynamic_loss_scaling(tx) (outermost) to train with loss scaling"
        )
    return opt_state.loss_scale


def loss_scaled_train_step_fn(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn, **step_options: Any
) -> StepFn:
    """:func:`jaxnet.step.train_step_fn` with the loss multiplied by the state's loss scale.

    Counterpart of ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
    ``tx`` must be :func:`dynamic_loss_scaling` (outermost); the scale lives in
    ``state.opt_state.loss_scale``. The step counter advances on skipped
    steps too (as the learning-rate scheduler does in PyTorch); the wrapped
    optimizer's own count does not.

    Args:
        graphdef, tx: as for :func:`jaxnet.step.train_step_fn`.
        loss_fn: ``loss_fn(outputs, labels[, batch]) -> ()``, unscaled.
        **step_options: ``transform``, ``classification``, ``metrics``, as for
            :func:`jaxnet.step.train_step_fn`.

    Returns:
        ``train_step(state, batch) -> (state, metrics)``, pure; ``metrics``
        holds the unscaled ``loss`` and the ``loss_scale`` used.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        scale = loss_scale_of(state.opt_state).astype(jnp.float32)

        def scaled_loss(outputs: jax.Array, labels: jax.Array, batch: Batch) -> jax.Array:
            return apply_loss(loss_fn, outputs, labels, batch) * scale

        new_state, metrics = train_step_fn(graphdef, tx, scaled_loss, **step_options)(state, batch)
        return new_state, dict(metrics, loss=metrics["loss"] / scale, loss_scale=scale)

    return train_step


def make_loss_scaled_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    donate: bool = True,
    **step_options: Any,
) -> StepFn:
    """The jit-compiled :func:`loss_scaled_train_step_fn` (single device).

    For several devices pass the step to
    :func:`jaxnet.parallel.sharding.make_sharded_train_step` as ``step_fn``.
    """
    return compile_step(loss_scaled_train_step_fn(graphdef, tx, loss_fn, **step_options), donate=donate)
