"""Multi-host start-up: `jax.distributed.initialize` from config or the environment."""

from __future__ import annotations

import jax
import ml_collections

MODES = ("none", "auto", "explicit")


def default_distributed_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "none"  # none: one process; auto: TPU pods / Slurm / env vars; explicit: the fields below
    c.coordinator_address = ""  # host:port of process 0
    c.num_processes = 1
    c.process_id = 0
    c.cpu_collectives = "gloo"  # for multi-process CPU runs (tests)
    return c


def initialize(c: ml_collections.ConfigDict) -> None:
    """Call before any other JAX use. Auto mode works on TPU pods (metadata server) and Slurm (srun env)."""
    if c.mode not in MODES:
        raise ValueError(f"config.distributed.mode = {c.mode!r}; valid: {', '.join(MODES)}")
    if c.mode == "none":
        return
    if c.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", c.cpu_collectives)
    if c.mode == "auto":
        jax.distributed.initialize()
        return
    if not c.coordinator_address:
        raise ValueError("config.distributed.mode = 'explicit' needs config.distributed.coordinator_address")
    jax.distributed.initialize(coordinator_address=c.coordinator_address, num_processes=c.num_processes,
                               process_id=c.process_id)


def is_main_process() -> bool:
    """Only process 0 writes logs and reports."""
    return jax.process_index() == 0
