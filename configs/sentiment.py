"""dpo-jax experiment sentiment --config configs/sentiment.py[:full]

Expected (default; measured 11 min 53 s on 2 CPU cores from an empty cache, with fetching the corpus archive from the
package index — two runs, identical results): VADER vs human ratings r = 0.450 on the test split; π_SFT's mean
reward on held-out prefixes +0.160; DPO β = 0.1 at +0.574 (KL 9.4 nats), β = 1 at +0.297 (KL 1.2), Preferred-FT
+0.247; PPO β = 0.05 +0.567 (KL 10.1), PPO-GT β = 0.05 +0.491 (KL 5.8); win rate against the human continuation
(VADER) at temperature 0 / 1: π_SFT 40 % / 48 %, DPO β = 0.05 98 % / 80 %, PPO β = 0.05 79 % / 81 %, PPO-GT
β = 0.05 83 % / 75 %;
runs/sentiment/{results.md, results.csv, frontier.png, winrate.png, winrate.md, winrate.csv,
generalization.csv, overoptimization.png, samples.jsonl, pairs.jsonl} (docs/sentiment/ has a copy).

The DPO paper's controlled-sentiment experiment (§6.1, Fig. 2) in miniature; see dpo_jax/experiments/sentiment.py
for the stages. `:full` runs the paper's whole sweep — DPO, PPO and PPO-GT at β ∈ {0.05, 0.1, 0.25, 0.5, 1, 2, 5},
Unlikelihood at α ∈ {0.1, 0.3, 1, 3}, cDPO, IPO, Preferred-FT and Best-of-N — with a longer-trained π_SFT, twice
the pairs, 200-step runs and 256 win-rate prefixes, into runs/sentiment_full; results in docs/sentiment/full/.
"""

import ml_collections

from dpo_jax.experiments.sentiment_config import default_config, method


def full_config() -> ml_collections.ConfigDict:
    """The paper's whole sweep — DPO, PPO and PPO-GT at 7 β, Unlikelihood at 4 α, cDPO, IPO, Preferred-FT, Best-of-N
    — with a longer-trained π_SFT, twice the pairs and longer runs, at the default model size (a CPU job)."""
    c = default_config()
    c.out_dir = "runs/sentiment_full"
    c.sft.steps = 1000
    c.pairs.prefixes = 1024
    c.eval.prefixes, c.eval.every = 256, 40
    c.train.steps = c.reward_model.steps = 200
    c.winrate.prefixes = 256
    betas = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
    c.ppo.betas, c.ppo.eval_every = betas, 10  # PPO and PPO-GT at the same 7 β: 50 iterations x 4 epochs each
    methods = {}
    for beta in betas:
        methods[f"dpo_beta{str(beta).replace('.', 'p')}"] = method("dpo", beta=beta)
    for alpha in (0.1, 0.3, 1.0, 3.0):
        methods[f"unlikelihood_alpha{str(alpha).replace('.', 'p')}"] = method("unlikelihood", unlikelihood_alpha=alpha)
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
