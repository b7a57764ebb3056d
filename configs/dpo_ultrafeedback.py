"""dpo-jax train --config configs/dpo_ultrafeedback.py:model=qwen2.5-7b --config.model.path=/models/qwen2.5-7b-sft --config.data.train_path=/data/ultrafeedback_binarized/train_prefs --config.data.eval_path=/data/ultrafeedback_binarized/test_prefs

Expected: the common modern recipe (Zephyr-style) — one epoch over ~61k UltraFeedback pairs (~480 steps of 128),
train rewards/accuracies ~0.75 and rising margins; chat-template-rendered samples in samples.jsonl.

Recipe: DPO β = 0.01, AdamW lr 5e-7, 10% linear warmup then cosine decay, batch 128 pairs, max_length 1024 /
prompt 512, the tokenizer's chat template (conversational data), bf16 compute, remat, FSDP over all devices.
ARG: model=qwen2.5-7b|llama-3-8b (the family only changes the run name; the checkpoint decides the architecture).
"""

from dpo_jax.commands.train import default_run_config
from dpo_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, {"model": "qwen2.5-7b"}, "configs/dpo_ultrafeedback.py")
    if a["model"] not in ("qwen2.5-7b", "llama-3-8b"):
        raise ValueError(f"configs/dpo_ultrafeedback.py: model={a['model']!r}; valid: qwen2.5-7b, llama-3-8b")
    c = default_run_config()
    c.model.source, c.model.dtype, c.model.remat_policy, c.model.scan_layers = "hf", "bfloat16", "full", True
    c.data.format, c.data.max_length, c.data.max_prompt_length = "ultrafeedback", 1024, 512
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dpo.loss_type, c.dpo.beta = "sigmoid", 0.01
    c.train.global_batch_pairs, c.train.micro_batches = 128, 8
    c.train.steps, c.train.log_every, c.train.save_every, c.train.eval_every = 480, 5, 100, 100
    c.train.eval_samples, c.train.sample_max_new_tokens = 8, 256
    c.train.run_dir = f"runs/dpo_ultrafeedback_{a['model']}"
    c.optimizer.name, c.optimizer.learning_rate = "adamw", 5e-7
    c.optimizer.warmup_steps, c.optimizer.schedule, c.optimizer.total_steps = 48, "cosine", 480
    c.optimizer.weight_decay = 0.0
    return c
