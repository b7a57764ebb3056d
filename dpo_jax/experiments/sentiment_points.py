"""The sentiment experiment's stored data: its evaluation points, each with its per-prompt outcomes, and the
preference pairs' cache file.

A point is one policy evaluated on the held-out test prefixes: a method (its family and setting), a training seed,
a step, and per prompt the VADER reward of the completion, the sequence KL(π‖π_SFT) estimate and the learned reward
model's score of the same completion. results.csv has one row per point (the means); outcomes.npz the per-prompt
arrays in the same row order, so every interval in results.md can be recomputed (`read_points`,
evaluation/intervals.py).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import numpy as np

# method-name prefix -> family, first match wins (cDPO and IPO are their own families: the paper's Figure 2 has
# neither, so they stay out of DPO's envelope)
FAMILIES = (("ppo_gt", "PPO-GT"), ("ppo", "PPO"), ("best_of_n", "Best-of-N"), ("cdpo", "cDPO"), ("ipo", "IPO"),
            ("dpo", "DPO"), ("unlikelihood", "Unlikelihood"), ("preferred_ft", "Preferred-FT"), ("sft", "π_SFT"))
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


def save_pairs(path: str, source: Sequence[dict[str, Any]], records: list[dict], samples_scored: int) -> None:
    """The pairs stage's cache: every pair's token rows (concatenated per field, with lengths), the readable
    records, and how many VADER-labelled samples they came from."""
    arrays: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        for field in ("input_ids", "loss_mask"):
            rows = [r[f"{side}_{field}"] for r in source]
            arrays[f"{side}_{field}"] = np.concatenate(rows)
            arrays[f"{side}_lengths"] = np.asarray([len(x) for x in rows])
    arrays["records"] = np.asarray(json.dumps(records))
    arrays["samples_scored"] = np.asarray(samples_scored)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_pairs(path: str) -> tuple[list[dict[str, Any]], list[dict], int]:
    """(pair rows, records, samples scored) from `save_pairs`' file."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    source: list[dict[str, Any]] = [{"example_id": i} for i in range(len(data["chosen_lengths"]))]
    for side in ("chosen", "rejected"):
        offsets = np.concatenate([[0], np.cumsum(data[f"{side}_lengths"])])
        for field in ("input_ids", "loss_mask"):
            for i, row in enumerate(source):
                row[f"{side}_{field}"] = data[f"{side}_{field}"][offsets[i]:offsets[i + 1]]
    return source, json.loads(str(data["records"])), int(data["samples_scored"])
