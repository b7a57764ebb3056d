"""dpo-jax experiment sentiment --config configs/sentiment.py[:full]

Expected (default, ~6 minutes on 2 CPU cores after the install, the first run fetching the 2.4 MB corpus archive
from the package index): VADER vs human ratings r = 0.450 on the test split; π_SFT's mean reward on held-out
prefixes near +0.18; DPO (β = 0.1) raising it well above that at a KL of a few to ~10 nats, larger β staying closer
to π_SFT; runs/sentiment/{results.md, results.csv, frontier.png, samples.jsonl, pairs.jsonl}.

The DPO paper's controlled-sentiment experiment (§6.1, Fig. 2 left) in miniature; see
dpo_jax/experiments/sentiment.py for the stages. `:full` runs the whole β/α sweep at a larger scale.
"""

from dpo_jax.experiments.sentiment import default_config, full_config


def get_config(arg=None):
    if arg in (None, "", "default"):
        return default_config()
    if arg == "full":
        return full_config()
    raise ValueError(f"configs/sentiment.py: unknown variant {arg!r}; use default or full")
