"""Compiling a train step ahead, on a background thread, so that compilation overlaps other work (a DPO run's
reference pass; PPO's first rollout, which compiles its own programs on the main thread). The jit's own cache then
serves the first step."""

from __future__ import annotations

import threading
from typing import Any, Callable


class CompileAhead:
    """Starts `jitted.lower(*abstract_args).compile()` (abstract_args: sharding.abstract stand-ins); `wait()` joins
    it and re-raises a compile error."""

    def __init__(self, jitted: Callable, *abstract_args: Any):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compile, args=(jitted, abstract_args), daemon=True)
        self._thread.start()

    def _compile(self, jitted, abstract_args) -> None:
        try:
            jitted.lower(*abstract_args).compile()
        except BaseException as e:  # noqa: BLE001 — handed to the main thread by wait()
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
