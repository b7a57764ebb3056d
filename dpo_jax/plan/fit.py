"""`--fit`: the fastest settings under which every program of a run fits — remat policy and micro-batches searched,
each candidate's memory from a full compile, the fitting ones ranked by the compiler's step-time estimate. When
the batch does not split over the data-parallel devices (64 pairs on a v5e-256) or nothing fits, a tensor-parallel
mesh axis twice as large is tried next, up to TENSOR_MOST (one host's chips: tensor parallelism stays on ICI)."""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
from jax.sharding import Mesh

from dpo_jax.data.layout import get_layout
from dpo_jax.plan.estimate import add_estimate, plan_programs
from dpo_jax.sharding import data_parallel_size, make_mesh
from dpo_jax.train.engine import check_batch_layout

REMAT_POLICIES = ("none", "dots", "full")  # most memory, least recompute first
TENSOR_MOST = 8


def micro_batch_choices(c: ml_collections.ConfigDict, mesh: Mesh, most: int = 64) -> list[int]:
    """Micro-batch counts the batch splits into evenly (the engine's own check: each micro-batch's pairs divisible
    by the data-parallel size), ascending."""
    layout = get_layout(c.data.layout, c.data.max_pairs_per_row)
    out = []
    for m in range(1, most + 1):
        if layout.rows_per_pair:
            try:
                check_batch_layout(with_settings(c, c.model.remat_policy, m), mesh, layout.rows_per_pair)
                out.append(m)
            except ValueError:
                pass
        elif not c.train.global_batch_tokens and c.train.global_batch_pairs % m == 0:
            out.append(m)  # packed rows: the row count is rounded up to a multiple of dp x m
    return out


def tensor_choices(c: ml_collections.ConfigDict) -> list[int]:
    """The configured tensor-parallel size, then doublings up to TENSOR_MOST (none when it is configured -1)."""
    if c.mesh.tensor == -1:
        return [-1]
    return [c.mesh.tensor * 2**k for k in range(8) if c.mesh.tensor * 2**k <= max(TENSOR_MOST, c.mesh.tensor)]


def with_settings(c: ml_collections.ConfigDict, remat: str, micro_batches: int, tensor: int | None = None
                  ) -> ml_collections.ConfigDict:
    out = copy.deepcopy(c)
    out.model.remat_policy, out.train.micro_batches = remat, micro_batches
    if tensor is not None:
        out.mesh.tensor = tensor
    return out


def overrides(remat: str, micro_batches: int, tensor: int | None = None) -> list[str]:
    mesh = [f"--config.mesh.tensor={tensor}"] if tensor is not None else []
    return mesh + [f"--config.model.remat_policy={remat}", f"--config.train.micro_batches={micro_batches}"]


def fit(c: ml_collections.ConfigDict, devices: list[Any], policies: tuple[str, ...] = REMAT_POLICIES
        ) -> tuple[dict[str, Any], tuple | None]:
    """({"overrides": [...] or [] when nothing fits, "remat_policy", "micro_batches", "tensor", "tried": [...]}, the
    chosen candidate's (plans, info) with estimates, or None): per tensor-parallel size (`tensor_choices`, the next
    only when the batch does not split or nothing fits at this one) and remat policy the fewest micro-batches that
    fit, then the fastest of those by the estimate. Each candidate is compiled once; only fitting ones are estimated."""
    tried, best, best_seconds = [], None, float("inf")
    for tensor in tensor_choices(c):
        try:
            mesh_config = with_settings(c, c.model.remat_policy, c.train.micro_batches, tensor).mesh
            mesh = make_mesh(mesh_config, devices)
        except ValueError as e:  # the devices do not split into this tensor size
            tried.append({"tensor": tensor, "fits": False, "error": str(e)})
            break
        choices = micro_batch_choices(c, mesh)
        if not choices:
            tried.append({"tensor": tensor, "fits": False, "error": f"the batch does not split over "
                          f"{data_parallel_size(mesh, c.mesh.rules)} data-parallel devices"})
        for remat in policies:
            for m in choices:
                candidate = with_settings(c, remat, m, tensor)
                try:
                    plans, info = plan_programs(candidate, devices, with_estimate=False)
                except ValueError as e:  # e.g. heads or vocabulary not divisible by the tensor size
                    tried.append({"tensor": tensor, "remat_policy": remat, "micro_batches": m, "fits": False,
                                  "error": str(e)})
                    break
                fits = all(p.fits for p in plans.values())
                tried.append({"tensor": tensor, "remat_policy": remat, "micro_batches": m, "fits": fits,
                              "total_bytes": max(p.total_bytes for p in plans.values())})
                errors = [p.compiled.error for p in plans.values() if p.compiled.error]
                if errors:  # out of memory at compile time: the compiler's message, not a byte count
                    tried[-1]["error"] = errors[0][:300]
                if not fits:
                    continue
                add_estimate(plans, candidate, devices)
                tried[-1]["estimated_step_seconds"] = seconds = plans["train_step"].estimated_step_seconds
                if seconds < best_seconds:
                    best, best_seconds = (remat, m, tensor, (plans, info)), seconds
                break
        if best is not None:
            break
    if best is None:
        return {"overrides": [], "tried": tried}, None
    remat, m, tensor, chosen = best
    return {"overrides": overrides(remat, m, tensor if tensor != c.mesh.tensor else None), "remat_policy": remat,
            "micro_batches": m, "tensor": tensor, "estimated_step_seconds": best_seconds, "tried": tried}, chosen
