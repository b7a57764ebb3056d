"""Win-rate arithmetic and its outputs: outcomes → rate with a 95 % interval → winrate.csv / .md / .png.

An outcome is 1 (the candidate won), 0.5 (tie) or 0 (the baseline won); an invalid verdict (a judge reply that
names neither side) is NaN and is counted, reported and left out — never scored as a loss. The interval is
Wilson's score interval on the valid comparisons with ties as half a win: an outcome in {0, ½, 1} has at most a
coin flip's variance at the same mean, so the interval is conservative when there are ties.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from dpo_jax.evaluation.verdicts import order_rates

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclasses.dataclass
class Judged:
    """What a judge said of N comparisons: outcomes [N]; per comparison a record for completions.jsonl (what the
    judge was shown and answered); for the set, fields a win-rate row adds (failures, position bias)."""

    outcomes: np.ndarray
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def check_lengths(prompts: Sequence, candidates: Sequence, baselines: Sequence) -> None:
    if not len(prompts) == len(candidates) == len(baselines):
        raise ValueError(f"a comparison needs as many prompts, candidates and baselines; got {len(prompts)}, "
                         f"{len(candidates)}, {len(baselines)}")


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


ORDER_COUNTS = ("a_answers", "verdicts", "asked_twice", "both_valid", "flipped", "consistent", "consistent_wins")
FIELDS = ("method", "temperature", "win_rate", "low", "high", "wins", "ties", "losses", "valid", "invalid", "failed",
          "a_rate", "order_flips", "consistent_win_rate", "length", "baseline_length", "eos_rate",
          "lc_win_rate") + ORDER_COUNTS


def write_tables(rows: list[dict[str, Any]], out_dir: str, *, baseline: str, judge: str, name: str = "winrate",
                 differences: str = "") -> None:
    """`name`.csv (every field) and `name`.md (one line per method, one column per temperature; the length table;
    `differences`, a paired_differences text)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(markdown_table(rows, baseline=baseline, judge=judge) + "\n")
        lengths = length_table(rows)
        f.write("\n" + lengths + "\n" if lengths else "")
        f.write("\n" + differences + "\n" if differences else "")


def markdown_table(rows: list[dict[str, Any]], *, baseline: str, judge: str) -> str:
    """One line per method, one column per temperature, the method's invalid verdicts and failed requests; then,
    for a judge that was shown an order (the endpoint judge), its position bias per method."""
    temps = sorted({r["temperature"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["temperature"]): r for r in rows}

    def total(m: str, key: str) -> int:
        return sum(int(by[(m, t)].get(key, 0)) for t in temps if (m, t) in by)

    lines = [f"Win rate against {baseline}, judged by {judge} (ties count half; 95 % Wilson interval; invalid "
             "verdicts and failed requests left out and counted).", "",
             "| method | " + " | ".join(f"T = {t:g}" for t in temps) + " | invalid | failed |",
             "|---|" + "---|" * (len(temps) + 2)]
    for m in methods:
        cells = []
        for t in temps:
            r = by.get((m, t))
            cells.append("—" if r is None or r["valid"] == 0 else
                         f"{100 * r['win_rate']:.1f} % [{100 * r['low']:.0f}, {100 * r['high']:.0f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {total(m, 'invalid')} | {total(m, 'failed')} |")
    if any("a_rate" in r for r in rows):
        lines += ["", "Position bias (all temperatures): the share of verdicts that say A (½ if unbiased; the orders "
                  "are balanced), of comparisons asked in both orders the share whose winner flipped with the order, "
                  "and the win rate over the order-consistent ones.", "",
                  "| method | A answers | asked both orders | winner flipped | order-consistent win rate |",
                  "|---|---|---|---|---|"]
        for m in methods:
            counts = {k: sum(by[(m, t)][k] for t in temps if (m, t) in by) for k in ORDER_COUNTS}
            rates = order_rates(counts)
            kept = counts["consistent"]
            lines.append(f"| {m} | {_percent(rates['a_rate'])} | {counts['asked_twice']} | "
                         f"{_percent(rates['order_flips'])} | "
                         f"{_percent(rates['consistent_win_rate']) + f' of {kept}' if kept else '—'} |")
    return "\n".join(lines)


def _percent(x: float) -> str:
    return "—" if x != x else f"{100 * x:.1f} %"


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


# ----- length: like terms, and the win rate at equal lengths --------------------------------------------------------

def length_controlled_win_rate(outcomes: np.ndarray, candidate_lengths: np.ndarray, baseline_lengths: np.ndarray,
                               ridge: float = 1e-3) -> float:
    """The win rate at equal lengths, as AlpacaEval's length-controlled win rate estimates it: a logistic regression
    of the outcome (ties ½) on tanh(length difference / its standard deviation) with an intercept; the answer is
    sigmoid(intercept), the predicted win rate where the two responses are equally long. Invalid outcomes (NaN) are
    left out; a small ridge on the slope keeps it finite when length alone separates wins from losses."""
    y = np.asarray(outcomes, np.float64)
    d = np.asarray(candidate_lengths, np.float64) - np.asarray(baseline_lengths, np.float64)
    keep = ~np.isnan(y)
    y, d = y[keep], d[keep]
    if not y.size:
        return float("nan")
    scale = d.std() or 1.0
    x = np.stack([np.ones_like(d), np.tanh(d / scale)], 1)
    beta = np.zeros(2)
    penalty = np.diag([0.0, ridge * len(y)])
    for _ in range(100):  # Newton's method on the (convex) cross-entropy
        p = 1 / (1 + np.exp(-np.clip(x @ beta, -30, 30)))
        gradient = x.T @ (p - y) + penalty @ beta
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-np.clip(beta[0], -30, 30))))


