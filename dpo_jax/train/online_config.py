"""The run config's `online` section: how `train.mode = "online_dpo"` samples and scores its pairs
(rlhf/online_dpo.py). Here, not there, because the run config (train/run.py) lives in this layer."""

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
