"""Seconds spent compiling, as JAX itself reports them (jax.monitoring events): what a stage's wall time splits
into, so a slow run says whether it compiled or computed."""

from __future__ import annotations

import time
from typing import Any

from jax import monitoring

# lowering a jaxpr to MLIR, and the backend's compile of it (a persistent-cache hit records neither)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """`with CompileClock() as clock: ...` — then clock.seconds (wall) and clock.compile_seconds (JAX's compile
    events inside, on any thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compile_seconds = 0.0
        self._start = 0.0

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            self.compile_seconds += duration

    def __enter__(self) -> "CompileClock":
        self._start = time.perf_counter()
        monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        monitoring.unregister_event_duration_listener(self._on_event)
        self.seconds = time.perf_counter() - self._start
