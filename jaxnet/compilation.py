"""Counting compilations: the price a static graph pays up front, made visible.

A ``jax.jit`` function is traced and compiled once per distinct input shape
and dtype; afterwards each call runs the cached executable. A loop that keeps
changing shapes (a last partial batch, variable-length inputs) silently
recompiles. :class:`CompileCounter` listens to JAX's own monitoring events so
that ``fit`` and the benchmarks can report how often that happened.
"""

from __future__ import annotations

import threading
from types import TracebackType

import jax

# Event names emitted by jax._src.dispatch; stable across recent releases.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts JAX traces and backend compilations while active.

    A backend compilation that is served from the persistent compilation
    cache still counts (it is a cache *load*, which also happens only when a
    new shape is seen). Use as a context manager::

        >>> import jax, numpy as np
        >>> f = jax.jit(lambda x: x * 2)
        >>> with CompileCounter() as counter:
        ...     _ = f(np.ones(3)); _ = f(np.ones(3)); _ = f(np.ones(4))
        >>> counter.compiles  # one per input shape; the repeated call reuses the first
        2

    Attributes:
        traces: number of functions traced to a jaxpr.
        compiles: number of XLA executables built (or loaded from the cache).
        compile_seconds: total wall seconds spent in backend compilation.
    """

    def __init__(self) -> None:
        self.traces = 0
        self.compiles = 0
        self.compile_seconds = 0.0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration_secs: float, **_: object) -> None:
        with self._lock:
            if event == TRACE_EVENT:
                self.traces += 1
            elif event == COMPILE_EVENT:
                self.compiles += 1
                self.compile_seconds += duration_secs

    def snapshot(self) -> tuple[int, int]:
        """Returns ``(traces, compiles)`` so far, for differences over a span."""
        with self._lock:
            return self.traces, self.compiles

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