def length_fields(outcomes: np.ndarray, candidate_lengths: np.ndarray, candidate_eos: np.ndarray,
                  baseline_lengths: np.ndarray) -> dict[str, float]:
    """A win-rate row's length columns: mean tokens of each side, the candidate's EOS rate (the share that ended
    before the budget), and the length-controlled win rate."""
    return {"length": float(np.mean(candidate_lengths)), "baseline_length": float(np.mean(baseline_lengths)),
            "eos_rate": float(np.mean(candidate_eos)),
            "lc_win_rate": length_controlled_win_rate(outcomes, candidate_lengths, baseline_lengths)}


def length_table(rows: list[dict[str, Any]]) -> str:
    """Per method and temperature: mean length against the baseline's, the EOS rate, raw and length-controlled win
    rate (markdown); '' when the rows carry no lengths."""
    rows = [r for r in rows if "length" in r]
    if not rows:
        return ""
    lines = ["Length (tokens; like terms: the baseline is cut to the policy's budget). LC: the length-controlled win "
             "rate, the win rate a logistic regression on the length difference predicts at equal lengths.", "",
             "| method | T | mean length (baseline) | EOS rate | win rate | LC win rate |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['temperature']:g} | {r['length']:.1f} ({r['baseline_length']:.1f}) | "
              f"{_percent(r['eos_rate'])} | {_percent(r['win_rate'])} | {_percent(r['lc_win_rate'])} |" for r in rows]
    return "\n".join(lines)


def paired_differences(records: list[dict[str, Any]], first: str) -> str:
    """Markdown: `first`'s win rate minus each other method's, per temperature, from the per-prompt outcomes (the
    records' `outcome` at `prompt_index`) — paired by prompt, prompts either side has no verdict for left out —
    with a 95 % bootstrap interval (intervals.difference_interval); "ahead" or "behind" only where it excludes 0.
    '' for one method."""
    from dpo_jax.evaluation.intervals import difference_interval

    outcomes: dict[tuple[str, float], dict[str, float]] = {}
    for r in records:
        outcomes.setdefault((r["method"], r["temperature"]), {})[r["prompt_index"]] = \
            float("nan") if r["outcome"] is None else r["outcome"]
    methods = list(dict.fromkeys(m for m, _ in outcomes))
    temps = sorted({t for _, t in outcomes})
    if first not in methods or len(methods) < 2:
        return ""
    lines = [f"Paired differences: {first}'s win rate minus each other method's against the same baseline, per "
             "temperature, in points (95 % paired bootstrap interval over prompts; prompts without a verdict on either "
             "side left out; \"ahead\"/\"behind\" only where the interval excludes 0).", "",
             "| method | " + " | ".join(f"T = {t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
    for other in (m for m in methods if m != first):
        cells = []
        for t in temps:
            mine, theirs = outcomes.get((first, t), {}), outcomes.get((other, t), {})
            prompts = [p for p in mine if p in theirs and not np.isnan(mine[p]) and not np.isnan(theirs[p])]
            if not prompts:
                cells.append("—")
                continue
            d = difference_interval(np.asarray([[mine[p] for p in prompts]]),
                                    np.asarray([[theirs[p] for p in prompts]]))
            cells.append(f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] {d.verdict}")
        lines.append(f"| {first} − {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
