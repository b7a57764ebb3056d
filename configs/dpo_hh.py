"""dpo-jax train --config configs/dpo_hh.py:model=pythia-2.8b --config.model.path=/models/pythia-2.8b-sft-hh --config.data.train_path=/data/hh-rlhf/train.jsonl.gz --config.data.eval_path=/data/hh-rlhf/test.jsonl.gz

Expected: the DPO paper's Anthropic HH run — train rewards/accuracies climbing to ~0.6-0.7 and rewards/margins
growing over ~2,500 steps, eval likewise; policy and reference samples in samples.jsonl every 250 steps.

Recipe (paper §6): DPO β = 0.1 from the SFT model of configs/sft_hh.py (also the reference, precomputed once),
batch 64 pairs, RMSprop lr 1e-6 with 150 warmup steps, grad-norm clip 10, max_length 512 / prompt 256, keep_end.
The batch is 64 pairs on average (packed rows under a token budget derived from the data: the fast default);
`--config.train.exact_pairs=True` gives exactly 64 every step, as the paper's code does.
ARG: model=pythia-1.4b|pythia-2.8b|pythia-6.9b, and `lora` (e.g. `configs/dpo_hh.py:model=pythia-6.9b,lora`):
rank-16 adapters (alpha 32) on the attention and MLP projections, the frozen base held in bfloat16, the reference
= the base with the adapters off (no second copy, no tables), lr 5e-6 (adapters need a higher rate than full
fine-tuning's 1e-6; not tuned here).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_sft_hh", os.path.join(os.path.dirname(__file__), "sft_hh.py"))
_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft)


def get_config(arg=None):
    items = [a for a in (arg or "").split(",") if a]
    use_lora = "lora" in items
    c = _sft.hh_config(",".join(a for a in items if a != "lora"), "dpo", "dpo_hh" + ("_lora" if use_lora else ""))
    c.dpo.loss_type, c.dpo.beta, c.dpo.reference = "sigmoid", 0.1, "precompute"
    if use_lora:
        c.model.lora.rank, c.model.lora.alpha = 16, 32.0
        c.model.lora.targets = ("q", "k", "v", "o", "fc_in", "fc_out")  # Pythia (GPT-NeoX): a GELU MLP
        c.model.param_dtype = "bfloat16"  # the frozen base; adapters are float32
        c.dpo.reference = "base"
        c.optimizer.learning_rate = 5e-6
    return c
