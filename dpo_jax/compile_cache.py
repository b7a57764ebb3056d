"""JAX's persistent compilation cache, on by default for every `dpo-jax` command: each compiled program is kept on
disk, so the next run of the same program (a relaunch, a resumed run, the main job's next policy, a second run of
the main job) loads it instead of compiling it again (docs/PERFORMANCE.md, "Compiled once").

Where, first match wins:
  1. $DPO_JAX_COMPILE_CACHE: a directory, or `off` (also 0, false, none) for no persistent cache at all;
  2. JAX's own setting, if the user made one (JAX_COMPILATION_CACHE_DIR or jax.config): left as it is;
  3. <the command's cache directory>/xla — config.data.cache_dir or config.cache_dir, else $DPO_JAX_CACHE or
     ~/.cache/dpo_jax (`default_cache_dir`, below), the one place a run writes outside its run directory.

The directory is capped at MAX_BYTES (least recently used entries go first) unless JAX_COMPILATION_CACHE_MAX_SIZE
says otherwise. The cache holds compiler output only: a changed program, flag, device or jax version is a new key.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

CACHE_ENV = "DPO_JAX_CACHE"
ENV = "DPO_JAX_COMPILE_CACHE"
OFF = ("off", "0", "false", "none")
MAX_BYTES = 8 << 30
# JAX keeps only programs that took at least this long to compile (its default: 1 s). Most of a small run's
# programs compile in 0.1-1 s, and loading one costs milliseconds.
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> str:
    """Where caches go unless the config says otherwise: $DPO_JAX_CACHE, else ~/.cache/dpo_jax (every layer's
    caches: data, tokenizers, reference tables, the sentiment stages, compiled programs)."""
    return os.path.expanduser(os.environ.get(CACHE_ENV, "~/.cache/dpo_jax"))


def cache_dir_of(config) -> str:
    """A command config's cache directory setting: data.cache_dir or cache_dir ("" when it has neither)."""
    if "data" in config and "cache_dir" in config.data:
        return config.data.cache_dir
    return config.get("cache_dir", "")


def configure(cache_dir: str = "") -> str | None:
    """Turns the persistent cache on (see the module docstring) before anything compiles; returns its directory, or
    None when it is off. Idempotent: a directory already set is kept unless $DPO_JAX_COMPILE_CACHE names another."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()  # re-read the settings at the next compile
        return None
    if not setting and jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache:
        return jax.config.jax_compilation_cache_dir
    directory = os.path.abspath(os.path.expanduser(setting or os.path.join(cache_dir or default_cache_dir(), "xla")))
    if directory != jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
