"""dpo-jax train --config configs/rm_hh.py:model=pythia-2.8b --config.model.path=/models/sft_hh_pythia-2.8b --config.data.train_path=/data/hh-rlhf/train.jsonl.gz --config.data.eval_path=/data/hh-rlhf/test.jsonl.gz

Expected: RLHF stage 2 for the DPO paper's HH baseline — a Bradley-Terry reward model initialized from the SFT
policy of configs/sft_hh.py (exported with `dpo-jax export`; its LM head is dropped and a score head added), trained
on the same HH preference pairs; eval accuracy rises from ~0.5 (the usual range for HH reward models of this size
is 0.6-0.7). Export with `dpo-jax export --run runs/rm_hh_pythia-2.8b --to-hf OUT`: OUT loads with
`AutoModelForSequenceClassification` and serves Best-of-N (`dpo-jax best-of-n`) and PPO.

Recipe: one epoch (~2,500 steps of 64 pairs; reward models overfit after one, Stiennon et al. 2020), AdamW lr 1e-5
with 150 warmup steps, gradient-norm clip 10, max_length 512 / max_prompt_length 256, the default packed layout
(several pairs a row, each pair's prompt once: one row gives both scores of every pair in it; a token budget derived
from the data for 64 pairs a step on average — 3.5x TRL's RewardTrainer end to end on the bench's HH-shaped lengths,
docs/PERFORMANCE.md), bf16 compute with float32 params, FSDP over all devices. Not run here (no TPU pod).
ARG: model=pythia-1.4b|pythia-2.8b|pythia-6.9b (micro-batching as configs/sft_hh.py).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_sft_hh", os.path.join(os.path.dirname(__file__), "sft_hh.py"))
_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft)


def get_config(arg=None):
    c = _sft.hh_config(arg, "reward", "rm_hh")
    c.train.eval_samples = 0  # a reward model scores; it does not sample
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "adamw", 1e-5, 150
    return c
