"""dpo-jax experiment sentiment --config configs/sentiment.py[:full]

The DPO paper's controlled-sentiment experiment (§6.1, Fig. 2) in miniature; dpo_jax/experiments/sentiment.py has
the stages. Default: DPO at β ∈ {0.05, 1}, PPO and PPO-GT by the adaptive KL controller at target KL ∈ {3, 9}, two
training seeds each (four runs per family), Best-of-N, and online DPO at DPO's two β (one seed each: the 12-minute
trade); 80 updates per run at equal ground-truth budgets (1,280 VADER labels behind DPO's pairs, PPO-GT's rollouts
and online DPO's own samples alike); learning rates as
configured (the default job does not sweep them; `:full` does, on validation prefixes). Output in runs/sentiment:
results.md, results.csv + outcomes.npz, budget.csv, frontier.png, winrate.png, winrate.md, winrate.csv,
generalization.csv, overoptimization.png, samples.jsonl, pairs.jsonl (docs/sentiment/ has a copy of a real run;
its results.md has the measured times per stage).

Expected (default; measured 10 min 30 s on 2 CPU cores from an empty cache, matmul peak 126 GFLOP/s): VADER vs
human ratings r = 0.450; π_SFT +0.113 on held-out prefixes; DPO β = 0.05 +0.419 (KL 9.5), β = 1 +0.205 (KL 0.9);
PPO target 3 / 9 +0.240 / +0.448 (KL 3.2 / 14.5); PPO-GT target 3 / 9 +0.317 / +0.471 (KL 3.4 / 8.3); online DPO
β = 0.05 / 1 +0.253 / +0.179 (KL 3.7 / 1.3); the reward model 0.584 on held-out pairs; at matched KL DPO level with
PPO, PPO-GT and Best-of-N on every shared range, ahead of online DPO on 12 % of theirs.

`:full`: every family at three seeds, the paper's four target KLs, four β (DPO and online DPO), TR-DPO, cDPO, IPO,
Unlikelihood and Preferred-FT, every family's learning rate (and the reward model's) chosen on validation prefixes, into
runs/sentiment_full; results in docs/sentiment/full/.
"""

import ml_collections

from dpo_jax.experiments.sentiment_config import default_config, method


def full_config() -> ml_collections.ConfigDict:
    """Every family at three seeds — DPO and online DPO at 4 β (the paper's 0.05, 0.1, 1, 5), PPO and PPO-GT at the
    paper's target KLs {3, 6, 9, 12}, TR-DPO at one setting, cDPO, IPO, Unlikelihood, Preferred-FT, Best-of-N to
    N = 64 — with every family's learning
    rate (and the reward model's) chosen on validation prefixes, evaluated every 20 updates. π_SFT, the pairs and
    the budget are the default's (1,280 VADER labels, 80 updates a run), so the default job's cached stages are
    reused and the two runs compare point for point."""
    c = default_config()
    c.out_dir = "runs/sentiment_full"
    c.seeds = (0, 1, 2)
    c.eval.every = 20
    c.best_of_n.ns = (1, 2, 4, 16, 64)
    c.ppo.targets = (3.0, 6.0, 9.0, 12.0)
    c.sweep.learning_rates = (1e-4, 3e-4, 1e-3)
    c.sweep.families = ("DPO", "PPO", "PPO-GT", "Online DPO", "TR-DPO", "cDPO", "IPO", "Unlikelihood", "Preferred-FT")
    c.reward_model.learning_rates = (3e-4, 1e-3, 3e-3)
    methods = {}
    for beta in (0.05, 0.1, 1.0, 5.0):
        methods[f"dpo_beta{beta:g}".replace('.', 'p')] = method("dpo", beta=beta)
        methods[f"online_dpo_beta{beta:g}".replace('.', 'p')] = method("online_dpo", beta=beta)
    # TR-DPO at one setting: TRL's default soft update (α = 0.6), every 20 of the 80 updates
    methods["tr_dpo_beta0p1"] = method("dpo", beta=0.1, ref_sync_every=20, ref_sync_alpha=0.6)
    methods["unlikelihood_alpha1"] = method("unlikelihood", unlikelihood_alpha=1.0)
    methods["cdpo_beta0p1"] = method("dpo", beta=0.1, label_smoothing=0.2)
    methods["ipo_beta0p1"] = method("dpo", loss_type="ipo", beta=0.1)
    methods["preferred_ft"] = method("sft")
    c.methods = ml_collections.ConfigDict(methods)
    return c


def get_config(arg=None):
    if arg in (None, "", "default"):
        return default_config()
    if arg == "full":
        return full_config()
    raise ValueError(f"configs/sentiment.py: unknown variant {arg!r}; use default or full")
