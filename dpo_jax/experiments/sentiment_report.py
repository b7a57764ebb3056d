"""The sentiment experiment's outputs: results.csv and outcomes.npz (every evaluated point, its per-prompt outcomes:
sentiment_points.py), results.md (each method's final points over its seeds, the reward model, Best-of-N, the
families' envelopes compared at matched KL with 95 % intervals: evaluation/intervals.py) and frontier.png (reward vs
KL per family, cf. the DPO paper's Figure 2 left). Best-of-N rows have `step` = N and the analytic KL
log N − (N−1)/N."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from dpo_jax.evaluation import intervals
from dpo_jax.experiments.sentiment_points import family, write_points


def write_results(c: ml_collections.ConfigDict, points: list[dict[str, Any]], vader_r: float,
                  reward_model: dict[str, float] | None = None, more: list[str] | None = None) -> None:
    """results.csv + outcomes.npz, results.md (+ `more` lines: the win-rate sections), frontier.png,
    overoptimization.png."""
    out = c.out_dir
    write_points(out, points)
    sft = next(p for p in points if p["method"] == "sft")
    lines = ["# Sentiment experiment results", "",
             f"VADER compound vs mean human rating on the test split: Pearson r = {vader_r:.3f}.", ""]
    lines += final_lines(points, sft)
    lines += _rlhf_lines(c, points, sft, reward_model or {})
    lines += _matched_kl_lines(c, points)
    lines += more or []
    lines += ["", "Every evaluated point is in results.csv, its per-prompt outcomes in outcomes.npz (same row order; "
              "`sentiment_points.read_points` reads both); frontier.png plots them by family."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_frontier(points, os.path.join(out, "frontier.png"))
    if any(p["family"] in ("PPO", "DPO") for p in points):
        plot_over_optimization(c, points, os.path.join(out, "overoptimization.png"))


COLORS = {"DPO": "tab:blue", "PPO": "tab:red", "PPO-GT": "tab:orange", "Best-of-N": "black", "cDPO": "tab:cyan",
          "IPO": "tab:brown", "Unlikelihood": "tab:green", "Preferred-FT": "tab:purple", "π_SFT": "black"}


def final_points(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each trained method's last point of every seed (Best-of-N and π_SFT left out)."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        if p["family"] not in ("Best-of-N", "π_SFT"):
            last[p["method"], p["seed"]] = p
    out: dict[str, list[dict[str, Any]]] = {}
    for (method, _), p in last.items():
        out.setdefault(method, []).append(p)
    return out


def final_lines(points: list[dict[str, Any]], sft: dict[str, Any]) -> list[str]:
    """The final-point table: per method, means over its seeds and the reward gain over π_SFT with its 95 %
    interval (bootstrap over seeds and prompts, paired by prompt)."""
    lines = ["Final point of each method (mean VADER reward of completions on held-out prefixes; mean sequence-level "
             "KL(π‖π_SFT) over the sampled tokens; the learned reward model's score of the same completions), "
             "averaged over its training seeds. Δ reward: against π_SFT on the same prefixes, with a 95 % interval "
             "(bootstrap over seeds and prompts); \"ahead\" only where it excludes 0.", "",
             f"| method | family | seeds | steps | reward | Δ reward vs π_SFT [95 %] | verdict | KL | RM score |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| sft | π_SFT | 1 | 0 | {sft['reward']:+.3f} | — | — | {sft['kl']:.3f} | {_rm(sft['rm_score'])} |"]
    base = np.asarray(sft["outcomes"]["vader"])[None]
    for method, finals in final_points(points).items():
        gain = intervals.difference_interval(np.stack([p["outcomes"]["vader"] for p in finals]), base)
        lines.append(f"| {method} | {finals[0]['family']} | {len(finals)} | {finals[0]['step']} | "
                     f"{np.mean([p['reward'] for p in finals]):+.3f} | {gain.text()} | {gain.verdict} | "
                     f"{np.mean([p['kl'] for p in finals]):.3f} | {_rm(np.mean([p['rm_score'] for p in finals]))} |")
    return lines


def _rm(score: float) -> str:
    return "—" if np.isnan(score) else f"{score:+.3f}"


def runs_of(points: list[dict[str, Any]], name: str) -> list[intervals.Run]:
    """A family's runs (one per method and seed) with their per-prompt outcomes, for intervals.envelope_gap."""
    return intervals.runs_from_points([{**p, "rewards": p["outcomes"]["vader"], "kls": p["outcomes"]["kl"]}
                                       for p in points if p["family"] == name])


