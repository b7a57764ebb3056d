"""dpo-jax train --config configs/dpo_tldr.py --config.model.path=/models/gpt-j-6b-sft-tldr --config.data.train_path=/data/summarize_from_feedback/comparisons --config.data.eval_path=/data/summarize_from_feedback/comparisons_valid

Expected: the DPO paper's TL;DR summarisation run — rewards/accuracies rising to ~0.65-0.7 on the validation
comparisons within one epoch (~1,450 steps of 64 pairs); sampled summaries in samples.jsonl.

Recipe (paper §6): GPT-J-6B SFT model as policy and (precomputed) reference, DPO β = 0.5, batch 64 pairs,
RMSprop lr 1e-6 with 150 warmup steps, clip 10. Prompts end in "TL;DR:", so truncation keeps their end.
bf16 compute, remat, FSDP over all devices, 4 micro-batches.
"""

from dpo_jax.commands.train import default_run_config


def get_config(arg=None):
    c = default_run_config()
    c.model.source, c.model.dtype, c.model.remat_policy, c.model.scan_layers = "hf", "bfloat16", "full", True
    c.data.format, c.data.max_length, c.data.max_prompt_length, c.data.truncation_mode = "tldr", 640, 512, \
        "keep_end"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dpo.loss_type, c.dpo.beta = "sigmoid", 0.5
    c.train.global_batch_pairs, c.train.micro_batches = 64, 4
    c.train.steps, c.train.log_every, c.train.save_every, c.train.eval_every = 1450, 10, 250, 250
    c.train.eval_samples, c.train.sample_max_new_tokens = 8, 64
    c.train.run_dir = "runs/dpo_tldr_gptj"
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "rmsprop", 1e-6, 150
    return c
