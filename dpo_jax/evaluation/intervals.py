"""95 % intervals for the comparisons we publish, and the words they allow.

Outcomes are per seed and per prompt ([seeds, prompts] arrays): a method's mean over both is its score. The
interval is a percentile bootstrap that resamples both sources of noise — the training seeds of each side
independently, the prompts jointly when both sides were scored on the same prompts (paired, which removes the
prompts' shared difficulty from the difference). A difference is "ahead" or "behind" only when its interval excludes
0, "level" otherwise.

Envelopes (the reward-vs-KL frontier of a family) are compared on a KL grid: each bootstrap replicate redraws the
seeds (a run contributes all its evaluation points) and the prompts, recomputes every point's mean reward and KL,
and takes the gap between the two upper envelopes at each grid KL. Shares of the range are printed to one decimal,
and every stretch in either side's favour is listed: "100 %" is never printed when a stretch says otherwise. A
family's envelope is over all its runs' points, so it rises with the number of runs: compare families with the same
number of seeds (and evaluation points per run).

Issue 30 builds the sentiment report on these; this module is plain numpy, so the report's tests and a reader's
notebook can recompute every interval from the per-prompt outcomes saved beside results.csv.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return "ahead" if self.low > 0 else "behind" if self.high < 0 else "level"

    def text(self, digits: int = 3) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _percentiles(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - level) / 2
    return np.nanpercentile(replicates, tail, axis=0), np.nanpercentile(replicates, 100 - tail, axis=0)


def _check(outcomes: np.ndarray, name: str) -> np.ndarray:
    outcomes = np.asarray(outcomes, float)
    if outcomes.ndim != 2 or 0 in outcomes.shape:
        raise ValueError(f"{name}: outcomes must be [seeds, prompts] with at least one of each, got {outcomes.shape}")
    return outcomes


def difference_interval(a: np.ndarray, b: np.ndarray | None = None, paired: bool = True, samples: int = 4000,
                        seed: int = 0, level: float = LEVEL) -> Interval:
    """mean(a) − mean(b) (or mean(a) when b is None) with its bootstrap interval. a, b: [seeds, prompts];
    paired: the same prompts in the same order on both sides (they are then resampled together)."""
    a = _check(a, "a")
    b = None if b is None else _check(b, "b")
    if paired and b is not None and a.shape[1] != b.shape[1]:
        raise ValueError(f"paired outcomes need the same prompts on both sides: {a.shape[1]} and {b.shape[1]}")
    rng = np.random.default_rng(seed)

    def draw(x: np.ndarray, prompts: np.ndarray | None) -> np.ndarray:
        seeds = rng.integers(0, x.shape[0], (samples, x.shape[0]))
        if prompts is None:
            prompts = rng.integers(0, x.shape[1], (samples, x.shape[1]))
        return x[seeds[:, :, None], prompts[:, None, :]].mean(axis=(1, 2))

    shared = rng.integers(0, a.shape[1], (samples, a.shape[1])) if paired else None
    replicates = draw(a, shared) - (0.0 if b is None else draw(b, shared))
    low, high = _percentiles(replicates, level)
    return Interval(float(a.mean() - (0.0 if b is None else b.mean())), float(low), float(high))


def upper_envelope(kl: np.ndarray, reward: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The best reward reached at KL ≤ each grid KL (NaN below the smallest KL reached)."""
    order = np.argsort(kl)
    best = np.maximum.accumulate(np.asarray(reward, float)[order])
    index = np.searchsorted(np.asarray(kl, float)[order], grid, side="right") - 1
    return np.where(index >= 0, best[np.maximum(index, 0)], np.nan)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run's evaluation points: per point, per-prompt rewards and KLs ([points, prompts]). `setting`
    names its hyperparameters (e.g. a β): the bootstrap redraws seeds within each setting, so every setting stays
    in each replicate's envelope."""

    family: str
    seed: int
    rewards: np.ndarray
    kls: np.ndarray
    setting: str = ""


@dataclasses.dataclass(frozen=True)
class EnvelopeGap:
    grid: np.ndarray
    gap: np.ndarray  # a's envelope − b's at each grid KL
    low: np.ndarray
    high: np.ndarray

    def share(self, verdict: str) -> float:
        """The fraction of the common range where a is `verdict` ("ahead", "behind", "level")."""
        ahead, behind = self.low > 0, self.high < 0
        mask = {"ahead": ahead, "behind": behind, "level": ~ahead & ~behind}[verdict]
        return float(np.mean(mask))


