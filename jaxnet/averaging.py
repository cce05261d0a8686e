"""Weight averaging as pure functions on pytrees: an exponential moving average and lookahead.

PyTorch keeps an averaged copy of a model in an object updated in place
(``torch.optim.swa_utils.AveragedModel``, airbench's ``LookaheadState``).
Here the average is a pytree like the parameters, and each update is a pure
function returning the new trees, so it can run inside ``jit`` or between
compiled steps.

Math, with ``d`` the decay:

- EMA: ``avg <- d * avg + (1 - d) * params`` (``avg.lerp_(params, 1 - d)``).
- Lookahead as in airbench (Jordan, arXiv 2404.00498): every ``every``
  optimizer steps, ``avg <- d_t * avg + (1 - d_t) * params`` and then
  ``params <- avg``; ``d_t = rate * (t / T) ** power`` after step ``t`` of
  ``T`` (``rate = 0.95 ** 5``, ``power = 3``), so early syncs keep almost
  all of the fast weights and late ones average strongly. After the last
  step the parameters are set to the average once more (``d = 1``), which
  drops the fast progress made since the last sync.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LookaheadState", "ema_update", "lookahead_decay", "lookahead_init", "lookahead_sync", "sync_decay"]

LOOKAHEAD_RATE = 0.95**5  # airbench's decay per sync at the end of training (0.95 per step, 5 steps)


def _is_float(x: Any) -> bool:
    return isinstance(x, float) or (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))


def ema_update(avg: Any, params: Any, decay: float | jax.Array) -> Any:
    """One EMA step: ``decay * avg + (1 - decay) * params`` for every floating leaf.

    Counterpart of ``avg.lerp_(params, 1 - decay)`` over a ``state_dict``.
    Non-floating leaves (step counters) are taken from ``params``, as airbench
    averages only float tensors.

    Args:
        avg: the average so far, a pytree.
        params: the new values, a pytree of the same structure.
        decay: weight of the old average in ``[0, 1]`` (1 keeps ``avg``, 0 takes ``params``).

    Returns:
        The new average; each leaf keeps ``avg``'s dtype.

    >>> ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, 0.75)["w"].item()
    1.5
    """
    decay = jnp.asarray(decay, jnp.float32)

    def update(a: Any, p: Any) -> Any:
        if not _is_float(a):
            return p
        return (decay * a + (1.0 - decay) * p).astype(jnp.result_type(a))

    return jax.tree.map(update, avg, params)


class LookaheadState(NamedTuple):
    """The slow weights of lookahead.

    Attributes:
        average: the averaged pytree (parameters, and BatchNorm statistics if
            they are averaged too), with buffers of its own.
    """

    average: Any


def lookahead_init(tree: Any) -> LookaheadState:
    """Starts lookahead from a copy of ``tree`` (so a donated step may reuse ``tree``'s buffers)."""
    return LookaheadState(jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree))


def lookahead_decay(
    step: int | jax.Array, total_steps: int, *, rate: float = LOOKAHEAD_RATE, power: float = 3.0
) -> jax.Array:
    """``rate * (step / total_steps) ** power``: the decay of the sync after optimizer step ``step``.

    >>> round(float(lookahead_decay(476, 476)), 6) == round(0.95**5, 6)
    True
    """
    return jnp.asarray(rate * (jnp.asarray(step, jnp.float32) / total_steps) ** power, jnp.float32)


def sync_decay(
    step: int, total_steps: int, *, every: int = 5, rate: float = LOOKAHEAD_RATE, power: float = 3.0
) -> float | None:
    """The decay of the lookahead sync due after optimizer step ``step`` (1-based), or ``None``.

    Host-side, for the training loop: a sync is due every ``every`` steps
    (decay :func:`lookahead_decay`) and after the last step; if the last
    step is not a multiple of ``every`` its sync has decay 1.0 (the
    parameters become the average). If it is, airbench's extra ``d = 1``
    sync changes nothing and the scheduled one is returned. A run shorter
    than ``every`` steps has no sync at all: its average would still be the
    initial weights, and a ``d = 1`` sync would put them back.

    Args:
        step: optimizer steps done so far, ``1 .. total_steps``.
        total_steps: steps of the whole run.
        every: steps between syncs (airbench: 5).
        rate, power: see :func:`lookahead_decay`.

    Returns:
        The decay to pass to :func:`lookahead_sync`, or ``None`` for no sync.

    >>> [sync_decay(t, 12) is not None for t in (4, 5, 10, 11)], sync_decay(12, 12), sync_decay(4, 4)
    ([False, True, True, False], 1.0, None)
    """
    if step % every == 0:
        return float(lookahead_decay(step, total_steps, rate=rate, power=power))
    if step == total_steps and step > every:  # a run shorter than one interval never synced: keep its weights
        return 1.0
    return None


def lookahead_sync(state: LookaheadState, tree: Any, decay: float | jax.Array) -> tuple[LookaheadState, Any]:
    """One lookahead sync: ``average <- ema_update(average, tree, decay)``, then ``tree <- average``.

    Args:
        state: the slow weights.
        tree: the fast weights (same structure).
        decay: weight of the old average, e.g. from :func:`sync_decay`.

    Returns:
        ``(new_state, new_tree)``; ``new_tree`` holds the same values as the
        new average, in buffers of its own.

    >>> state, w = lookahead_sync(lookahead_init(jnp.array(1.0)), jnp.array(3.0), 0.5)
    >>> state.average.item(), w.item()
    (2.0, 2.0)
    """
    average = ema_update(state.average, tree, decay)
    fast = jax.tree.map(lambda a, t: jnp.copy(a) if _is_float(a) else t, average, tree)
    return LookaheadState(average), fast
