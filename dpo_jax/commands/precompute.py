"""`dpo-jax precompute --config FILE[:ARG]`: build a run's data caches and reference log-probs, then stop (e.g. on a
CPU host before the accelerators are booked)."""

from __future__ import annotations

from dpo_jax.commands import exits_on_run_error
from dpo_jax.commands.train import default_config  # noqa: F401 — the run config
from dpo_jax.train import run

main = exits_on_run_error(run.precompute, "precompute")
