"""What a program is being built for, read at trace time: usually the default backend; `dpo-jax plan` compiles for
a TPU on a CPU host (`compiling_for("tpu")`), so that trace-time choices (the attention kernel and its interpret
mode, a CPU-only gradient layout) follow the target, not the host."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

try:  # a config context (not exported as one): executables for another platform cannot be read back from the cache
    from jax._src.config import enable_compilation_cache as _compilation_cache
except ImportError:  # pragma: no cover - a jax without it: the cache only warns
    _compilation_cache = None

_state = threading.local()


def target_platform() -> str:
    return getattr(_state, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Traces inside build for `platform`; off the host's own platform the persistent compilation cache is off (its
    entries would not load here)."""
    previous = getattr(_state, "platform", None)
    _state.platform = platform
    cache = _compilation_cache(False) if _compilation_cache is not None and platform != jax.default_backend() \
        else contextlib.nullcontext()
    try:
        with cache:
            yield
    finally:
        _state.platform = previous
