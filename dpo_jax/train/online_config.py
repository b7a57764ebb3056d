"""The run config's `online` section — how `train.mode = "online_dpo"` samples and scores its pairs
(rlhf/online_dpo.py) — and `iterative` (rlhf/iterative_dpo.py), which samples and scores the same way. Here, not
there, because the run config (train/run.py) lives in this layer."""

from __future__ import annotations

import ml_collections

from dpo_jax.train.model_source import default_model_config


def default_online_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.samples_per_prompt = 2  # k >= 2 completions a prompt; its pair is the best and the worst
    c.max_new_tokens = 53  # TRL's OnlineDPOConfig default
    c.temperature = 0.9  # TRL's default
    c.missing_eos_penalty = 0.0  # subtracted from the score of a sample that did not end (TRL's option)
    # what scores a sample: "function" (reward_function = "module:name" / "file.py:name", texts -> floats) or
    # "model" (reward_model: a reward model, an HF *ForSequenceClassification dir or a dpo_jax checkpoint)
    c.reward_kind = "function"
    c.reward_function = ""
    c.reward_model = default_model_config()
    return c


def default_iterative_config() -> ml_collections.ConfigDict:
    """`iterative.rounds > 0`: iterative DPO (rlhf/iterative_dpo.py), sampling and scoring as `online` says."""
    c = ml_collections.ConfigDict()
    c.rounds = 0  # 0: an ordinary run
    c.prompts_per_round = 256  # train-split prompts sampled each round (a draw seeded by train.seed and the round)
    c.steps_per_round = 0  # 0: one epoch of the round's pairs
    c.reference = "initial"  # initial: π_ref stays the first policy | previous: each round's own starting policy
    return c
