"""A `dpo-jax ppo` run planned on a TPU topology: the policy, value and reward models built as `ppo` builds them,
with abstract parameters, and its programs compiled — the rollout's generation, the reward model's scoring pass,
the reference/value pass and the PPO update: memory, fits, collectives, compile time, and the time estimate.

The estimate has the train run's problem (the compiler counts a loop body once) three times over: scanned layers,
the decode loop (up to max_new_tokens steps) and the update's scan over epochs x minibatches. So the counts come
from loop-free variants — layers unscanned, one update of one minibatch, the response's log-probs in one chunk —
and the generation is counted as its prefill plus max_new_tokens decode steps, each compiled on its own:
  program(L_policy, L_value, L_reward) = A + (L_policy - 1)·(B - A) + (L_value - 1)·(C - A)
with A every model at 1 layer, B the policy and the reward model at 2, C the value model at 2 (reward scoring
takes its slope from B). Every row is assumed to decode all max_new_tokens (no early EOS): an upper bound.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax.compile_target import compiling_for
from dpo_jax.flops import train_step_flops
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import init_params, logical_axes
from dpo_jax.models.generate import SamplingConfig, _generate_jit, decode_step_jit, prefill_jit
from dpo_jax.models.reward import make_scorer, reward_model_config
from dpo_jax.plan.chips import chip_of
from dpo_jax.plan.programs import CountingOutOfMemory, compile_program, loop_free_cost, per_device_bytes
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


@dataclasses.dataclass(frozen=True)
class Models:
    policy: ModelConfig
    value: ModelConfig
    reward: ModelConfig | None  # None: a host reward (PPO-GT)

    def with_layers(self, policy: int, value: int, reward: int) -> "Models":
        def unscanned(config, layers):
            return config.replace(num_layers=layers, scan_layers=False)
        return Models(unscanned(self.policy, policy), unscanned(self.value, value),
                      None if self.reward is None else unscanned(self.reward, reward))


def planned_models(c: ml_collections.ConfigDict) -> Models:
    """The run's three models as `ppo` builds them (no weights read)."""
    policy = section_model(c.policy, c.data)[0]
    if policy.head != "lm":
        raise ValueError("config.policy is a reward model (score head); PPO's policy needs a language-model head")
    reward = _as_score_model(section_model(c.reward.model, c.data)[0]) if c.reward.kind == "model" else None
    value = reward if c.value_init == "reward" and reward is not None else _as_score_model(policy)
    if policy.lora_rank:  # as commands/ppo.py: the value model trains the policy's adapters over a frozen base
        value = lora_value_config(policy, value)
    return Models(policy, value, reward)


def _ppo_config(c: ml_collections.ConfigDict, models: Models, **changes) -> PPOConfig:
    p = c.ppo
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, eos_id=0, pad_id=0)
    config = PPOConfig(model=models.policy, value_model=models.value, sampling=sampling, epochs=p.epochs,
                       minibatches=p.minibatches, clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef,
                       gamma=p.gamma, lam=p.lam, kl_coef=p.kl_coef, target_kl=p.target_kl, horizon=p.horizon,
                       whiten_rewards=p.whiten_rewards, seed=c.train.seed)
    return dataclasses.replace(config, **changes)


def _programs(c: ml_collections.ConfigDict, models: Models, mesh, variant: bool) -> tuple[dict, dict]:
    """({name: (lower, abstract args)}, {name: bytes of the run's arrays}). variant: the estimate's loop-free form
    (one epoch of one minibatch's update, one log-prob chunk, generation split into prefill and a decode step)."""
    rules, p = c.mesh.rules, c.ppo
    b, prompt, new = c.train.batch_prompts, c.prompts.max_prompt_length, p.max_new_tokens
    changes = {"epochs": 1, "minibatches": 1, "logprob_chunk_size": new} if variant else {}
    config = _ppo_config(c, models, **changes)
    with compiling_for("tpu"):
        engine = build_ppo_engine(config, c.optimizer, _abstract(models.policy, mesh, rules),
                                  _abstract(models.value, mesh, rules), mesh, rules, abstract_state=True)
    rows2 = batch_sharding(mesh, rules, 2)
    replicated = NamedSharding(mesh, PartitionSpec())
    ids = jax.ShapeDtypeStruct((b, prompt), jnp.int32, sharding=rows2)
    full = jax.ShapeDtypeStruct((b, prompt + new), jnp.int32, sharding=rows2)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=replicated)
    temperatures = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=replicated)
    params = engine.state.params
    reference = None if config.base_reference else params["policy"]  # π_ref: a copy of π_SFT's shape
    static = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_id=0, pad_id=0)
    update_rows = b // p.minibatches if variant else b
    programs = {}  # in an iteration's order
    if variant:
        programs["prefill"] = (functools.partial(prefill_jit.lower, config=models.policy, s=static),
                               (params["policy"], ids, ids))
        programs["decode_step"] = (functools.partial(decode_step_jit.lower, prompt_length=prompt,
                                                     config=models.policy, s=static),
                                   (_decode_carry(models.policy, static, params["policy"], ids, mesh, rules),
                                    params["policy"], keys, temperatures))
    else:
        programs["generate"] = (functools.partial(_generate_jit.lower, config=models.policy, s=static),
                                (params["policy"], ids, ids, keys, temperatures))
    reward_params = None
    if models.reward is not None:
        reward_params = _abstract(models.reward, mesh, rules)
        scorer = make_scorer(models.reward, mesh, rules, jax.tree.map(lambda x: x.sharding, reward_params))
        programs["reward_score"] = (scorer.lower, (reward_params, full, full))
    programs["rollout_stats"] = (engine.rollout_stats.lower, (params, reference, full, full, new))
    programs["ppo_update"] = (engine.train_step.lower, (engine.state, engine.abstract_rollout(update_rows, prompt)))
    held = {"state": per_device_bytes(engine.state), "policy": per_device_bytes(params["policy"]),
            "params": per_device_bytes(params),
            "reference": per_device_bytes(reference) if reference is not None else 0,
            "reward": per_device_bytes(reward_params) if reward_params is not None else 0}
    return programs, held


