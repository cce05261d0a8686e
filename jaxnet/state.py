"""The training state: everything a run needs to continue, as one pytree.

PyTorch keeps a run's state spread over objects that mutate in place (the
module's parameters and buffers, the optimizer's ``state_dict``, the global
RNG). jaxnet keeps it in one immutable pytree, :class:`TrainState`, that the
compiled step takes and returns. The parts that are not arrays -- the model's
graph definition and the optax transformation -- stay outside, in the closures
built by :mod:`jaxnet.step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    """A training run's complete state.

    Attributes:
        step: () int32, number of optimizer steps taken so far.
        params: the model's ``nnx.Param`` variables (an ``nnx.State``).
        opt_state: the optax optimizer state for ``params``.
        model_state: every other model variable, e.g. BatchNorm running
            statistics (``nnx.BatchStat``); empty for models without any.
        rng: (2,) uint32 PRNG key; the step's dropout key is
            ``jax.random.fold_in(rng, step)``, so a run is reproducible from
            the state alone, whatever happened before it was saved.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    model_state: nnx.State
    rng: jax.Array

    if TYPE_CHECKING:
        # ``flax.struct.dataclass`` adds ``replace`` at runtime, but its
        # ``dataclass_transform`` typing does not declare it; declared here so
        # the type checker sees it (nothing is defined at runtime).
        def replace(self, **changes: Any) -> TrainState:
            """A copy of the state with ``changes`` applied (``dataclasses.replace``)."""
            ...


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits an NNX model into its static graph and a fresh :class:`TrainState`.

    Counterpart of building ``model`` and ``torch.optim.X(model.parameters())``
    in PyTorch: the returned state holds the parameters and the optimizer's
    state, the graph definition holds everything static.

    Args:
        model: an ``nnx.Module`` whose trainable variables are ``nnx.Param``.
        tx: the optax transformation that will update ``params``.
        seed: seed of the state's PRNG key (dropout and augmentation).

    Returns:
        ``(graphdef, state)``; ``nnx.merge(graphdef, state.params,
        state.model_state)`` rebuilds the model.

    Example:
        >>> import optax
        >>> from jaxnet.models import create_model
        >>> graphdef, state = create_train_state(create_model("mlp"), optax.adam(1e-3))
        >>> int(state.step)
        0
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax types nnx.split's result as a variadic tuple
    # Buffers of its own: the first donated step must not delete the arrays of the user's model.
    params, model_state = copy_state(params), copy_state(model_state)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
        rng=jax.random.PRNGKey(seed),
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuilds the live NNX model from a graph definition and a state.

    Args:
        graphdef: the graph definition returned by :func:`create_train_state`.
        state: a :class:`TrainState` (on any device).

    Returns:
        An ``nnx.Module`` in evaluation mode, holding ``state``'s arrays.
    """
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    return model


def count_params(params: Any) -> int:
    """Number of scalar parameters in a pytree (``sum(p.numel() ...)`` in torch)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def copy_state(state: Any) -> Any:
    """A copy of a state (or any pytree of arrays) with buffers of its own, on the same devices.

    The compiled train steps donate their input state: after
    ``state, m = step(state, batch)`` the old state's buffers are reused and
    reading them raises ``Array has been deleted``. To keep a state while
    stepping on (the best so far, a snapshot to compare), keep a copy::

        best = copy_state(state)      # safe: its own buffers
        state, metrics = step(state, batch)

    Shardings are kept (the copy of a sharded array is sharded alike).
    """
    return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state)
