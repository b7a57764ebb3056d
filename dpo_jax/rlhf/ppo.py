"""PPO with a KL penalty for language models (RLHF stage 3): the jitted, sharded pieces of one PPO iteration.

One Trainer step is one iteration, as TRL's PPOTrainer counts updates:
  rollout (host hook `Rollouts`, called by `Trainer.fit` with the current state): the jitted KV-cache `generate`
    samples responses from the policy at `temperature`; one jitted pass gives their log-probs under the policy and
    under π_ref (both at that temperature, as the sampler drew them) and the value model's values; a reward model's
    scoring pass — or a host `reward_fn(texts)`, PPO-GT — gives each response its score;
  update (`train_step`, one jit): per-token rewards −β·(log π − log π_ref) plus the score at the last token, GAE,
    whitened advantages, then `epochs` passes of `minibatches` clipped policy + value updates under one optimizer
    over {policy, value} (a `lax.scan`; the data never leaves the device), and the adaptive KL controller.
The generation key of iteration s is fold_in(seed, s), so a resumed run draws what an uninterrupted one would.
With a LoRA policy (and value model) only the adapters (and the value head) train, and π_ref is the policy's own
frozen base with the adapters off: no reference copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import sharding
from dpo_jax.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from dpo_jax.models import lora
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, logical_axes, unembedding
from dpo_jax.models.generate import SamplingConfig, ended_with_eos, generate
from dpo_jax.models.reward import token_scores
from dpo_jax.rlhf import ppo_math
from dpo_jax.rlhf.best_of_n import sample_keys
from dpo_jax.summaries import Mean


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything static about a PPO iteration (hashable). Defaults: TRL's PPOConfig."""

    model: ModelConfig  # the policy
    value_model: ModelConfig  # a score-head model: its per-position scores are the values
    sampling: SamplingConfig  # rollout length, temperature (also used for every log-prob), EOS and pad ids
    epochs: int = 4  # PPO epochs over each rollout batch
    minibatches: int = 1  # per rollout batch
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # the initial coefficient; fixed unless target_kl > 0
    target_kl: float = 0.0  # > 0: Ziegler's adaptive controller toward this KL (nats per sequence); both are only
    # the initial state's (`init_state` sets others: runs at other coefficients or targets share one compile)
    horizon: float = 10000.0  # its horizon, in episodes
    whiten_rewards: bool = False
    seed: int = 0  # generation keys and minibatch shuffles
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # response positions per unembedding chunk

    def __post_init__(self):
        if self.model.head != "lm" or self.value_model.head != "score":
            raise ValueError("PPO needs a policy with a language-model head and a value model with a score head")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"ppo.epochs ({self.epochs}) and ppo.minibatches ({self.minibatches}) must be >= 1")
        if self.sampling.greedy or self.sampling.top_k or self.sampling.top_p < 1.0:
            raise ValueError("PPO samples from π at a temperature only (no greedy, top-k or top-p): the log-probs "
                             "of the update must be those of the distribution sampled from")
        if self.model.lora_dropout or self.value_model.lora_dropout:
            raise ValueError("config.policy.lora.dropout and config.reward.model.lora.dropout (the value model's) "
                             "must be 0 for PPO: the update's ratio π/π_old compares "
                             "log-probs with the rollout's, which are drawn without dropout (TRL's PPO disables "
                             "dropout too)")

    @property
    def base_reference(self) -> bool:
        """A LoRA policy's π_ref is its base with the adapters off (no copy)."""
        return bool(self.model.lora_rank)

    def trainable(self, params: dict) -> tuple[dict, dict]:
        """({"policy", "value"} frozen parts, trained parts): adapters (+ the value head) with LoRA, else all."""
        (fp, tp), (fv, tv) = lora.trainable(params["policy"], self.model), lora.trainable(params["value"],
                                                                                          self.value_model)
        return {"policy": fp, "value": fv}, {"policy": tp, "value": tv}

    def combine(self, frozen: dict, trained: dict) -> dict:
        return {"policy": lora.combine(frozen["policy"], trained["policy"], self.model),
                "value": lora.combine(frozen["value"], trained["value"], self.value_model)}


def lora_value_config(policy: ModelConfig, value: ModelConfig) -> ModelConfig:
    """A LoRA policy's value model: `value`'s base with the policy's rank, alpha and targets (its adapters and score
    head train over the frozen base)."""
    return lora.base_config(value).replace(lora_rank=policy.lora_rank, lora_alpha=policy.lora_alpha,
                                           lora_targets=policy.lora_targets)


class PPOState(NamedTuple):
    step: jax.Array
    params: Any  # {"policy": ..., "value": ...}
    opt_state: Any  # one optimizer over both (TRL's policy-and-value wrapper); LoRA: over their trained parts
    kl_coef: jax.Array
    target_kl: jax.Array  # > 0: the adaptive controller's target KL; 0: kl_coef stays fixed


