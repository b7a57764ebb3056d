"""`--fit`: the fastest settings under which every program of a run fits — remat policy and micro-batches searched,
each candidate's memory from a full compile, the fitting ones ranked by the compiler's step-time estimate."""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from dpo_jax.data.layout import get_layout
from dpo_jax.plan.run_plan import add_estimate, plan_programs
from dpo_jax.sharding import data_parallel_size, make_mesh

REMAT_POLICIES = ("none", "dots", "full")  # most memory, least recompute first


def micro_batch_choices(c: ml_collections.ConfigDict, dp: int, most: int = 64) -> list[int]:
    """Micro-batch counts the batch splits into evenly (each micro-batch's rows divisible by the data-parallel
    size), ascending."""
    layout = get_layout(c.data.layout, c.data.max_pairs_per_row)
    out = []
    for m in range(1, most + 1):
        if layout.rows_per_pair:
            pairs = c.train.global_batch_pairs
            if pairs % m == 0 and (layout.rows_per_pair * pairs // m) % dp == 0:
                out.append(m)
        elif not c.train.global_batch_tokens and c.train.global_batch_pairs % m == 0:
            out.append(m)  # packed rows: the row count is rounded up to a multiple of dp x m
    return out


def with_settings(c: ml_collections.ConfigDict, remat: str, micro_batches: int) -> ml_collections.ConfigDict:
    out = copy.deepcopy(c)
    out.model.remat_policy, out.train.micro_batches = remat, micro_batches
    return out


def overrides(remat: str, micro_batches: int) -> list[str]:
    return [f"--config.model.remat_policy={remat}", f"--config.train.micro_batches={micro_batches}"]


def fit(c: ml_collections.ConfigDict, devices: list[Any], policies: tuple[str, ...] = REMAT_POLICIES
        ) -> tuple[dict[str, Any], tuple | None]:
    """({"overrides": [...] or [] when nothing fits, "remat_policy", "micro_batches", "tried": [...]}, the chosen
    candidate's (plans, info) with estimates, or None): per remat policy the fewest micro-batches that fit, then the
    fastest of those by the estimate. Each candidate is compiled once; only the fitting ones get estimates."""
    dp = data_parallel_size(make_mesh(c.mesh, devices), c.mesh.rules)
    tried, best, best_seconds = [], None, float("inf")
    for remat in policies:
        for m in micro_batch_choices(c, dp):
            candidate = with_settings(c, remat, m)
            plans, info = plan_programs(candidate, devices, with_estimate=False)
            fits = all(p.fits for p in plans.values())
            tried.append({"remat_policy": remat, "micro_batches": m, "fits": fits,
                          "total_bytes": max(p.total_bytes for p in plans.values())})
            if not fits:
                continue
            add_estimate(plans, candidate, devices)
            tried[-1]["estimated_step_seconds"] = seconds = plans["train_step"].estimated_step_seconds
            if seconds < best_seconds:
                best, best_seconds = (remat, m, (plans, info)), seconds
            break
    if best is None:
        return {"overrides": [], "tried": tried}, None
    return {"overrides": overrides(*best[:2]), "remat_policy": best[0], "micro_batches": best[1],
            "estimated_step_seconds": best_seconds, "tried": tried}, best[2]
