"""dpo-jax experiment sentiment --config configs/sentiment.py[:full]

The DPO paper's controlled-sentiment experiment (§6.1, Fig. 2) in miniature; dpo_jax/experiments/sentiment.py has
the stages. Default: DPO at β ∈ {0.05, 1}, PPO and PPO-GT by the adaptive KL controller at target KL ∈ {3, 9}, two
training seeds each (four runs per family), and Best-of-N; 80 updates per run at equal
ground-truth budgets (1,280 VADER labels behind DPO's pairs and PPO-GT's rollouts alike); learning rates as
configured (the default job does not sweep them; `:full` does, on validation prefixes). Output in runs/sentiment:
results.md, results.csv + outcomes.npz, budget.csv, frontier.png, winrate.png, winrate.md, winrate.csv,
generalization.csv, overoptimization.png, samples.jsonl, pairs.jsonl (docs/sentiment/ has a copy of a real run;
its results.md has the measured times per stage).

Expected (default; measured 11 min 39 s on 2 CPU cores from an empty cache, matmul peak 166 GFLOP/s): VADER vs
human ratings r = 0.450; π_SFT +0.113 on held-out prefixes; DPO β = 0.05 +0.419 (KL 9.5), β = 1 +0.205 (KL 0.9);
PPO target 3 +0.240 (KL 5.6); PPO-GT target 3 / 9 +0.439 / +0.718 (KL 5.5 / 17.9); the reward model at chance on
held-out pairs (0.497); at matched KL DPO level with PPO-GT on 84 % of the shared range, behind on 16 %.

`:full`: every family at three seeds, the paper's four target KLs, five β, cDPO and IPO, every family's learning
rate swept on validation prefixes, into runs/sentiment_full; results in docs/sentiment/full/.
"""

import ml_collections

from dpo_jax.experiments.sentiment_config import default_config, method


def full_config() -> ml_collections.ConfigDict:
    """Every family at three seeds — DPO at 5 β, PPO and PPO-GT at the paper's target KLs {3, 6, 9, 12}, cDPO,
    IPO, Unlikelihood at 2 α, Preferred-FT, Best-of-N — with every family's learning rate chosen on validation
    prefixes, a longer-trained π_SFT and longer runs at equal ground-truth budgets (480 prefixes x 4 samples =
    1,920 VADER labels = PPO-GT's 30 iterations x 64 rollouts), at the default model size (a CPU job)."""
    c = default_config()
    c.out_dir = "runs/sentiment_full"
    c.seeds = (0, 1, 2)
    c.sft.steps = 1000
    c.pairs.prefixes = 480
    c.eval.prefixes, c.eval.every = 256, 40
    c.train.steps = c.reward_model.steps = 120
    c.winrate.prefixes = 256
    c.best_of_n.ns = (1, 2, 4, 16, 64)
    c.ppo.targets = (3.0, 6.0, 9.0, 12.0)
    c.sweep.learning_rates = (1e-4, 3e-4, 1e-3)
    c.sweep.families = ("DPO", "PPO", "PPO-GT", "cDPO", "IPO", "Unlikelihood", "Preferred-FT")
    methods = {}
    for beta in (0.05, 0.1, 0.5, 1.0, 5.0):
        methods[f"dpo_beta{beta:g}".replace('.', 'p')] = method("dpo", beta=beta)
    for alpha in (0.1, 1.0):
        methods[f"unlikelihood_alpha{alpha:g}".replace('.', 'p')] = method("unlikelihood", unlikelihood_alpha=alpha)
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
