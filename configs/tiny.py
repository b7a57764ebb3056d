"""dpo-jax train --config configs/tiny.py[:MODE] [--config.train.run_dir=runs/tiny]

Expected (MODE=dpo, ~15 seconds on 2 CPU cores): first train loss 0.6931 (= ln 2, the policy is its own reference),
eval rewards/accuracies rising from ~0.5 to ~1.0 by step 60, checkpoints at steps 30 and 60 in the run directory,
and policy samples written to samples.jsonl. Re-running the same command resumes (here: finds the run finished).

A tiny CPU run of the whole pipeline on configs/data/tiny_hh (256 synthetic HH dialogues in which polite,
on-topic answers are preferred; regenerate with configs/data/make_tiny_hh.py): a 512-token byte-level BPE trained
on the data, a 2-layer GPT-2-shaped model from random init, the cached reference pass, logging, eval, sampling
and checkpoints. MODE: dpo (default), sft (Preferred-FT), unlikelihood, reward (a Bradley-Terry reward model:
eval accuracy 1.0 and loss < 1e-4 by step 30, as the tiny data's preference is easy; no samples), lora (DPO on
rank-8 adapters of every projection, the reference = the base with the adapters off, computed in the step), or
any preference loss type (ipo, hinge, ...), which trains DPO with that loss.

MODE online_dpo (`dpo-jax train --config configs/tiny.py:online_dpo`, ~1 min): online DPO — each step samples 4
completions for each of 16 prompts from the current policy, scores them with `polite_reward` below, and takes a DPO
step on the best vs the worst (rlhf/online_dpo.py). Expected: objective/kl 0 at step 1, objective/scores rising as
the policy learns the polite answers' words, rewards/accuracies above 0.5; checkpoints at steps 10, 20, 30.

MODE iterative_dpo (`dpo-jax train --config configs/tiny.py:iterative_dpo`): iterative DPO — two rounds, each
sampling 4 completions for 64 prompts from the current policy, labelling best vs worst with `polite_reward`, and
training 8 DPO steps on those pairs (rlhf/iterative_dpo.py); RUN_DIR/round_*/pairs.jsonl and policy/. Expected:
round 1's pairs scored higher on average than round 0's (the log line's mean score).

MODE best_of_n is the config of `dpo-jax best-of-n` (another schema: commands/best_of_n.py) for the RLHF
baseline on the same data, after an SFT policy and a reward model from it:
  dpo-jax train --config configs/tiny.py:sft && dpo-jax export --run runs/tiny_sft --to-hf runs/tiny_sft_hf
  dpo-jax train --config configs/tiny.py:reward --config.model.source=hf --config.model.path=runs/tiny_sft_hf \
      --config.data.tokenizer= && dpo-jax export --run runs/tiny_reward --to-hf runs/tiny_reward_hf
  dpo-jax best-of-n --config configs/tiny.py:best_of_n
Expected: rewards.md with the mean reward-model score of the pick rising with N (1, 2, 4, 8).

MODE ppo is the config of `dpo-jax ppo --config configs/tiny.py:ppo` (commands/ppo.py): PPO from the random tiny
policy against `polite_reward` below (a host reward function, as PPO-GT uses one), ~25 s. Expected: objective/kl 0
at step 1 and growing to ~10, objective/scores rising from ~0.17 to ~0.7 as the policy learns the polite answers'
words; checkpoints at steps 10, 20 and 30.
"""

import os

from dpo_jax.commands.train import default_run_config
from dpo_jax.losses import loss_types
from dpo_jax.models.config import PRESETS

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_hh")


POLITE = ("sure", "happy", "help", "good", "question", "usually", "typically", "the", "blue", "green", "yellow",
          "white", "orange", "black", "red", "beige", "purple")
CURT = ("idea", "why", "care", "look", "yourself", "colours", "boring")


def polite_reward(texts):
    """The tiny PPO reward of a whole dialogue text: in its last answer, occurrences of words of the data's polite
    answers minus those of its curt answers, per 10 characters (dense, so PPO learns it in seconds)."""
    out = []
    for text in texts:
        answer = text.rsplit("Assistant:", 1)[-1].lower()
        hits = sum(answer.count(w) for w in POLITE) - sum(answer.count(w) for w in CURT)
        out.append(10.0 * hits / max(len(answer), 10))
    return out


