"""A `dpo-jax ppo` run planned on a TPU topology: the policy, value and reward models built as `ppo` builds them,
with abstract parameters, and its programs compiled — the rollout's generation, the reward model's scoring pass,
the reference/value pass and the PPO update. Memory, fits, collectives and compile time as for a train run; no
time estimate (the decode loop's trip count and the update's epoch loop are not visible to the compiler's cost
analysis, and the train-run variants do not carry over)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax.compile_target import compiling_for
from dpo_jax.flops import train_step_flops
from dpo_jax.models.decoder import init_params, logical_axes
from dpo_jax.models.generate import SamplingConfig, _generate_jit
from dpo_jax.models.reward import make_scorer, reward_model_config
from dpo_jax.plan.chips import chip_of
from dpo_jax.plan.programs import compile_program, per_device_bytes
from dpo_jax.plan.run_plan import ProgramPlan, section_model
from dpo_jax.rlhf.ppo import PPOConfig, build_ppo_engine, lora_value_config
from dpo_jax.sharding import abstract, batch_sharding, make_mesh, param_shardings


def is_ppo_config(c: ml_collections.ConfigDict) -> bool:
    return "ppo" in c and "policy" in c


def _abstract(config, mesh, rules) -> Any:
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return abstract(shapes, param_shardings(logical_axes(config), shapes, mesh, rules))


def _as_score_model(config):
    return config if config.head == "score" else reward_model_config(config, 0)


def plan_ppo(c: ml_collections.ConfigDict, devices: list[Any]) -> tuple[dict[str, ProgramPlan], dict[str, Any]]:
    chip = chip_of(devices[0])
    mesh, rules = make_mesh(c.mesh, devices), c.mesh.rules
    policy = section_model(c.policy, c.data)[0]
    if policy.head != "lm":
        raise ValueError("config.policy is a reward model (score head); PPO's policy needs a language-model head")
    reward = _as_score_model(section_model(c.reward.model, c.data)[0]) if c.reward.kind == "model" else None
    value = reward if c.value_init == "reward" and reward is not None else _as_score_model(policy)
    if policy.lora_rank:  # as commands/ppo.py: the value model trains the policy's adapters over a frozen base
        value = lora_value_config(policy, value)
    p = c.ppo
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, eos_id=0, pad_id=0)
    config = PPOConfig(model=policy, value_model=value, sampling=sampling, epochs=p.epochs, minibatches=p.minibatches,
                       clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef, gamma=p.gamma, lam=p.lam,
                       kl_coef=p.kl_coef, target_kl=p.target_kl, horizon=p.horizon, whiten_rewards=p.whiten_rewards,
                       seed=c.train.seed)
    with compiling_for("tpu"):
        engine = build_ppo_engine(config, c.optimizer, _abstract(policy, mesh, rules), _abstract(value, mesh, rules),
                                  mesh, rules, abstract_state=True)
    b, prompt, new = c.train.batch_prompts, c.prompts.max_prompt_length, p.max_new_tokens
    rows2 = batch_sharding(mesh, rules, 2)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = jax.ShapeDtypeStruct((b, prompt), jnp.int32, sharding=rows2)
    full = jax.ShapeDtypeStruct((b, prompt + new), jnp.int32, sharding=rows2)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=replicated)
    temperatures = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=replicated)
    params = engine.state.params
    reference = None if config.base_reference else params["policy"]  # π_ref: a copy of π_SFT's shape
    static = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_id=0, pad_id=0)
    programs = {  # name: (lower, abstract arguments)
        "generate": (functools.partial(_generate_jit.lower, config=policy, s=static),
                     (params["policy"], ids, ids, keys, temperatures)),
        "rollout_stats": (engine.rollout_stats.lower, (params, reference, full, full, new)),
        "ppo_update": (engine.train_step.lower, (engine.state, engine.abstract_rollout(b, prompt))),
    }
    reward_params = None
    if reward is not None:
        reward_params = _abstract(reward, mesh, rules)
        scorer = make_scorer(reward, mesh, rules, jax.tree.map(lambda x: x.sharding, reward_params))
        programs["reward_score"] = (scorer.lower, (reward_params, full, full))

    state_bytes = per_device_bytes(engine.state)
    reference_bytes = per_device_bytes(reference) if reference is not None else 0
    reward_bytes = per_device_bytes(reward_params) if reward_params is not None else 0
    everything = state_bytes + reference_bytes + reward_bytes
    arguments = {"generate": per_device_bytes(params["policy"]), "rollout_stats": per_device_bytes(params) +
                 reference_bytes, "ppo_update": state_bytes, "reward_score": reward_bytes}
    tokens = b * (prompt + new)
    forward = train_step_flops(policy, b, prompt + new) / 3
    model_flops = {"generate": forward, "rollout_stats": forward + train_step_flops(value, b, prompt + new) / 3,
                   "ppo_update": p.epochs * (3 * forward + train_step_flops(value, b, prompt + new)),
                   "reward_score": 0.0 if reward is None else train_step_flops(reward, b, prompt + new) / 3}
    plans = {}
    for name, (lower, args) in programs.items():
        with compiling_for("tpu"):
            compiled = compile_program(lower, *args)
        plans[name] = ProgramPlan(name, compiled, everything - arguments[name], chip.hbm_bytes, model_flops[name],
                                  tokens=tokens)
    info = {"devices": len(devices), "chip": chip.name, "device_kind": devices[0].device_kind,
            "hbm_bytes": chip.hbm_bytes, "peak_tflops_per_device": chip.peak_tflops, "mesh": dict(mesh.shape),
            "model": {"family": policy.family, "layers": policy.num_layers, "hidden_size": policy.hidden_size,
                      "vocab_size": policy.vocab_size, "parameters": sum(
                          x.size for x in jax.tree.leaves(params["policy"])), "lora_rank": policy.lora_rank,
                      "dtype": policy.dtype, "param_dtype": policy.param_dtype, "remat_policy": policy.remat_policy},
            "batch": {"pairs": 0, "rows": b, "seq_len": prompt + new}, "micro_batches": p.minibatches,
            "layout": "rollouts", "mode": "ppo"}
    return plans, info

