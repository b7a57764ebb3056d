"""The sentiment experiment's evaluation points, each with its per-prompt outcomes.

A point is one policy evaluated on the held-out test prefixes: a method (its family and setting), a training seed,
a step, and per prompt the VADER reward of the completion, the sequence KL(π‖π_SFT) estimate and the learned reward
model's score of the same completion. results.csv has one row per point (the means); outcomes.npz the per-prompt
arrays in the same row order, so every interval in results.md can be recomputed (`read_points`,
evaluation/intervals.py).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

import numpy as np

# method-name prefix -> family, first match wins (cDPO, IPO, online DPO and TR-DPO are their own families: the
# paper's Figure 2 has none of them, so they stay out of DPO's envelope; so are PPO runs at a fixed coefficient, off
# the paper's protocol)
FAMILIES = (("ppo_gt_beta", "PPO-GT (fixed β)"), ("ppo_beta", "PPO (fixed β)"), ("ppo_gt", "PPO-GT"), ("ppo", "PPO"),
            ("best_of_n", "Best-of-N"), ("online_dpo", "Online DPO"), ("tr_dpo", "TR-DPO"), ("cdpo", "cDPO"),
            ("ipo", "IPO"), ("dpo", "DPO"), ("unlikelihood", "Unlikelihood"), ("preferred_ft", "Preferred-FT"),
            ("sft", "π_SFT"))
COLUMNS = ("family", "method", "seed", "step", "vader", "kl", "rm_score")


def family(method: str) -> str:
    return next((f for prefix, f in FAMILIES if method.startswith(prefix)), method)


def make_point(method: str, seed: int, step: int, vader: Sequence[float], kl: Sequence[float],
               rm_score: Sequence[float] | None = None) -> dict[str, Any]:
    """A point from per-prompt outcomes ([prompts] each; rm_score None when there is no reward model). "reward"
    is the mean VADER reward (the frontier's y axis), "kl" the mean KL."""
    vader, kl = np.asarray(vader, np.float64), np.asarray(kl, np.float64)
    rm = np.full_like(vader, np.nan) if rm_score is None else np.asarray(rm_score, np.float64)
    if not vader.shape == kl.shape == rm.shape or vader.ndim != 1:
        raise ValueError(f"{method}: per-prompt outcomes of different shapes {vader.shape}, {kl.shape}, {rm.shape}")
    return {"family": family(method), "method": method, "seed": int(seed), "step": int(step),
            "reward": float(vader.mean()), "kl": float(kl.mean()),
            "rm_score": float(rm.mean()) if rm_score is not None else float("nan"),
            "outcomes": {"vader": vader, "kl": kl, "rm_score": rm}}


def write_points(out_dir: str, points: Sequence[dict[str, Any]]) -> None:
    """results.csv (COLUMNS, one row per point) and outcomes.npz ([points, prompts] per outcome, same order)."""
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for p in points:
            rm = "" if np.isnan(p["rm_score"]) else f"{p['rm_score']:.6f}"
            writer.writerow([p["family"], p["method"], p["seed"], p["step"], f"{p['reward']:.6f}", f"{p['kl']:.6f}",
                             rm])
    prompts = {len(p["outcomes"]["vader"]) for p in points}
    if len(prompts) != 1:
        raise ValueError(f"points scored on different numbers of prompts: {sorted(prompts)}")
    arrays = {name: np.stack([p["outcomes"][name] for p in points]).astype(np.float32)
              for name in ("vader", "kl", "rm_score")}
    tmp = os.path.join(out_dir, "outcomes.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(out_dir, "outcomes.npz"))


def read_points(out_dir: str) -> list[dict[str, Any]]:
    """The points write_points stored, with their per-prompt outcomes (and "rewards"/"kls" for
    intervals.runs_from_points)."""
    path = os.path.join(out_dir, "results.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    with np.load(os.path.join(out_dir, "outcomes.npz")) as arrays:
        outcomes = {name: arrays[name] for name in arrays.files}
    if len(rows) != len(outcomes["vader"]):
        raise ValueError(f"{path}: {len(rows)} rows, but outcomes.npz has {len(outcomes['vader'])} points")
    points = []
    for i, row in enumerate(rows):
        point = make_point(row["method"], int(row["seed"]), int(row["step"]), outcomes["vader"][i],
                           outcomes["kl"][i], None if row["rm_score"] == "" else outcomes["rm_score"][i])
        point.update(rewards=point["outcomes"]["vader"], kls=point["outcomes"]["kl"])
        points.append(point)
    return points
