"""The sentiment experiment's outputs: results.csv (every evaluated point), results.md (each method's final
point) and frontier.png (reward vs KL per method, cf. the DPO paper's Figure 2 left)."""

from __future__ import annotations

import csv
import os
from typing import Any

import ml_collections
import numpy as np


def write_results(c: ml_collections.ConfigDict, points: list[dict[str, Any]], vader_r: float) -> None:
    out = c.out_dir
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "step", "reward", "kl"])
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
        lines.append(f"| {name} | {p['step']} | {p['reward']:+.3f} | {p['reward'] - sft['reward']:+.3f} | "
                     f"{p['kl']:.3f} |")
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
        if len(pts) == 1:
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


