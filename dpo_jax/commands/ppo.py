"""`dpo-jax ppo --config configs/tiny.py:ppo`: PPO from an SFT policy against a reward model (RLHF stage 3), or
against a host reward function (PPO-GT), through the one Trainer.

Resumable like `dpo-jax train`: the run directory's latest checkpoint (policy, value model, the optimizer over both,
the KL coefficient, the prompt position) is restored and the run continues exactly; SIGTERM saves and exits 0; a
non-finite loss stops the run. The reward function sees whole texts (prompt + response, special tokens skipped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import sharding
from dpo_jax.data.pipeline import default_data_config
from dpo_jax.data.prompts import PromptLoader, encode_prompts, read_prompts
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.models import lora
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.reward import RewardScorer, as_reward_model
from dpo_jax.parsing import load_callable
from dpo_jax.rlhf.ppo import PPOConfig, Rollouts, build_ppo_engine, lora_value_config
from dpo_jax.train.compile_ahead import CompileAhead
from dpo_jax.train.model_source import default_model_config, model_with_head, pad_id, tokenizer_dir, with_adapters
from dpo_jax.train.run_dir import RunDirectory
from dpo_jax.train.state import default_optimizer_config
from dpo_jax.train.trainer import Trainer

REWARD_KINDS = ("model", "function")
VALUE_INITS = ("reward", "policy")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.policy = default_model_config()  # π_SFT: where the policy starts, and π_ref (never trained)
    # policy.lora.rank > 0: the policy and the value model train LoRA adapters (policy.lora's rank, alpha, targets;
    # the value head too) over frozen bases, and π_ref is the policy's base with the adapters off — no copy
    c.reward = ml_collections.ConfigDict(dict(kind="model", function="", model=default_model_config()))
    # kind = model: reward.model is a reward model (HF *ForSequenceClassification dir or a dpo_jax checkpoint);
    # kind = function: reward.function = "module:name" or "file.py:name", texts -> floats (PPO-GT)
    c.value_init = "reward"  # the value model starts as the reward model (TRL) or as the policy + a fresh head
    c.data = default_data_config()  # data.tokenizer (empty: the policy's dir) and, for bpe:N, data.train_path
    c.prompts = ml_collections.ConfigDict(dict(path="", format="auto", limit=0, max_prompt_length=64))
    c.ppo = ml_collections.ConfigDict(dict(
        epochs=4, minibatches=1, clip=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, kl_coef=0.05,
        target_kl=0.0, horizon=10000.0, whiten_rewards=False, missing_eos_penalty=0.0, max_new_tokens=53,
        temperature=0.7))  # TRL's PPOConfig defaults; target_kl > 0 turns on the adaptive controller
    c.train = ml_collections.ConfigDict(dict(steps=100, batch_prompts=16, seed=0, log_every=1, save_every=50,
                                             keep_checkpoints=2, run_dir="runs/ppo", tensorboard=True))
    c.optimizer = default_optimizer_config()
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "adamw", 3e-6, 0
    c.mesh = sharding.default_mesh_config()
    return c


def main(c: ml_collections.ConfigDict) -> dict[str, float]:
    # ----- tokenizer, models, mesh
    if c.reward.kind not in REWARD_KINDS or c.value_init not in VALUE_INITS:
        raise ValueError(f"config.reward.kind must be one of {REWARD_KINDS} and config.value_init one of "
                         f"{VALUE_INITS}; got {c.reward.kind!r}, {c.value_init!r}")
    tokenizer = load_tokenizer(c.data, tokenizer_dir(c.policy))
    mesh, rules = sharding.make_mesh(c.mesh), c.mesh.rules
    policy, load_policy = model_with_head(c.policy, len(tokenizer), "lm", "policy")
    reward = model_with_head(c.reward.model, len(tokenizer), "score", "reward.model") \
        if c.reward.kind == "model" else None
    function = load_callable(c.reward.function, "config.reward.function") if reward is None else None
    if c.value_init == "reward" and reward is None:
        raise ValueError("config.value_init = 'reward' needs a reward model (config.reward.kind = 'model'); use "
                         "value_init = 'policy' with a reward function")
    pad = pad_id(tokenizer)

    # ----- prompts and run directory
    t = c.train
    path = c.prompts.path or c.data.train_path
    ids, mask = encode_prompts(read_prompts(path, c.prompts.format, c.prompts.limit), tokenizer,
                               c.prompts.max_prompt_length, pad)
    directory = RunDirectory(t.run_dir, keep_checkpoints=t.keep_checkpoints, tensorboard=t.tensorboard)
    restored = directory.restore_extra(model=policy, kind="ppo")
    prompts = PromptLoader(ids, mask, t.batch_prompts, t.seed, None if restored is None else restored[0],
                           jax.process_index(), jax.process_count())

    # ----- engine: policy, value model, one optimizer, the PPO step
    p = c.ppo
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                              eos_id=tokenizer.eos_token_id, pad_id=pad)
    policy_params = load_policy()
    # π_ref = π_SFT, never trained: a copy, not a second load; a LoRA policy's reference is its own frozen base
    reference = None if policy.lora_rank else jax.tree.map(jnp.copy, policy_params)
    if c.value_init == "reward":
        value_config, value_params = reward[0], reward[1]()
        if policy.lora_rank:  # the value model trains adapters like the policy's (and its head) over a frozen base
            merged = lora.merged(value_params, value_config)  # a LoRA reward model's own adapters folded in
            value_config = lora_value_config(policy, value_config)
            value_params = with_adapters(value_config, lambda: merged, t.seed + 2)()
    else:
        value_config, value_params = as_reward_model(policy, policy_params, pad, jax.random.key(t.seed + 1))
    config = PPOConfig(model=policy, value_model=value_config, sampling=sampling, epochs=p.epochs,
                       minibatches=p.minibatches, clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef,
                       gamma=p.gamma, lam=p.lam, kl_coef=p.kl_coef, target_kl=p.target_kl, horizon=p.horizon,
                       whiten_rewards=p.whiten_rewards, seed=t.seed)
    engine = build_ppo_engine(config, c.optimizer, policy_params, value_params, mesh, rules)
    if reference is not None:
        reference = jax.device_put(reference, engine.param_shardings["policy"])
    state, start, window = engine.state, 0, None
    if restored is not None:
        state = directory.resume(engine.state)
        start, window = directory.latest, restored[1]

    # ----- the score of a rollout: the reward model's scoring pass, or the host function on texts
    if reward is not None:
        rm_config, load_rm = reward
        scorer = RewardScorer(rm_config, load_rm(), mesh, rules)

        def score(rows, row_mask, texts):
            return scorer.rows(rows, row_mask, len(rows))
    else:
        def score(rows, row_mask, texts):
            return np.asarray(function(texts), np.float32)

    def decode(rows, row_mask):
        return tokenizer.batch_decode([r[m == 1] for r, m in zip(rows, row_mask)], skip_special_tokens=True)

    ready = CompileAhead(engine.train_step, sharding.abstract(state),
                         engine.abstract_rollout(prompts.local * jax.process_count(), ids.shape[1])).wait \
        if start < t.steps else None
    rollout = Rollouts(engine, reference, score, decode, p.missing_eos_penalty, ready)
    try:
        trainer = Trainer(engine._replace(state=state), steps=t.steps, writer=directory.writer, name="ppo",
                          log_every=t.log_every, checkpoints=directory.checkpoints, save_every=t.save_every,
                          rollout=rollout)
        _, last = trainer.fit(state, prompts, start=start, window=window)
        return last
    finally:
        directory.close()
