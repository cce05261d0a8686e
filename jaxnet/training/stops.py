"""What ends a run early on purpose: a stopping signal, or a loss that is no longer finite.

Both are checked on the host between compiled steps, at no extra host sync:
the first non-finite step is tracked on the device (:func:`accumulate`) and
read where the loop syncs anyway; a signal only sets a flag (:class:`StopSignals`).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.state import TrainState

NO_STEP = np.iinfo(np.int32).max  # "no non-finite step yet"


@jax.jit
def accumulate(
    sums: dict[str, jax.Array], metrics: dict[str, jax.Array], bad: jax.Array, step: jax.Array
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Running sums of the step's metrics, and the first step whose loss was not finite (one dispatch)."""
    sums = jax.tree.map(jnp.add, sums, metrics)
    bad = jnp.where((bad == NO_STEP) & ~jnp.isfinite(metrics["loss"]), step, bad)
    return sums, bad


def _floats(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]


@jax.jit
def all_finite(state: TrainState) -> jax.Array:
    """Whether a state may be checkpointed: finite weights, no NaN in the optimizer state.

    An optimizer state may hold inf on purpose (``optax.contrib.reduce_on_plateau``'s
    best loss, a line search's initial value), so only NaN counts there.
    """
    ok = [jnp.all(jnp.isfinite(x)) for x in _floats((state.params, state.model_state))]
    ok += [~jnp.any(jnp.isnan(x)) for x in _floats(state.opt_state)]
    return jnp.all(jnp.asarray(ok or [True]))


class StopSignals:
    """SIGTERM and the first SIGINT ask the loop to stop after the current step (a context manager).

    Schedulers (SLURM, Kubernetes, cloud preemption) send SIGTERM and wait a
    grace period: the loop finishes its step, saves a checkpoint and waits
    for it to be durable, then :func:`fit` raises :class:`~jaxnet.errors.Interrupted`.
    Further signals while that happens are noted, not obeyed. Handlers are
    installed only from the main thread, and the previous ones put back.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signum: int | None = None  # the first stopping signal received
        self._previous: dict[int, Any] = {}  # signal -> the handler to put back

    def _handler(self, signum: int, frame: Any) -> None:
        import signal

        if self.signum is None:
            self.signum = signum
            return
        print(
            f"jaxnet: {signal.Signals(signum).name} again: already stopping after the current step and "
            "its checkpoint; send SIGKILL to abandon them",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int, *, every_step: bool = False) -> bool:
        """Whether to stop now; processes of a multi-process run agree (every 10 steps, or now)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if step % 10 and not every_step:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self.signum or 0], np.int32))
        if self.signum is None and np.any(flags):
            self.signum = int(np.max(flags))
        return bool(np.any(flags))

    @property
    def received(self) -> int:
        """The stopping signal's number, once :meth:`requested` said to stop."""
        if self.signum is None:
            raise RuntimeError("no stopping signal was received")
        return self.signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.received).name