ROLLOUT_KEYS = {"input_ids": 2, "attention_mask": 2, "response_mask": 2, "old_logps": 2, "ref_logps": 2,
                "old_values": 2, "scores": 1}


def response_logps(params: dict, model: ModelConfig, ids: jax.Array, mask: jax.Array, length: int,
                   temperature: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """log π_T(y_t | x, y_<t) of the last `length` positions [B, length] float32 (left-padded prompt + response).
    The unembedding runs on those positions only (the score window of logprobs.py), never on the prompt."""
    hidden = Decoder(model).apply({"params": params}, ids, attention_mask=mask)
    kernel, bias = unembedding(params, model)
    b, t = ids.shape
    lp = token_logprobs(hidden, kernel / temperature, ids, bias=None if bias is None else bias / temperature,
                        window=(jnp.full((b,), t - length, jnp.int32), length), chunk_size=chunk_size)
    return lp[:, -length:]


def response_values(params: dict, model: ModelConfig, ids: jax.Array, mask: jax.Array, length: int) -> jax.Array:
    """The value of the state emitting each response token: the score head at the position before it."""
    hidden = Decoder(model).apply({"params": params}, ids, attention_mask=mask)
    return token_scores(params, model, hidden)[:, -length - 1:-1]


def _losses(params, mb, c: PPOConfig):
    length = mb["response_mask"].shape[1]
    lp = response_logps(params["policy"], c.model, mb["input_ids"], mb["attention_mask"], length,
                        c.sampling.temperature, c.logprob_chunk_size)
    v = response_values(params["value"], c.value_model, mb["input_ids"], mb["attention_mask"], length)
    m = mb["response_mask"].astype(jnp.float32)
    pg, stats = ppo_math.policy_loss(lp, mb["old_logps"], mb["advantages"], m, c.clip)
    vf, vclip = ppo_math.value_loss(v, mb["old_values"], mb["returns"], m, c.value_clip)
    return pg + c.vf_coef * vf, {"loss/policy_avg": pg, "loss/value_avg": vf, "policy/clipfrac_avg":
                                 stats["clipfrac"], "policy/approxkl_avg": stats["approxkl"], "val/ratio":
                                 stats["ratio"], "val/clipfrac_avg": vclip}


def make_ppo_step(c: PPOConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                  rules: Any, state_shardings: PPOState) -> Callable:
    """train_step(state, rollout) -> (state, metrics): rewards, GAE, then epochs x minibatches of updates."""
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, n) for k, n in ROLLOUT_KEYS.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = sharding.batch_sharding(mesh, rules, 2).spec[0]

    def train_step(state: PPOState, batch: dict[str, jax.Array]):
        m = batch["response_mask"].astype(jnp.float32)
        rewards, kl, non_score = ppo_math.kl_penalized_rewards(batch["old_logps"], batch["ref_logps"], m,
                                                               batch["scores"], state.kl_coef)
        if c.whiten_rewards:
            rewards = ppo_math.whiten(rewards, m, shift_mean=False)
        advantages, returns = ppo_math.gae(rewards, batch["old_values"], m, c.gamma, c.lam)
        advantages = ppo_math.whiten(advantages, m)
        data = {**batch, "advantages": advantages, "returns": returns}
        b = batch["input_ids"].shape[0]
        key = jax.random.fold_in(jax.random.key(c.seed + 1), state.step)
        order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), b) for e in range(c.epochs)])
        order = order.reshape(c.epochs * c.minibatches, b // c.minibatches)

        frozen, trained = c.trainable(state.params)  # LoRA: the bases never reach the gradients or the optimizer

        def update(carry, idx):
            trained, opt_state = carry
            mb = {k: jax.lax.with_sharding_constraint(
                jnp.take(v, idx, axis=0), NamedSharding(mesh, PartitionSpec(rows, *([None] * (v.ndim - 1)))))
                for k, v in data.items()}
            (loss, stats), grads = jax.value_and_grad(
                lambda t: _losses(c.combine(frozen, t), mb, c), has_aux=True)(trained)
            updates, opt_state = optimizer.update(grads, opt_state, trained)
            return (optax.apply_updates(trained, updates), opt_state), {**stats, "loss": loss,
                                                                        "grad_norm": optax.tree.norm(grads)}

        (trained, opt_state), per_update = jax.lax.scan(update, (trained, state.opt_state), order)
        params = c.combine(frozen, trained)
        sequence_kl = jnp.sum(kl, axis=1)
        mean_kl = jnp.mean(sequence_kl)
        adapted = ppo_math.adaptive_kl_coef(state.kl_coef, mean_kl, jnp.maximum(state.target_kl, 1e-6), c.horizon, b)
        kl_coef = jnp.where(state.target_kl > 0, adapted, state.kl_coef)
        one = jnp.ones((), jnp.float32)
        eos = jnp.any((batch["input_ids"][:, -m.shape[1]:] == c.sampling.eos_id) & (m > 0), axis=1) \
            if c.sampling.eos_id is not None else jnp.zeros((b,), bool)
        values = {k: jnp.mean(v) for k, v in per_update.items()}
        values |= {"objective/kl": mean_kl, "objective/entropy": jnp.mean(-jnp.sum(batch["old_logps"] * m, 1)),
                   "objective/non_score_reward": jnp.mean(jnp.sum(non_score, 1)),
                   "objective/rlhf_reward": jnp.mean(batch["scores"] + jnp.sum(non_score, 1)),
                   "objective/scores": jnp.mean(batch["scores"]), "objective/kl_coef": state.kl_coef,
                   "val/num_eos_tokens": jnp.sum(eos).astype(jnp.float32),
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
                   "num_tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}
        metrics = {k: Mean(jax.lax.stop_gradient(v).astype(jnp.float32), one) for k, v in values.items()}
        return PPOState(state.step + 1, params, opt_state, kl_coef, state.target_kl), metrics

    return jax.jit(sharding.on_mesh(train_step, mesh), in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


class PPOEngine(NamedTuple):
    """The PPO counterpart of train/engine.py's Engine: config, mesh, state, jitted step. Implements the Trainer's
    engine protocol (train/trainer.py `TrainEngine`)."""

    config: PPOConfig
    mesh: Mesh
    rules: Any
    param_shardings: Any
    state_shardings: PPOState
    state: PPOState
    train_step: Callable
    rollout_stats: Callable  # (params, ref_params, ids, mask, length) -> (ref logps, values); LoRA: ref_params None
    init_state: Callable  # (policy params, value params, kl_coef, target_kl=config's) -> a fresh sharded PPOState
    # (params donated)

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def kind(self) -> str:
        return "ppo"

    def abstract_rollout(self, batch: int, prompt_length: int) -> dict:
        """Stand-ins for the update's batch: rollouts of `batch` prompts of `prompt_length` tokens (what compiling
        the update ahead of the first rollout needs)."""
        length = self.config.sampling.max_new_tokens
        shapes = {k: (batch, prompt_length + length) if k in ("input_ids", "attention_mask") else
                  (batch, length) if n == 2 else (batch,) for k, n in ROLLOUT_KEYS.items()}
        dtypes = {"input_ids": jnp.int32, "attention_mask": jnp.int32, "response_mask": jnp.int32}
        return {k: jax.ShapeDtypeStruct(s, dtypes.get(k, jnp.float32), sharding=sharding.batch_sharding(
            self.mesh, self.rules, len(s))) for k, s in shapes.items()}

    def shard_batch(self, local: dict) -> dict:
        """A rollout (already global device arrays, or host numpy) -> the step's fields, sharded."""
        rows = {k: v for k, v in local.items() if k in ROLLOUT_KEYS}
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, self.rules, v.ndim)) if isinstance(
            v, jax.Array) else sharding.global_batch({k: v}, self.mesh, self.rules)[k] for k, v in rows.items()}

    def step_flops(self, local: dict) -> float:
        """Model FLOPs of the update (policy and value forward + backward per minibatch pass)."""
        from dpo_jax.flops import train_step_flops

        b, t = local["input_ids"].shape
        per_epoch = train_step_flops(self.config.model, b, t) + train_step_flops(self.config.value_model, b, t)
        return self.config.epochs * per_epoch


