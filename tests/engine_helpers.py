"""A tiny model, learnable synthetic preference batches and a step runner shared by the engine tests."""

import jax
import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import init_params
from dpo_jax.train.engine import build_engine, default_engine_config
from dpo_jax.train.step import loss_sum_and_metrics, pair_logprobs

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=64)
PROMPT, RESPONSE = 4, 8

# The plain path's loss, metrics, gradient and pair log-probs, jitted (the StepConfig static). Run op by op instead,
# each call compiles every primitive for its shapes: the reward model's Bradley-Terry test spent 49 s in 666 of
# those compiles (issue 34). Same function, same numbers to rounding; the tests compare with tolerances.
loss_and_grads = jax.jit(jax.value_and_grad(loss_sum_and_metrics, has_aux=True), static_argnums=2)
plain_pair_logprobs = jax.jit(pair_logprobs, static_argnums=2)


def config(mesh=(1, 1, 1), pairs=8, micro=1, lr=3e-3, optimizer_name="adamw", **dpo):
    c = default_engine_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.train.global_batch_pairs, c.train.micro_batches = pairs, micro
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = optimizer_name, lr, 0
    for k, v in dpo.items():
        setattr(c.dpo, k, v)
    return c


def engine(c, devices=None, seed=0, model=MODEL, **kwargs):
    return build_engine(c, model, lambda: init_params(model, jax.random.key(seed)), devices=devices, **kwargs)


def global_pairs(step, pairs, vocab=MODEL.vocab_size, padding=0):
    """Pairs sharing a random prompt; chosen responses use the low half of the vocabulary (learnable)."""
    rng = np.random.default_rng(1000 + step)
    prompt = rng.integers(0, vocab, (pairs, PROMPT))
    chosen = rng.integers(0, vocab // 2, (pairs, RESPONSE))
    rejected = rng.integers(vocab // 2, vocab, (pairs, RESPONSE))
    example_mask = np.ones(pairs, np.int32)
    if padding:
        example_mask[-padding:] = 0
    return np.concatenate([prompt, chosen], 1), np.concatenate([prompt, rejected], 1), example_mask


def local_batch(step, pairs, process_index=0, process_count=1, padding=0):
    """This host's block: its pairs' chosen rows then rejected rows."""
    c, r, m = global_pairs(step, pairs, padding=padding)
    b = pairs // process_count
    sl = slice(process_index * b, (process_index + 1) * b)
    ids = np.concatenate([c[sl], r[sl]]).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, PROMPT:] = 1
    loss_mask[np.concatenate([m[sl], m[sl]]) == 0] = 0
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones_like(ids), "example_mask": m[sl],
            "example_id": np.arange(pairs, dtype=np.int32)[sl] + 1000 * step}


def run(e, steps, pairs, process_index=0, process_count=1, ref_params=None, padding=0):
    """Per-batch reference from `ref_params` (default: the initial policy). Returns (metrics per step, state)."""
    from dpo_jax import summaries

    state, history = e.state, []
    ref = ref_params if ref_params is not None else jax.tree.map(lambda x: x.copy(), state.params)
    for step in range(steps):
        local = local_batch(step, pairs, process_index, process_count, padding)
        if e.config.needs_reference:
            sc, sr, _, _ = (np.asarray(x) for x in e.reference_step(ref, e.shard_batch(local)))
            b = pairs // process_count
            local["ref_chosen_logps"] = sc[process_index * b:(process_index + 1) * b]
            local["ref_rejected_logps"] = sr[process_index * b:(process_index + 1) * b]
        state, metrics = e.train_step(state, e.shard_batch(local))
        history.append(summaries.finalize(metrics))
    return history, state
