"""dpo-jax train --config configs/dpo_hh.py:model=pythia-2.8b --config.model.path=/models/pythia-2.8b-sft-hh --config.data.train_path=/data/hh-rlhf/train.jsonl.gz --config.data.eval_path=/data/hh-rlhf/test.jsonl.gz

Expected: the DPO paper's Anthropic HH run — train rewards/accuracies climbing to ~0.6-0.7 and rewards/margins
growing over ~2,500 steps, eval likewise; policy and reference samples in samples.jsonl every 250 steps.

Recipe (paper §6): DPO β = 0.1 from the SFT model of configs/sft_hh.py (also the reference, precomputed once),
batch 64 pairs, RMSprop lr 1e-6 with 150 warmup steps, grad-norm clip 10, max_length 512 / prompt 256, keep_end.
ARG: model=pythia-1.4b|pythia-2.8b|pythia-6.9b.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_sft_hh", os.path.join(os.path.dirname(__file__), "sft_hh.py"))
_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft)


def get_config(arg=None):
    c = _sft.hh_config(arg, "dpo", "dpo_hh")
    c.dpo.loss_type, c.dpo.beta, c.dpo.reference = "sigmoid", 0.1, "precompute"
    return c
