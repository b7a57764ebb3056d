"""dpo-jax train --config configs/online_dpo_tldr.py --config.model.path=/models/pythia-2.8b-sft-tldr --config.online.reward_model.path=/models/pythia-2.8b-rm-tldr --config.data.train_path=/data/summarize_from_feedback/comparisons --config.data.eval_path=/data/summarize_from_feedback/comparisons_valid

Expected: online DPO on TL;DR as TRL's online-DPO recipe runs it (their figures, win rate against the reference
summaries with Pythia-2.8B: offline DPO 0.52, online DPO 0.75): objective/scores (the reward model's) rising and
objective/kl growing slowly over ~1 epoch of prompts, rewards/accuracies on the validation comparisons above 0.5.
Not run here (no accelerator); the CPU version of the same path is configs/tiny.py:online_dpo.

Recipe: a Pythia-2.8B SFT policy (π_ref: a resident copy of it), a Pythia-2.8B reward model scoring each sample
(HF *ForSequenceClassification or a dpo_jax reward checkpoint, e.g. from configs/rm_hh.py's recipe on TL;DR), two
samples a prompt (best vs worst), 53 new tokens at temperature 0.9, a 1.0 penalty for summaries without EOS,
β = 0.05, AdamW lr 5e-7, 64 prompts a step; prompts end in "TL;DR:", so truncation keeps their end; bf16 compute,
remat, FSDP over all devices.
"""

from dpo_jax.commands.train import default_run_config


def get_config(arg=None):
    c = default_run_config()
    c.model.source, c.model.dtype, c.model.remat_policy, c.model.scan_layers = "hf", "bfloat16", "full", True
    c.train.mode = "online_dpo"
    c.data.format, c.data.layout, c.data.max_length, c.data.max_prompt_length, c.data.truncation_mode = \
        "tldr", "pairs", 640, 512, "keep_end"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.dpo.loss_type, c.dpo.beta, c.dpo.reference = "sigmoid", 0.05, "per_batch"
    o = c.online
    o.samples_per_prompt, o.max_new_tokens, o.temperature, o.missing_eos_penalty = 2, 53, 0.9, 1.0
    o.reward_kind, o.reward_model.source, o.reward_model.dtype = "model", "hf", "bfloat16"
    c.train.global_batch_pairs, c.train.steps, c.train.log_every, c.train.save_every = 64, 1450, 10, 250
    c.train.eval_every, c.train.run_dir = 250, "runs/online_dpo_tldr_pythia-2.8b"
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "adamw", 5e-7, 0
    return c