def _decode_carry(policy: ModelConfig, static: SamplingConfig, params, ids, mesh, rules) -> Any:
    """The decode loop's carry as prefill leaves it, sharded like the rows (the cache [layers, B, ...] on axis 1)."""
    shapes = jax.eval_shape(functools.partial(prefill_jit, config=policy, s=static), params, ids, ids)

    def place(path, leaf):
        if path[0].idx == 1:  # the KV cache
            spec = PartitionSpec(None, *batch_sharding(mesh, rules, leaf.ndim - 1).spec)
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))
        sharding = batch_sharding(mesh, rules, leaf.ndim) if leaf.ndim else NamedSharding(mesh, PartitionSpec())
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, shapes)


def estimate(c: ml_collections.ConfigDict, models: Models, mesh) -> dict[str, tuple[float, float, float]]:
    """{program: (FLOPs, bytes accessed, collective bytes)} per device and PPO iteration, the compiler's (the module
    docstring)."""
    variants = {"A": (1, 1, 1), "B": (2, 1, 2), "C": (1, 2, 1)}
    costs = {}
    for name, layers in variants.items():
        programs, _ = _programs(c, models.with_layers(*layers), mesh, variant=True)
        if name == "C":
            programs = {k: v for k, v in programs.items() if k in ("rollout_stats", "ppo_update")}
        with compiling_for("tpu"):
            try:
                costs[name] = {k: loop_free_cost(lower, *args) for k, (lower, args) in programs.items()}
            except CountingOutOfMemory as e:
                raise RuntimeError(f"no PPO estimate: a one-layer variant does not fit ({e})") from None
    lp, lv = models.policy.num_layers, models.value.num_layers
    lr = models.reward.num_layers if models.reward is not None else 1

    def total(program: str, i: int) -> float:
        a, b = costs["A"][program][i], costs["B"][program][i]
        if program in ("prefill", "decode_step"):
            return a + (lp - 1) * (b - a)
        if program == "reward_score":
            return a + (lr - 1) * (b - a)
        return a + (lp - 1) * (b - a) + (lv - 1) * (costs["C"][program][i] - a)

    new, p = c.ppo.max_new_tokens, c.ppo
    out = {"generate": tuple(total("prefill", i) + new * total("decode_step", i) for i in range(3))}
    out.update({k: tuple(total(k, i) for i in range(3)) for k in costs["A"] if k not in ("prefill", "decode_step")})
    out["ppo_update"] = tuple(p.epochs * p.minibatches * x for x in out["ppo_update"])
    return out


def plan_ppo(c: ml_collections.ConfigDict, devices: list[Any], with_estimate: bool = True
             ) -> tuple[dict[str, ProgramPlan], dict[str, Any]]:
    chip = chip_of(devices[0])
    mesh = make_mesh(c.mesh, devices)
    models = planned_models(c)
    programs, held = _programs(c, models, mesh, variant=False)
    everything = held["state"] + held["reference"] + held["reward"]
    arguments = {"generate": held["policy"], "rollout_stats": held["params"] + held["reference"],
                 "ppo_update": held["state"], "reward_score": held["reward"]}
    p, b = c.ppo, c.train.batch_prompts
    t = c.prompts.max_prompt_length + p.max_new_tokens
    forward = train_step_flops(models.policy, b, t) / 3
    value_step = train_step_flops(models.value, b, t)
    model_flops = {"generate": forward, "rollout_stats": forward + value_step / 3,
                   "ppo_update": p.epochs * (3 * forward + value_step),
                   "reward_score": 0.0 if models.reward is None else train_step_flops(models.reward, b, t) / 3}
    tokens = {"generate": b * p.max_new_tokens}  # new tokens; the other programs read whole rows (epochs times)
    plans = {}
    for name, (lower, args) in programs.items():
        with compiling_for("tpu"):
            compiled = compile_program(lower, *args)
        plans[name] = ProgramPlan(name, compiled, everything - arguments[name], chip.hbm_bytes, model_flops[name],
                                  tokens=tokens.get(name, b * t * (p.epochs if name == "ppo_update" else 1)))
    if with_estimate and not any(plan.compiled.error for plan in plans.values()):
        for name, counts in estimate(c, models, mesh).items():
            plans[name].set_estimate("variants", counts, len(devices), chip)
    policy = models.policy
    info = {"devices": len(devices), "chip": chip.name, "device_kind": devices[0].device_kind,
            "hbm_bytes": chip.hbm_bytes, "peak_tflops_per_device": chip.peak_tflops, "mesh": dict(mesh.shape),
            "model": {"family": policy.family, "layers": policy.num_layers, "hidden_size": policy.hidden_size,
                      "vocab_size": policy.vocab_size, "parameters": sum(
                          x.size for x in jax.tree.leaves(programs["generate"][1][0])), "lora_rank": policy.lora_rank,
                      "dtype": policy.dtype, "param_dtype": policy.param_dtype, "remat_policy": policy.remat_policy},
            "batch": {"pairs": 0, "rows": b, "seq_len": t}, "micro_batches": p.minibatches,
            "layout": "rollouts", "mode": "ppo",
            "estimated_iteration_seconds": sum(plan.estimated_step_seconds for plan in plans.values())}
    return plans, info
