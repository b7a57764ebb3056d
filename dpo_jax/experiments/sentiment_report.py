"""The sentiment experiment's outputs: results.csv (every evaluated point), results.md (each method's final
point, the reward model, Best-of-N) and frontier.png (reward vs KL per method, cf. the DPO paper's Figure 2 left).
Best-of-N rows have `step` = N and the analytic KL log N − (N−1)/N."""

from __future__ import annotations

import csv
import os
from typing import Any

import ml_collections
import numpy as np


def write_results(c: ml_collections.ConfigDict, points: list[dict[str, Any]], vader_r: float,
                  reward_model: dict[str, float] | None = None,
                  over_optimization: list[dict[str, Any]] | None = None, more: list[str] | None = None) -> None:
    """results.csv, results.md (+ `more` lines: the win-rate sections), frontier.png, overoptimization.png."""
    out = c.out_dir
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "step", "reward", "kl", "rm_score"])
        w.writeheader()
        w.writerows(points)
    sft = next(p for p in points if p["method"] == "sft")
    dpo_betas = {name: m.dpo.beta for name, m in c.methods.items() if m.mode == "dpo" and family(name) == "DPO"
                 and name.startswith("dpo") and "beta" in m.dpo}
    final = {}
    for p in points:
        final[p["method"]] = p
    lines = ["# Sentiment experiment results", "",
             f"VADER compound vs mean human rating on the test split: Pearson r = {vader_r:.3f}.", "",
             "Final point of each method (mean VADER reward of completions on held-out prefixes; mean "
             "sequence-level KL(π‖π_SFT) over the sampled tokens):", "",
             "| method | steps | reward | Δ reward vs π_SFT | KL |", "|---|---|---|---|---|"]
    for name, p in final.items():
        if name != "best_of_n":
            lines.append(f"| {name} | {p['step']} | {p['reward']:+.3f} | {p['reward'] - sft['reward']:+.3f} | "
                         f"{p['kl']:.3f} |")
    lines += _rlhf_lines(c, points, sft, reward_model or {})
    lines += _matched_kl_lines(c, points)
    lines += more or []
    lines += ["", "Every evaluated point is in results.csv; frontier.png plots them by family."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_frontier(points, os.path.join(out, "frontier.png"))
    if over_optimization:
        plot_over_optimization(over_optimization, points, dpo_betas, os.path.join(out, "overoptimization.png"))


FAMILIES = (("ppo_gt", "PPO-GT"), ("ppo", "PPO"), ("best_of_n", "Best-of-N"), ("cdpo", "DPO"), ("ipo", "DPO"),
            ("dpo", "DPO"), ("unlikelihood", "Unlikelihood"), ("preferred_ft", "Preferred-FT"), ("sft", "π_SFT"))
COLORS = {"DPO": "tab:blue", "PPO": "tab:red", "PPO-GT": "tab:orange", "Best-of-N": "black",
          "Unlikelihood": "tab:green", "Preferred-FT": "tab:purple", "π_SFT": "black"}


def family(method: str) -> str:
    """A method's family on the frontier (cDPO and IPO are DPO-family markers, as in the paper)."""
    return next((f for prefix, f in FAMILIES if method.startswith(prefix)), method)


def envelope(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The upper envelope of (KL, reward) points: the best reward reached at KL ≤ each point's KL, as a staircase
    (KLs sorted ascending, running maximum)."""
    kl = np.asarray([p["kl"] for p in points], float)
    reward = np.asarray([p["reward"] for p in points], float)
    order = np.argsort(kl)
    return kl[order], np.maximum.accumulate(reward[order])


def _at(env: tuple[np.ndarray, np.ndarray], grid: np.ndarray) -> np.ndarray:
    kl, best = env
    index = np.searchsorted(kl, grid, side="right") - 1
    return np.where(index >= 0, best[np.maximum(index, 0)], np.nan)


def compare_envelopes(a: list[dict[str, Any]], b: list[dict[str, Any]], names: tuple[str, str]) -> str:
    """One sentence: where, on the KL range both families cover, a's envelope lies above b's, measured on a grid."""
    ea, eb = envelope(a), envelope(b)
    lo, hi = max(ea[0][0], eb[0][0]), min(ea[0][-1], eb[0][-1])
    if hi <= lo:
        return f"{names[0]} and {names[1]} cover no common KL range (theirs: {ea[0][0]:.2f}–{ea[0][-1]:.2f} and " \
               f"{eb[0][0]:.2f}–{eb[0][-1]:.2f} nats), so they cannot be compared at matched KL."
    grid = np.linspace(lo, hi, 401)
    diff = _at(ea, grid) - _at(eb, grid)
    above = float(np.mean(diff > 0))
    i, j = int(np.argmax(diff)), int(np.argmin(diff))
    text = (f"On the KL range both cover ({lo:.2f}–{hi:.2f} nats), {names[0]}'s envelope lies above {names[1]}'s on "
            f"{100 * above:.0f} % of it; the largest gap in {names[0]}'s favour is {diff[i]:+.3f} reward at KL "
            f"{grid[i]:.2f}")
    return text + (f", in {names[1]}'s favour {-diff[j]:+.3f} at KL {grid[j]:.2f}." if diff[j] < 0 else
                   f"; {names[1]}'s is nowhere above.")


def plot_frontier(points: list[dict[str, Any]], path: str) -> None:
    """Every evaluated point, coloured by family, each family's upper envelope drawn as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_family: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_family.setdefault(family(p["method"]), []).append(p)
    markers = {"cdpo": "^", "ipo": "s", "ppo_gt": "v", "best_of_n": "D"}
    for fam, pts in by_family.items():
        color = COLORS.get(fam, "gray")
        if fam == "π_SFT":
            ax.plot([pts[0]["kl"]], [pts[0]["reward"]], "k*", markersize=13, label="π_SFT", zorder=5)
            continue
        for p in pts:
            marker = next((m for prefix, m in markers.items() if p["method"].startswith(prefix)), "o")
            ax.plot(p["kl"], p["reward"], marker, color=color, markersize=4, alpha=0.55)
        kl, best = envelope(pts)
        ax.step(kl, best, where="post", color=color, linewidth=1.8, label=f"{fam} (envelope of {len(pts)} points)")
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats; Best-of-N: log N − (N−1)/N)")
    ax.set_ylabel("mean VADER reward on held-out prefixes")
    ax.set_title("Reward vs KL by method family (cf. DPO paper, Fig. 2 left); ▲ cDPO, ■ IPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_over_optimization(series: list[dict[str, Any]], points: list[dict[str, Any]], dpo_betas: dict[str, float],
                           path: str) -> None:
    """Left: PPO against the learned reward model — its score of the policy's held-out samples and their VADER
    reward over training. Right: DPO — its implicit reward β·(log π − log π_SFT) of the same kind of samples
    (β times the KL estimate) and their VADER reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ppo = [s for s in series if s["method"].startswith("ppo_") and not s["method"].startswith("ppo_gt")]
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(len(dpo_betas), 4)))
    for i, name in enumerate(dict.fromkeys(s["method"] for s in ppo)):
        pts = [s for s in ppo if s["method"] == name]
        left.plot([s["step"] for s in pts], [s["rm_score"] for s in pts], "--", color=colors[i], label=f"{name} RM")
        left.plot([s["step"] for s in pts], [s["reward"] for s in pts], "-o", color=colors[i], markersize=3,
                  label=f"{name} VADER")
    for i, (name, beta) in enumerate(dpo_betas.items()):
        pts = [p for p in points if p["method"] == name]
        right.plot([p["step"] for p in pts], [beta * p["kl"] for p in pts], "--", color=colors[i],
                   label=f"{name} implicit")
        right.plot([p["step"] for p in pts], [p["reward"] for p in pts], "-o", color=colors[i], markersize=3,
                   label=f"{name} VADER")
    left.set_title("PPO: learned-RM score (dashed) vs VADER (solid)")
    right.set_title("DPO: implicit reward β·KL (dashed) vs VADER (solid)")
    for ax in (left, right):
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    left.set_ylabel("mean reward of held-out samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rlhf_lines(c: ml_collections.ConfigDict, points: list[dict[str, Any]], sft: dict[str, Any],
                rm: dict[str, float]) -> list[str]:
    if not rm:
        return []
    lines = ["", "## Reward model (RLHF stage 2)", "",
             f"π_SFT's body + a score head, {c.reward_model.steps} Bradley-Terry steps on the same pairs and batches "
             "as every method.", "",
             "| measure | value |", "|---|---|",
             f"| held-out pair accuracy (π_SFT sample pairs on the held-out prefixes, ordered by VADER; "
             f"{rm['rm_heldout_pairs']} pairs) | {rm['rm_heldout_accuracy']:.3f} |",
             f"| Pearson r with VADER, those samples | {rm['rm_vader_r_samples']:.3f} |",
             f"| Pearson r with VADER, human-written test sentences | {rm['rm_vader_r_test']:.3f} |",
             f"| Pearson r with the human rating, test sentences | {rm['rm_human_r_test']:.3f} |"]
    bon = [p for p in points if p["method"] == "best_of_n"]
    if bon:
        lines += ["", "## Best-of-N from π_SFT, ranked by the reward model", "",
                  "One pass of N = " + str(bon[-1]["step"]) + " samples per held-out prefix; each smaller N is its "
                  "first N samples. KL is the analytic log N − (N−1)/N; reward is VADER of the picked completion.", "",
                  "| N | KL | reward | Δ reward vs π_SFT | mean reward-model score |", "|---|---|---|---|---|"]
        lines += [f"| {p['step']} | {p['kl']:.3f} | {p['reward']:+.3f} | {p['reward'] - sft['reward']:+.3f} | "
                  f"{p['rm_score']:+.3f} |" for p in bon]
    return lines


def _matched_kl_lines(c: ml_collections.ConfigDict, points: list[dict[str, Any]]) -> list[str]:
    by_family: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_family.setdefault(family(p["method"]), []).append(p)
    if "DPO" not in by_family or not ({"PPO", "PPO-GT"} & by_family.keys()):
        return []
    t = c.train
    lines = ["", "## DPO against PPO at matched KL", "",
             f"Budget, the same for every trained family: {t.steps} optimizer steps of {t.batch_pairs} sequences (DPO "
             f"and relatives: pairs) at learning rate {t.learning_rate:g}; PPO and PPO-GT run {t.steps // c.ppo.epochs}"
             f" iterations of {t.batch_pairs} sampled prompts x {c.ppo.epochs} epochs, at the DPO family's β grid "
             f"({', '.join(f'{b:g}' for b in c.ppo.betas)}) as their KL coefficient. Envelopes are over every "
             "evaluated point of a family (frontier.png); Best-of-N's KL is the analytic bound, the others' a "
             "Monte-Carlo estimate. Measured:", ""]
    for other in ("PPO", "PPO-GT", "Best-of-N"):
        if other in by_family:
            lines.append("- " + compare_envelopes(by_family["DPO"], by_family[other], ("DPO", other)))
    lines += ["", "overoptimization.png: PPO's learned-reward-model score of its held-out samples against their VADER "
              "reward over training, and DPO's implicit reward against VADER."]
    return lines