def build_ppo_engine(c: PPOConfig, optimizer_config: Any, policy_params: Any, value_params: Any, mesh: Mesh,
                     rules: Any, abstract_state: bool = False) -> PPOEngine:
    """Shardings from both models' logical axes, the state created sharded (params donated), the jitted step.
    abstract_state: the params are jax.ShapeDtypeStructs and so is the state (`dpo-jax plan`: nothing allocated)."""
    from dpo_jax.train.state import create_state, make_optimizer

    optimizer, schedule = make_optimizer(optimizer_config)
    logical = {"policy": logical_axes(c.model), "value": logical_axes(c.value_model)}
    abstract_params = jax.eval_shape(lambda: {"policy": policy_params, "value": value_params})
    p_shardings = sharding.param_shardings(logical, abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def shardings_for(abstract):
        return sharding.state_shardings(abstract, p_shardings, abstract_params, mesh)

    def init_state(policy: Any, value: Any, kl_coef: float, target_kl: float | None = None) -> PPOState:
        shared = {id(x) for x in jax.tree.leaves(policy)}  # a value model made from the policy shares its body
        value = jax.tree.map(lambda x: jnp.copy(x) if id(x) in shared else x, value)
        # placed first: donating across a resharding is not supported
        params = jax.device_put({"policy": policy, "value": value}, p_shardings)
        train_state = create_state(lambda p: p, optimizer, shardings_for, params,
                                   trained=lambda p: c.trainable(p)[1])
        target = c.target_kl if target_kl is None else target_kl
        return PPOState(*train_state, *(jax.device_put(jnp.asarray(x, jnp.float32), replicated)
                                        for x in (kl_coef, target)))

    if abstract_state:
        train_state = create_state(lambda p: p, optimizer, shardings_for, abstract_params,
                                   trained=lambda p: c.trainable(p)[1], abstract=True)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        state = PPOState(*train_state, scalar, scalar)
    else:
        state = init_state(policy_params, value_params, c.kl_coef)
    s_shardings = jax.tree.map(lambda x: x.sharding, state)
    rows = sharding.batch_sharding(mesh, rules, 2)

    def stats(params, ref_params, ids, mask, length):
        ref, ref_model = (lora.base_params(params["policy"]), lora.base_config(c.model)) if c.base_reference \
            else (ref_params, c.model)
        return (response_logps(ref, ref_model, ids, mask, length, c.sampling.temperature, c.logprob_chunk_size),
                response_values(params["value"], c.value_model, ids, mask, length))

    ref_shardings = None if c.base_reference else p_shardings["policy"]
    rollout_stats = jax.jit(sharding.on_mesh(stats, mesh), static_argnums=(4,),
                            in_shardings=(s_shardings.params, ref_shardings, rows, rows), out_shardings=rows)
    step = make_ppo_step(c, optimizer, schedule, mesh, rules, s_shardings)
    return PPOEngine(c, mesh, rules, p_shardings, s_shardings, state, step, rollout_stats, init_state)


class Rollouts:
    """The Trainer's rollout hook: a host batch of prompts + the current state -> a rollout batch on device.

    ref_params: π_ref's parameters (None for a LoRA policy: its base is the reference).
    score(ids, mask, texts) -> [B] float32: a reward model's scoring pass on (prompt + response) rows, or a host
    reward of the decoded texts (PPO-GT); `missing_eos_penalty` is subtracted from responses without EOS.
    ready(): waited for once, after the first rollout (e.g. a train/compile_ahead.py `CompileAhead.wait`).
    seed: the generation keys' seed (None: the engine config's), so runs with other seeds share one engine."""

    def __init__(self, engine: PPOEngine, ref_params: Any, score: Callable[..., np.ndarray], decode: Callable,
                 missing_eos_penalty: float = 0.0, ready: Callable[[], None] | None = None, seed: int | None = None):
        self.engine, self.ref_params, self.score, self.decode = engine, ref_params, score, decode
        self.missing_eos_penalty, self.ready = missing_eos_penalty, ready
        self.seed = engine.config.seed if seed is None else seed

    def __call__(self, local: dict, state: PPOState) -> dict:
        c = self.engine.config
        step = int(jax.device_get(state.step))
        ids, mask = local["prompt_ids"], local["prompt_mask"]
        keys = sample_keys(jax.random.fold_in(jax.random.key(self.seed), step), len(ids), 1)
        samples = generate(state.params["policy"], c.model, ids, mask, keys, c.sampling)
        full = jnp.concatenate([jnp.asarray(ids), samples.tokens], 1)
        full_mask = jnp.concatenate([jnp.asarray(mask), samples.mask], 1)
        rows = sharding.batch_sharding(self.engine.mesh, self.engine.rules, 2)
        full, full_mask = jax.device_put(full, rows), jax.device_put(full_mask, rows)
        length = c.sampling.max_new_tokens
        ref_logps, values = self.engine.rollout_stats(state.params, self.ref_params, full, full_mask, length)
        # The policy's log-probs of its own samples are the sampler's (at the temperature sampled from: equal to a
        # forward pass's, tested), so the rollout needs no policy forward pass.
        old_logps = jax.device_put(samples.sampling_logps, rows)
        if self.ready is not None:  # the update step, compiled on another thread meanwhile
            self.ready()
            self.ready = None
        texts = self.decode(np.asarray(full), np.asarray(full_mask))
        scores = np.asarray(self.score(np.asarray(full), np.asarray(full_mask), texts), np.float32)
        if self.missing_eos_penalty and c.sampling.eos_id is not None:
            scores = scores - self.missing_eos_penalty * ~ended_with_eos(samples.tokens, samples.mask,
                                                                           c.sampling.eos_id)
        return {"input_ids": full, "attention_mask": full_mask, "response_mask": samples.mask, "old_logps": old_logps,
                "ref_logps": ref_logps, "old_values": values, "scores": scores, "example_id": local["example_id"],
                "texts": texts}
