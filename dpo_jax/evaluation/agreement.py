"""How far to trust a judge: its agreement with human labels, beside the humans' agreement with each other (the
DPO paper's §6.4 and Table 2, where GPT-4's agreement with people is checked against people's with each other).

Input: human-labelled pairs in the generic preference format — `prompt`, `chosen`, `rejected` strings, the human
label being that `chosen` was preferred — optionally with `annotations`, each annotator's vote ("chosen" or
"rejected"; then the majority decides, and an even split is left out of the majority figures).
Reported per judge, each with a 95 % bootstrap interval over pairs:
- agreement with the human majority (the judge's ties count half; invalid verdicts left out and counted);
- agreement with a single annotator (the mean over a pair's annotators), the figure comparable to
- the human–human agreement: over pairs with two or more annotators, the share of annotator pairs that agree —
  the ceiling a judge can be expected to reach.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpo_jax.data.formats import DataError, Skip, iter_rows, read_generic
from dpo_jax.evaluation.intervals import Interval, difference_interval

VOTES = {"chosen": 1.0, "rejected": 0.0}


@dataclasses.dataclass(frozen=True)
class LabelledPairs:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    votes: np.ndarray  # [N, most annotators]: 1 prefers chosen, 0 rejected, NaN no vote (a file without
    #   annotations: one vote for chosen each)
    sources: list[str]  # file:line per pair


def read_labelled_pairs(path: str, limit: int = 0) -> LabelledPairs:
    """The pairs at `path` (JSONL / parquet, generic format); a malformed row is a DataError naming file:line."""
    prompts, chosen, rejected, votes, sources = [], [], [], [], []
    for where, row in iter_rows(path):
        example = read_generic((where, row))
        if isinstance(example, Skip):
            raise DataError(f"{where}: not a usable labelled pair ({example.reason})")
        if not all(isinstance(t, str) for t in (example.prompt, example.chosen, example.rejected)):
            raise DataError(f"{where}: judge agreement needs prompt, chosen and rejected as strings, not messages")
        marks = row.get("annotations", ["chosen"])
        if not isinstance(marks, list) or not marks or any(m not in VOTES for m in marks):
            raise DataError(f"{where}: field 'annotations' must be a non-empty list of \"chosen\" / \"rejected\" "
                            f"votes, got {marks!r}")
        prompts.append(example.prompt)
        chosen.append(example.chosen)
        rejected.append(example.rejected)
        votes.append([VOTES[m] for m in marks])
        sources.append(where)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise DataError(f"{path}: no labelled pairs")
    width = max(len(v) for v in votes)
    grid = np.full((len(votes), width), np.nan)
    for i, v in enumerate(votes):
        grid[i, :len(v)] = v
    return LabelledPairs(prompts, chosen, rejected, grid, sources)


def majority(votes: np.ndarray) -> np.ndarray:
    """[N]: 1 where most annotators chose `chosen`, 0 where most chose `rejected`, NaN on an even split."""
    share = np.nanmean(votes, axis=1)
    return np.where(share > 0.5, 1.0, np.where(share < 0.5, 0.0, np.nan))


def human_agreement(votes: np.ndarray) -> np.ndarray:
    """[N]: per pair, the share of its annotator pairs that agree; NaN with fewer than two annotators."""
    n = np.sum(~np.isnan(votes), axis=1)
    k = np.nansum(votes, axis=1)
    pairs = n * (n - 1) / 2
    agree = k * (k - 1) / 2 + (n - k) * (n - k - 1) / 2
    return np.where(n >= 2, agree / np.maximum(pairs, 1), np.nan)


def _mean_interval(x: np.ndarray) -> tuple[Interval | None, int]:
    x = x[~np.isnan(x)]
    return (difference_interval(x[None, :]) if x.size else None), int(x.size)


def agreement(outcomes: np.ndarray, votes: np.ndarray) -> dict[str, Any]:
    """A judge's agreement figures. outcomes [N]: the judge's outcome for `chosen` against `rejected` (1, ½, 0;
    NaN invalid); votes [N, A] as LabelledPairs.votes."""
    outcomes = np.asarray(outcomes, np.float64)
    with np.errstate(invalid="ignore"):
        with_majority = 1 - np.abs(outcomes - majority(votes))
        with_annotator = np.nanmean(1 - np.abs(outcomes[:, None] - votes), axis=1)
    out: dict[str, Any] = {"pairs": len(outcomes), "judged": int(np.sum(~np.isnan(outcomes)))}
    for name, x in (("majority", with_majority), ("annotator", with_annotator),
                    ("human_human", human_agreement(votes))):
        interval, n = _mean_interval(x)
        out[name] = interval
        out[f"{name}_pairs"] = n
    return out


def interval_text(interval: Interval | None, n: int) -> str:
    if interval is None:
        return "—"
    return f"{100 * interval.estimate:.1f} % [{100 * interval.low:.1f}, {100 * interval.high:.1f}] of {n}"