def _staircase(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    kl = np.sort([p["kl"] for p in points])
    return kl, intervals.upper_envelope(np.asarray([p["kl"] for p in points]),
                                        np.asarray([p["reward"] for p in points]), kl)


def plot_frontier(points: list[dict[str, Any]], path: str) -> None:
    """Every evaluated point (every seed), coloured by family, each family's upper envelope as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_family: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_family.setdefault(p["family"], []).append(p)
    markers = {"cDPO": "^", "IPO": "s", "PPO-GT": "v", "Best-of-N": "D"}
    for fam, pts in by_family.items():
        color = COLORS.get(fam, "gray")
        if fam == "π_SFT":
            ax.plot([pts[0]["kl"]], [pts[0]["reward"]], "k*", markersize=13, label="π_SFT", zorder=5)
            continue
        ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], markers.get(fam, "o"), color=color,
                markersize=4, alpha=0.55)
        kl, best = _staircase(pts)
        runs = len({(p["method"], p["seed"]) for p in pts})
        ax.step(kl, best, where="post", color=color, linewidth=1.8,
                label=f"{fam} (envelope of {len(pts)} points, {runs} runs)")
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats; Best-of-N: log N − (N−1)/N)")
    ax.set_ylabel("mean VADER reward on held-out prefixes")
    ax.set_title("Reward vs KL by method family (cf. DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_by_step(points: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps = sorted({p["step"] for p in points})
    return steps, [float(np.mean([p[key] for p in points if p["step"] == s])) for s in steps]


def plot_over_optimization(c: ml_collections.ConfigDict, points: list[dict[str, Any]], path: str) -> None:
    """Left: PPO against the learned reward model — its score of the policy's held-out samples and their VADER
    reward over training. Right: DPO — its implicit reward β·(log π − log π_SFT) of the same kind of samples
    (β times the KL estimate) and their VADER reward. Each line: a setting's mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    betas = {name: m.dpo.beta for name, m in c.methods.items() if family(name) == "DPO" and "beta" in m.dpo}
    ppo = [p for p in points if p["family"] == "PPO"]
    names = list(dict.fromkeys(p["method"] for p in ppo))
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(len(betas), len(names), 4)))
    for i, name in enumerate(names):
        pts = [p for p in ppo if p["method"] == name]
        left.plot(*_mean_by_step(pts, "rm_score"), "--", color=colors[i], label=f"{name} RM")
        left.plot(*_mean_by_step(pts, "reward"), "-o", color=colors[i], markersize=3, label=f"{name} VADER")
    for i, (name, beta) in enumerate(betas.items()):
        pts = [p for p in points if p["method"] == name]
        if not pts:
            continue
        steps, kl = _mean_by_step(pts, "kl")
        right.plot(steps, [beta * k for k in kl], "--", color=colors[i], label=f"{name} implicit")
        right.plot(*_mean_by_step(pts, "reward"), "-o", color=colors[i], markersize=3, label=f"{name} VADER")
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
        base = np.asarray(sft["outcomes"]["vader"])[None]
        lines += ["", "## Best-of-N from π_SFT, ranked by the reward model", "",
                  "One pass of N = " + str(bon[-1]["step"]) + " samples per held-out prefix; each smaller N is its "
                  "first N samples, and N = 1 is π_SFT's own evaluation (the same samples). KL is the analytic "
                  "log N − (N−1)/N; reward is VADER of the picked completion; Δ with its 95 % interval over "
                  "prompts.", "",
                  "| N | KL | reward | Δ reward vs π_SFT [95 %] | mean reward-model score |", "|---|---|---|---|---|"]
        for p in bon:
            gain = intervals.difference_interval(np.asarray(p["outcomes"]["vader"])[None], base)
            lines.append(f"| {p['step']} | {p['kl']:.3f} | {p['reward']:+.3f} | {gain.text()} | "
                         f"{p['rm_score']:+.3f} |")
    return lines


def _matched_kl_lines(c: ml_collections.ConfigDict, points: list[dict[str, Any]]) -> list[str]:
    present = dict.fromkeys(p["family"] for p in points)
    if "DPO" not in present or not ({"PPO", "PPO-GT"} & present.keys()):
        return []
    t = c.train
    runs = {f: len({(p["method"], p["seed"]) for p in points if p["family"] == f}) for f in present}
    lines = ["", "## DPO against the others at matched KL", "",
             f"Budget, the same for every trained family: {t.steps} optimizer steps of {t.batch_pairs} sequences (DPO "
             f"and relatives: pairs) at learning rate {t.learning_rate:g}; PPO and PPO-GT run {t.steps // c.ppo.epochs}"
             f" iterations of {t.batch_pairs} sampled prompts x {c.ppo.epochs} epochs, at the DPO family's β grid "
             f"({', '.join(f'{b:g}' for b in c.ppo.betas)}) as their KL coefficient. Runs (settings × seeds): "
             + ", ".join(f"{f} {n}" for f, n in runs.items() if f != "π_SFT") + ". A family's envelope is over "
             "every evaluated point of its runs (frontier.png); DPO's holds plain DPO only (cDPO and IPO are their "
             "own families). Best-of-N's KL is the analytic bound, the others' a Monte-Carlo estimate. Gaps are "
             "measured on a grid over the KL range both families cover, each with a 95 % bootstrap interval (each "
             "setting's seeds and the shared prompts redrawn): \"ahead\" only where the interval excludes 0.", ""]
    dpo = runs_of(points, "DPO")
    for other in ("PPO", "PPO-GT", "Best-of-N", "cDPO", "IPO"):
        if other in present:
            lines.append("- " + intervals.describe_gap(intervals.envelope_gap(dpo, runs_of(points, other)),
                                                       ("DPO", other)))
    lines += ["", "overoptimization.png: PPO's learned-reward-model score of its held-out samples against their VADER "
              "reward over training, and DPO's implicit reward against VADER."]
    return lines