def ppo_config():
    from dpo_jax.commands.ppo import default_config

    c = default_config()
    c.policy.source, c.policy.max_position_embeddings = "random", 128
    c.policy.update(PRESETS["gpt2-tiny"])
    c.reward.kind, c.reward.function, c.value_init = "function", f"{os.path.abspath(__file__)}:polite_reward", \
        "policy"
    c.data.tokenizer, c.data.train_path = "bpe:512", os.path.join(DATA, "train.jsonl")
    c.prompts.max_prompt_length = 48
    c.ppo.max_new_tokens, c.ppo.temperature = 16, 1.0
    c.train.steps, c.train.batch_prompts, c.train.save_every, c.train.run_dir = 30, 16, 10, "runs/tiny_ppo"
    c.optimizer.learning_rate = 3e-3
    return c


def best_of_n_config():
    from dpo_jax.commands.best_of_n import default_config

    c = default_config()
    c.policy.source, c.policy.path = "hf", "runs/tiny_sft_hf"
    c.reward_model.source, c.reward_model.path = "hf", "runs/tiny_reward_hf"
    c.prompts.path, c.prompts.limit, c.prompts.max_prompt_length = os.path.join(DATA, "eval.jsonl"), 16, 48
    c.n, c.ns = 8, (1, 2, 4, 8)
    c.sampling.max_new_tokens, c.batch_rows = 16, 64
    c.out_dir = "runs/tiny_best_of_n"
    return c


def get_config(arg=None):
    mode = arg or "dpo"
    if mode == "best_of_n":
        return best_of_n_config()
    if mode == "ppo":
        return ppo_config()
    c = default_run_config()
    c.model.source = "random"
    c.model.update(PRESETS["gpt2-tiny"])
    c.model.max_position_embeddings = 128
    c.data.train_path = os.path.join(DATA, "train.jsonl")
    c.data.eval_path = os.path.join(DATA, "eval.jsonl")
    c.data.tokenizer = "bpe:512"
    c.data.max_length, c.data.max_prompt_length = 64, 48
    c.mesh.data = -1
    c.train.global_batch_pairs = 16
    c.train.steps, c.train.log_every, c.train.save_every, c.train.eval_every = 60, 10, 30, 30
    c.train.eval_samples, c.train.sample_max_new_tokens = 2, 16
    c.train.run_dir = f"runs/tiny_{mode}"
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "adamw", 3e-3, 0
    if mode in ("sft", "unlikelihood", "reward"):
        c.train.mode = mode
        if mode == "reward":
            c.train.eval_samples = 0  # a reward model scores; it does not sample
    elif mode == "lora":  # DPO training LoRA adapters only; the reference is the base with the adapters off
        c.model.lora.rank, c.model.lora.alpha = 8, 16.0
        c.model.lora.targets = ("q", "k", "v", "o", "fc_in", "fc_out")
        c.dpo.reference, c.dpo.beta = "base", 0.1
        c.optimizer.learning_rate = 1e-2
    elif mode == "online_dpo":  # pairs sampled from the policy each step, scored by polite_reward (best vs worst)
        c.train.mode, c.data.layout, c.dpo.reference, c.dpo.beta = "online_dpo", "pairs", "per_batch", 0.1
        c.online.samples_per_prompt, c.online.max_new_tokens, c.online.temperature = 4, 16, 1.0
        c.online.reward_kind, c.online.reward_function = "function", f"{os.path.abspath(__file__)}:polite_reward"
        c.train.steps, c.train.save_every, c.train.eval_every, c.train.eval_samples = 30, 10, 0, 0
    elif mode == "iterative_dpo":  # 2 rounds: sample 64 prompts x 4 from the policy, polite_reward labels, DPO
        c.iterative.rounds, c.iterative.prompts_per_round, c.iterative.steps_per_round = 2, 64, 8
        c.online.samples_per_prompt, c.online.max_new_tokens, c.online.temperature = 4, 16, 1.0
        c.online.reward_kind, c.online.reward_function = "function", f"{os.path.abspath(__file__)}:polite_reward"
        c.train.eval_samples, c.train.save_every, c.train.log_every = 0, 8, 4
    elif mode == "dpo" or mode in loss_types():
        c.dpo.loss_type = "sigmoid" if mode == "dpo" else mode
        c.dpo.beta = 0.1
    else:
        raise ValueError(f"configs/tiny.py: unknown MODE {mode!r}; use dpo, sft, unlikelihood, reward, lora, "
                         "online_dpo, iterative_dpo, best_of_n, ppo or a loss type")
    return c
