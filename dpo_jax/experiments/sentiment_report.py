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
                  reward_model: dict[str, float] | None = None) -> None:
    out = c.out_dir
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "step", "reward", "kl", "rm_score"])
        w.writeheader()
        w.writerows(points)
    sft = next(p for p in points if p["method"] == "sft")
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
    lines += ["", "Every evaluated point is in results.csv; frontier.png plots them."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(p["method"] for p in points))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # distinct colours for up to 20 methods (the default cycles at 10)
    for i, name in enumerate(names):
        pts = [p for p in points if p["method"] == name]
        if name == "best_of_n":
            ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], "kD--", markersize=5,
                    label=f"best-of-N (N = {', '.join(str(p['step']) for p in pts)})")
            for p in pts:
                ax.annotate(str(p["step"]), (p["kl"], p["reward"]), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
        elif len(pts) == 1:
            ax.plot([pts[0]["kl"]], [pts[0]["reward"]], "k*", markersize=12, label=name)
        else:
            ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], "os^D"[i % 4] + "-", color=colors[i % 20],
                    markersize=4, label=name)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats)")
    ax.set_ylabel("mean VADER reward")
    ax.set_title("Reward vs KL on held-out prefixes (cf. DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
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
