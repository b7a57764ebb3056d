"""Win-rate arithmetic and its outputs: outcomes → rate with a 95 % interval → winrate.csv / .md / .png.

An outcome is 1 (the candidate won), 0.5 (tie) or 0 (the baseline won); an invalid verdict (a judge reply that
names neither side) is NaN and is counted, reported and left out — never scored as a loss. The interval is
Wilson's score interval on the valid comparisons with ties as half a win: an outcome in {0, ½, 1} has at most a
coin flip's variance at the same mean, so the interval is conservative when there are ties.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def outcomes_from_scores(candidate: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Score judges: 1 where the candidate scores higher, 0.5 on equal scores, 0 below; NaN where either is NaN."""
    c, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    out = np.where(c > b, 1.0, np.where(c == b, 0.5, 0.0))
    return np.where(np.isnan(c) | np.isnan(b), np.nan, out)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (successes may be fractional: ties count half)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(outcomes: Iterable[float]) -> dict[str, float]:
    """{win_rate, low, high, wins, ties, losses, valid, invalid} from outcomes in {1, 0.5, 0, NaN}."""
    x = np.asarray(list(outcomes), np.float64)
    valid = x[~np.isnan(x)]
    bad = valid[(valid != 0) & (valid != 0.5) & (valid != 1)]
    if bad.size:
        raise ValueError(f"outcomes must be 1 (win), 0.5 (tie), 0 (loss) or NaN (invalid), got {bad[:3]}")
    n = int(valid.size)
    score = float(valid.sum())
    low, high = wilson_interval(score, n)
    return {"win_rate": score / n if n else float("nan"), "low": low, "high": high,
            "wins": int(np.sum(valid == 1)), "ties": int(np.sum(valid == 0.5)), "losses": int(np.sum(valid == 0)),
            "valid": n, "invalid": int(x.size - n)}


FIELDS = ("method", "temperature", "win_rate", "low", "high", "wins", "ties", "losses", "valid", "invalid")


def write_tables(rows: list[dict[str, Any]], out_dir: str, *, baseline: str, judge: str, name: str = "winrate"
                 ) -> None:
    """`name`.csv (every field) and `name`.md (one line per method, one column per temperature)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(markdown_table(rows, baseline=baseline, judge=judge) + "\n")


def markdown_table(rows: list[dict[str, Any]], *, baseline: str, judge: str) -> str:
    temps = sorted({r["temperature"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["temperature"]): r for r in rows}
    lines = [f"Win rate against {baseline}, judged by {judge} (ties count half; 95 % Wilson interval; invalid "
             "verdicts left out and counted).", "",
             "| method | " + " | ".join(f"T = {t:g}" for t in temps) + " | invalid |",
             "|---|" + "---|" * (len(temps) + 1)]
    for m in methods:
        cells = []
        for t in temps:
            r = by.get((m, t))
            cells.append("—" if r is None or r["valid"] == 0 else
                         f"{100 * r['win_rate']:.1f} % [{100 * r['low']:.0f}, {100 * r['high']:.0f}]")
        invalid = sum(by[(m, t)]["invalid"] for t in temps if (m, t) in by)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {invalid} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, *, title: str, labels: dict[str, str] | None = None,
         colours: dict[str, str] | None = None) -> None:
    """Win rate vs sampling temperature, one line per method with its interval shaded (the paper's Fig. 2 right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == m and r["valid"]), key=lambda r: r["temperature"])
        t = [r["temperature"] for r in mine]
        colour = (colours or {}).get(m)
        ax.plot(t, [r["win_rate"] for r in mine], marker="o", label=(labels or {}).get(m, m), color=colour)
        ax.fill_between(t, [r["low"] for r in mine], [r["high"] for r in mine], alpha=0.12, color=colour)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