def envelope_gap(a: Sequence[Run], b: Sequence[Run], points: int = 201, samples: int = 1000, seed: int = 0,
                 level: float = LEVEL) -> EnvelopeGap | None:
    """a's envelope minus b's on a grid over the KL range both cover, each grid point with its bootstrap interval
    (each setting's seeds redrawn on each side, and the shared prompts); None when the ranges do not overlap."""
    def envelope_of(runs: Sequence[Run], prompts: np.ndarray | slice, grid: np.ndarray) -> np.ndarray:
        kl = np.concatenate([r.kls[:, prompts].mean(axis=1) for r in runs])
        reward = np.concatenate([r.rewards[:, prompts].mean(axis=1) for r in runs])
        return upper_envelope(kl, reward, grid)

    every = slice(None)
    kl_a = np.concatenate([r.kls.mean(axis=1) for r in a])
    kl_b = np.concatenate([r.kls.mean(axis=1) for r in b])
    lo, hi = max(kl_a.min(), kl_b.min()), min(kl_a.max(), kl_b.max())
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, points)
    gap = envelope_of(a, every, grid) - envelope_of(b, every, grid)
    rng = np.random.default_rng(seed)
    prompts = a[0].rewards.shape[1]
    if any(r.rewards.shape[1] != prompts or r.kls.shape != r.rewards.shape for r in (*a, *b)):
        raise ValueError("every run must be scored on the same prompts ([points, prompts] rewards and KLs)")
    settings_a, settings_b = _by_setting(a), _by_setting(b)
    replicates = np.empty((samples, points))
    for k in range(samples):
        drawn = rng.integers(0, prompts, prompts)
        runs_a = [runs[i] for runs in settings_a for i in rng.integers(0, len(runs), len(runs))]
        runs_b = [runs[i] for runs in settings_b for i in rng.integers(0, len(runs), len(runs))]
        replicates[k] = envelope_of(runs_a, drawn, grid) - envelope_of(runs_b, drawn, grid)
    low, high = _percentiles(replicates, level)
    return EnvelopeGap(grid, gap, low, high)


def _by_setting(runs: Sequence[Run]) -> list[list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.setting, []).append(run)
    return list(grouped.values())


def stretches(grid: np.ndarray, mask: np.ndarray) -> list[tuple[float, float]]:
    """The contiguous KL ranges (first and last grid KL) where mask holds."""
    out, start = [], None
    for i, on in enumerate(np.asarray(mask, bool)):
        if on and start is None:
            start = i
        if start is not None and (not on or i == len(mask) - 1):
            out.append((float(grid[start]), float(grid[i if on else i - 1])))
            start = None
    return out


def share_text(fraction: float) -> str:
    """A share of a range to one decimal, never rounded up to 100 % or down to 0 % when it is not exactly that."""
    percent = 100 * fraction
    if 0 < percent < 0.1:
        return "< 0.1 %"
    if 99.9 < percent < 100:
        return "> 99.9 %"
    return f"{percent:.1f} %"


def describe_gap(result: EnvelopeGap | None, names: tuple[str, str]) -> str:
    """The sentence results.md prints: where a is ahead, level and behind b (95 % intervals), every stretch named."""
    if result is None:
        return f"{names[0]} and {names[1]} cover no common KL range: no comparison at matched KL."
    ahead, behind = result.low > 0, result.high < 0
    parts = [f"On the KL range both cover ({result.grid[0]:.2f}–{result.grid[-1]:.2f} nats), {names[0]}'s envelope "
             f"is ahead of {names[1]}'s on {share_text(result.share('ahead'))} of it, level on "
             f"{share_text(result.share('level'))}, behind on {share_text(result.share('behind'))} (95 % bootstrap "
             "intervals over seeds and prompts)."]
    i = int(np.nanargmax(result.gap))
    parts.append(f"Largest gap in {names[0]}'s favour: {result.gap[i]:+.3f} [{result.low[i]:+.3f}, "
                 f"{result.high[i]:+.3f}] at KL {result.grid[i]:.2f}.")
    for label, mask in ((f"{names[1]} ahead", behind), (f"{names[0]} ahead", ahead)):
        found = stretches(result.grid, mask)
        if found:
            parts.append(f"Stretches with {label}: " + ", ".join(f"KL {lo:.2f}–{hi:.2f}" for lo, hi in found) + ".")
    return " ".join(parts)


def runs_from_points(points: Sequence[dict[str, Any]]) -> list[Run]:
    """Runs from per-point records {"family", "method", "seed", "rewards": [prompts], "kls": [prompts]} in step
    order (a run: one method, one seed; its setting: the method)."""
    grouped: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for p in points:
        grouped.setdefault((p["family"], p.get("method", ""), int(p["seed"])), []).append(p)
    return [Run(family, seed, np.asarray([p["rewards"] for p in group], float),
                np.asarray([p["kls"] for p in group], float), setting=method)
            for (family, method, seed), group in grouped.items()]
