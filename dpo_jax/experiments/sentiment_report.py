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
    series = over_optimization_series(c, points, sft) if not np.isnan(sft["rm_score"]) else {}
    lines += over_optimization_lines(series, sft) if series else []
    lines += more or []
    lines += ["", "Every evaluated point is in results.csv, its per-prompt outcomes in outcomes.npz (same row order; "
              "`sentiment_points.read_points` reads both); frontier.png plots them by family."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_frontier(points, os.path.join(out, "frontier.png"))
    if series:
        plot_over_optimization(series, points, os.path.join(out, "overoptimization.png"))


COLORS = {"DPO": "tab:blue", "PPO": "tab:red", "PPO-GT": "tab:orange", "PPO (fixed β)": "tab:pink",
          "PPO-GT (fixed β)": "gold", "Best-of-N": "black", "cDPO": "tab:cyan",
          "IPO": "tab:brown", "Unlikelihood": "tab:green", "Preferred-FT": "tab:purple", "π_SFT": "black",
          "Online DPO": "tab:olive", "TR-DPO": "navy"}


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
             "| method | family | seeds | steps | reward | Δ reward vs π_SFT [95 %] | verdict | KL | RM score |",
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
    markers = {"cDPO": "^", "IPO": "s", "PPO-GT": "v", "Best-of-N": "D", "PPO (fixed β)": "x", "PPO-GT (fixed β)": "+",
               "Online DPO": "P", "TR-DPO": "h"}
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


def _units(sft: dict[str, Any]) -> tuple[float, float]:
    """π_SFT's per-prompt standard deviations of VADER and of the reward model's score: the standardized units."""
    def sd(x: np.ndarray) -> float:  # NaN when undefined (no reward model; no spread)
        return float(x.std()) if not np.isnan(x).any() and x.std() > 0 else float("nan")

    return sd(np.asarray(sft["outcomes"]["vader"])), sd(np.asarray(sft["outcomes"]["rm_score"]))


def over_optimization_series(c: ml_collections.ConfigDict, points: list[dict[str, Any]], sft: dict[str, Any]
                             ) -> dict[str, dict[str, list[float]]]:
    """Per PPO / PPO-GT / DPO setting, over training (means over seeds): the VADER gain over π_SFT and the gain
    of the reward being optimized — PPO's learned reward-model score, DPO's implicit reward β·(log π − log π_SFT),
    whose mean over π's samples is β·KL — all in standardized units: VADER in π_SFT's per-prompt VADER standard
    deviations, the reward model's score and DPO's implicit reward in π_SFT's per-prompt reward-model standard
    deviations (both are Bradley-Terry logits fit to the same pairs, so one unit serves both)."""
    vader_sd, rm_sd = _units(sft)
    betas = {name: m.dpo.beta for name, m in c.methods.items() if family(name) == "DPO" and "beta" in m.dpo}
    out = {}
    for name in dict.fromkeys(p["method"] for p in points if p["family"] in ("PPO", "PPO-GT", "DPO")):
        pts = [p for p in points if p["method"] == name]
        steps, vader = _mean_by_step(pts, "reward")
        if pts[0]["family"] == "DPO":
            optimized = [betas.get(name, float("nan")) * k / rm_sd for k in _mean_by_step(pts, "kl")[1]]
        else:
            optimized = [(r - sft["rm_score"]) / rm_sd for r in _mean_by_step(pts, "rm_score")[1]]
        out[name] = {"steps": steps, "vader": [(v - sft["reward"]) / vader_sd for v in vader],
                     "optimized": optimized}
    return out


def over_optimization_lines(series: dict[str, dict[str, list[float]]], sft: dict[str, Any]) -> list[str]:
    vader_sd, rm_sd = _units(sft)
    lines = ["", "## Over-optimization, in standardized units", "",
             f"Gains over π_SFT at each setting's last evaluation (means over seeds): the reward the method "
             f"optimizes — PPO's learned reward model (PPO-GT's too, for comparison), DPO's implicit reward β·KL — in "
             f"π_SFT's per-prompt reward-model standard deviations ({rm_sd:.3f}; the implicit reward and the "
             f"reward model are both Bradley-Terry logits on the same pairs), and the ground truth in π_SFT's "
             f"per-prompt VADER standard deviations ({vader_sd:.3f}). A proxy gain far above the VADER gain is "
             "over-optimization (overoptimization.png: over training).", "",
             "| method | updates | optimized reward's gain (sd) | VADER gain (sd) |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['steps'][-1]} | {s['optimized'][-1]:+.2f} | {s['vader'][-1]:+.2f} |"
              for name, s in series.items()]
    return lines


def plot_over_optimization(series: dict[str, dict[str, list[float]]], points: list[dict[str, Any]],
                           path: str) -> None:
    """Left: PPO and PPO-GT, the learned reward model's score (dashed) and VADER (solid) over training. Right:
    DPO, its implicit reward (dashed) and VADER (solid). Standardized units (over_optimization_series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fams = {p["method"]: p["family"] for p in points}
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(len(series), 4)))
    for i, (name, s) in enumerate(series.items()):
        ax = right if fams[name] == "DPO" else left
        ax.plot(s["steps"], s["optimized"], "--", color=colors[i],
                label=f"{name} {'implicit' if ax is right else 'RM'}")
        ax.plot(s["steps"], s["vader"], "-o", color=colors[i], markersize=3, label=f"{name} VADER")
    left.set_title("PPO: learned-RM score (dashed) vs VADER (solid)")
    right.set_title("DPO: implicit reward β·KL (dashed) vs VADER (solid)")
    for ax in (left, right):
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    left.set_ylabel("gain over π_SFT (π_SFT's per-prompt standard deviations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rlhf_lines(c: ml_collections.ConfigDict, points: list[dict[str, Any]], sft: dict[str, Any],
                rm: dict[str, float]) -> list[str]:
    if not rm:
        return []
    sweep = rm["rm_sweep"]
    chosen = (f"learning rate {rm['rm_learning_rate']:g}, the best of {len(sweep)} by validation pair accuracy "
              "(below)" if len(sweep) > 1 else f"learning rate {rm['rm_learning_rate']:g} as configured")
    lines = ["", "## Reward model (RLHF stage 2)", "",
             f"π_SFT's body + a score head, {c.reward_model.steps} Bradley-Terry steps on the same pairs and batches "
             f"as every method; {chosen}. Validation: {c.pairs.samples_per_prefix} π_SFT samples of each "
             "validation prefix, every pair of them ordered by VADER (ties left out) — prefixes the test never "
             "uses.", "",
             "| measure | value |", "|---|---|",
             f"| validation pair accuracy ({rm['rm_validation_pairs']} pairs) | "
             f"{rm['rm_validation_accuracy']:.3f} |",
             f"| held-out pair accuracy (π_SFT sample pairs on the held-out prefixes, ordered by VADER; "
             f"{rm['rm_heldout_pairs']} pairs) | {rm['rm_heldout_accuracy']:.3f} |",
             f"| Pearson r with VADER, those samples | {rm['rm_vader_r_samples']:.3f} |",
             f"| Pearson r with VADER, human-written test sentences | {rm['rm_vader_r_test']:.3f} |",
             f"| Pearson r with the human rating, test sentences | {rm['rm_human_r_test']:.3f} |"]
    if len(sweep) > 1:
        lines += ["", "| reward-model learning rate | validation pair accuracy | |", "|---|---|---|"]
        lines += [f"| {r['learning_rate']:g} | {r['validation_accuracy']:.3f} | "
                  f"{'**chosen**' if r['learning_rate'] == rm['rm_learning_rate'] else ''} |" for r in sweep]
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
             f"Budget: {t.steps} optimizer updates for every trained family — DPO and relatives of {t.batch_pairs} "
             f"pairs ({2 * t.batch_pairs} sequences); PPO and PPO-GT of {c.ppo.rollouts // c.ppo.minibatches} "
             f"sequences, {t.steps // (c.ppo.epochs * c.ppo.minibatches)} iterations of {c.ppo.rollouts} rollouts x "
             f"{c.ppo.epochs} epochs x {c.ppo.minibatches} minibatch(es)"
             + (f"; online DPO of at most {c.online.prompts} pairs, each the best and the worst of "
                f"{c.online.samples_per_prompt} samples of a prompt from the current policy, labelled by VADER"
                if "Online DPO" in present else "") + " (the equal-terms table counts every "
             "label and sample); learning rates as chosen below. PPO and PPO-GT run the paper's "
             f"protocol: the adaptive KL controller (from coefficient {c.ppo.init_kl_coef:g}, horizon "
             f"{c.ppo.horizon:g} episodes) toward each target KL ({', '.join(f'{x:g}' for x in c.ppo.targets)})"
             + (f", plus fixed coefficients {', '.join(f'{x:g}' for x in c.ppo.betas)}" if c.ppo.betas else "")
             + ". Runs (settings × seeds): "
             + ", ".join(f"{f} {n}" for f, n in runs.items() if f != "π_SFT") + ". A family's envelope is over "
             "every evaluated point of its runs (frontier.png); DPO's holds plain DPO only (cDPO, IPO, online DPO and "
             "TR-DPO are their own families). Best-of-N's KL is the analytic bound, the others' a Monte-Carlo "
             "estimate. Gaps are measured on a grid over the KL range both families cover, each with a 95 % "
             "bootstrap interval (each setting's seeds and the shared prompts redrawn): \"ahead\" only where the "
             "interval excludes 0.", ""]
    dpo = runs_of(points, "DPO")
    for other in ("PPO", "PPO-GT", "Best-of-N", "Online DPO", "TR-DPO", "cDPO", "IPO"):
        if other in present:
            lines.append("- " + intervals.describe_gap(intervals.envelope_gap(dpo, runs_of(points, other)),
                                                       ("DPO", other)))
    return lines
