"""The sentiment experiment's config (`dpo-jax experiment sentiment`; configs/sentiment.py adds `:full`) and its
`method` helper, in a module of their own so every stage can import them without importing the experiment."""

from __future__ import annotations

from typing import Any

import ml_collections

from dpo_jax.models.config import PRESETS


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/sentiment"
    c.cache_dir = ""  # empty: $DPO_JAX_CACHE or ~/.cache/dpo_jax
    c.seed = 0  # the data's: the corpus split, π_SFT, the pairs, the reward model
    # training seeds (the order of a method's batches, PPO's prompts and rollouts, the evaluation samples); a method
    # may name its own (`seeds` in its entry). One until the default job is re-timed with more (issue 30)
    c.seeds = (0,)
    c.vocab_size = 2048
    c.max_sentence_tokens = 40
    c.model = ml_collections.ConfigDict(PRESETS["gpt2-sentiment"])  # family and shape of π_SFT
    c.sft = ml_collections.ConfigDict(dict(steps=500, batch=32, learning_rate=2e-3))
    c.pairs = ml_collections.ConfigDict(dict(prefixes=512, samples_per_prefix=4, min_prefix=2, max_prefix=8,
                                             max_new_tokens=24, temperature=1.0))
    c.eval = ml_collections.ConfigDict(dict(prefixes=256, every=30, max_new_tokens=24))
    c.train = ml_collections.ConfigDict(dict(steps=120, batch_pairs=32, learning_rate=3e-4))
    # the RLHF baseline's reward model: π_SFT's body + a score head, Bradley-Terry on the same pairs and batches
    c.reward_model = ml_collections.ConfigDict(dict(steps=120, learning_rate=3e-4))
    # Best-of-N from π_SFT ranked by that reward model, on the held-out prefixes; one pass of max(ns) samples each
    c.best_of_n = ml_collections.ConfigDict(dict(ns=(1, 2, 4, 16, 64)))
    # PPO (learned reward model) and PPO-GT (VADER) at the DPO family's β grid, with every method's budget
    # (sentiment_ppo.py); evaluated every `eval_every` iterations
    c.ppo = ml_collections.ConfigDict(dict(betas=(0.05, 0.1, 1.0, 5.0), epochs=4, eval_every=8))
    # every final policy's win rate vs the human continuation per temperature, its reward and win rate on other
    # domains' prefixes, and the judges' agreement with human ratings (sentiment_winrate.py); prefixes = 0: off
    c.winrate = ml_collections.ConfigDict(dict(temperatures=(0.0, 0.25, 0.5, 0.75, 1.0), prefixes=128,
                                               domains=("amazon", "nyt", "tweets"), validation_pairs=2000))
    # every compared method, by name: its train.mode and the engine dpo-section fields it sets; all get the same
    # steps, batch, learning rate and evaluation (e.g. --config.methods.dpo_beta1.dpo.beta=2)
    c.methods = ml_collections.ConfigDict({
        "dpo_beta0p05": method("dpo", beta=0.05), "dpo_beta0p1": method("dpo", beta=0.1),
        "dpo_beta1": method("dpo", beta=1.0), "dpo_beta5": method("dpo", beta=5.0),
        "cdpo_beta0p1": method("dpo", seeds=(0,), beta=0.1, label_smoothing=0.2),
        "ipo_beta0p1": method("dpo", seeds=(0,), loss_type="ipo", beta=0.1),
        "unlikelihood_alpha0p1": method("unlikelihood", seeds=(0,), unlikelihood_alpha=0.1),
        "unlikelihood_alpha1": method("unlikelihood", seeds=(0,), unlikelihood_alpha=1.0),
        "preferred_ft": method("sft", seeds=(0,)),
    })
    return c


def method(mode: str, seeds: tuple[int, ...] = (), **dpo: Any) -> ml_collections.ConfigDict:
    """A compared method: train.mode (dpo, sft = Preferred-FT, unlikelihood), its training seeds (empty: the
    experiment's `seeds`) and the `dpo` config fields it sets (loss_type, beta, label_smoothing,
    unlikelihood_alpha, loss_kwargs ...; unset ones keep their defaults)."""
    return ml_collections.ConfigDict({"mode": mode, "seeds": tuple(seeds), "dpo": dpo})
