"""dpo-jax ppo --config configs/ppo_tldr.py --config.policy.path=/models/gptj-6b-sft-tldr --config.reward.model.path=/models/gptj-6b-rm-tldr --config.prompts.path=/data/summarize_from_feedback/comparisons

Expected: the DPO paper's TL;DR PPO baseline (§6.2, the RLHF pipeline DPO is compared with): GPT-J-6B fine-tuned on
the TL;DR reference summaries as π_SFT and π_ref, a GPT-J reward model trained on the comparisons
(`train.mode = reward`, exported with `dpo-jax export`), then PPO on the posts: objective/scores rising while
objective/kl grows toward the sweep's KL budget; sweep `--config.ppo.kl_coef` (or `--config.ppo.target_kl`) and
plot each run's reward against KL, as the paper's Figure 2 does.

Recipe: TRL's PPOConfig defaults, which its TL;DR example runs — responses of up to 53 tokens at temperature 0.7,
4 PPO epochs over each rollout batch in 1 minibatch, clip 0.2, value clip 0.2, vf_coef 0.1, γ = 1, λ = 0.95, a
fixed KL coefficient 0.05, missing-EOS penalty 1.0, AdamW lr 3e-6 — with 64 prompts per iteration, the value model
from the reward model, prompts from the comparisons' posts (`SUBREDDIT/TITLE/POST/TL;DR:`, the tldr format's
prompts), bf16 compute with FSDP over all devices. Not run here (no TPU pod).
"""

from dpo_jax.commands.ppo import default_config


def get_config(arg=None):
    c = default_config()
    c.policy.source, c.policy.dtype, c.policy.remat_policy = "hf", "bfloat16", "full"
    c.reward.kind, c.reward.model.source, c.reward.model.dtype = "model", "hf", "bfloat16"
    c.reward.model.remat_policy, c.value_init = "full", "reward"
    c.prompts.format, c.prompts.max_prompt_length = "tldr", 512
    c.ppo.max_new_tokens, c.ppo.temperature, c.ppo.missing_eos_penalty = 53, 0.7, 1.0
    c.train.steps, c.train.batch_prompts, c.train.save_every, c.train.run_dir = 1000, 64, 100, "runs/ppo_tldr"
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
