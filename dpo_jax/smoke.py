"""A toy DPO run that exercises the foundation end to end in seconds: `dpo-jax smoke`.

The policy is a tiny bigram language model (embedding → tanh layer → unembedding). Preference pairs share a random
prompt; the chosen response is drawn from the lower half of the vocabulary ("preferred" tokens), the rejected one
from the upper half. DPO, with the reference frozen at the initial policy and its log-probs computed in a separate
jitted pass, should move probability mass to the preferred half while the implicit-reward accuracy climbs to 1.
The first step has policy == reference, so its loss is exactly ln 2.

This is a stand-in main job until the sentiment experiment lands; it uses the real loss registry, chunked
log-probs and metric sums, not copies of them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpo_jax import losses, summaries
from dpo_jax.config import ConfigError
from dpo_jax.logprobs import sequence_logprobs

Params = dict[str, jax.Array]


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 150
    c.log_every = 25
    c.batch_pairs = 16
    c.prompt_len = 4
    c.response_len = 8
    c.vocab_size = 64
    c.width = 32
    c.chunk_size = 4  # log-prob chunk along the sequence; deliberately small to exercise the scan
    c.learning_rate = 3e-2
    c.dpo = ml_collections.ConfigDict(dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0))
    return c


def _init(key: jax.Array, vocab: int, width: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (vocab, width)),
        "mix": jax.random.normal(k2, (width, width)) / math.sqrt(width),
        "unembed": jax.random.normal(k3, (width, vocab)) / math.sqrt(width),
    }


def _hidden(params: Params, ids: jax.Array) -> jax.Array:
    return jnp.tanh(params["embed"][ids] @ params["mix"])


def _batch(key: jax.Array, c: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """[2B, T] rows: chosen first, rejected second, sharing prompts; loss_mask marks the response."""
    kp, kc, kr = jax.random.split(key, 3)
    b, half = c.batch_pairs, c.vocab_size // 2
    prompt = jax.random.randint(kp, (b, c.prompt_len), 0, c.vocab_size)
    chosen = jax.random.randint(kc, (b, c.response_len), 0, half)
    rejected = jax.random.randint(kr, (b, c.response_len), half, c.vocab_size)
    ids = jnp.concatenate([jnp.concatenate([prompt, chosen], 1), jnp.concatenate([prompt, rejected], 1)], 0)
    mask = jnp.concatenate([jnp.zeros((2 * b, c.prompt_len)), jnp.ones((2 * b, c.response_len))], 1)
    return {"input_ids": ids, "loss_mask": mask}


def _sequence_logps(params: Params, batch: dict[str, jax.Array], chunk_size: int) -> jax.Array:
    out = sequence_logprobs(_hidden(params, batch["input_ids"]), params["unembed"], batch["input_ids"],
                            batch["loss_mask"], chunk_size=chunk_size)
    return out.sums


def _preferred_mass_and_kl(params: Params, ref: Params, vocab: int) -> tuple[float, float]:
    """Over every one-token context: mean probability of a preferred next token, and mean KL(π‖π_ref) in nats."""
    ids = jnp.arange(vocab)[:, None]
    logp = jax.nn.log_softmax(_hidden(params, ids)[:, 0] @ params["unembed"], -1)
    logq = jax.nn.log_softmax(_hidden(ref, ids)[:, 0] @ ref["unembed"], -1)
    mass = jnp.mean(jnp.sum(jnp.exp(logp[:, : vocab // 2]), -1))
    kl = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
    return float(mass), float(kl)


def check_config(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key for a config this run cannot use."""
    if c.vocab_size < 4 or c.vocab_size % 2:
        raise ConfigError(f"config.vocab_size must be an even number >= 4, got {c.vocab_size}")
    try:
        losses.validate_loss_args(**c.dpo)
    except ValueError as e:
        raise ConfigError(f"config.dpo: {e}") from None


def train(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the toy DPO; returns the per-log-interval metrics and the before/after preferred mass and KL."""
    check_config(c)
    key = jax.random.key(c.seed)
    ref = _init(jax.random.fold_in(key, 0), c.vocab_size, c.width)
    params = jax.tree.map(jnp.copy, ref)
    opt = optax.adam(c.learning_rate)
    dpo = dict(c.dpo)

    @jax.jit
    def reference_pass(ref_params, batch):  # separate jitted forward, never under grad
        logps = _sequence_logps(ref_params, batch, c.chunk_size)
        return logps[: c.batch_pairs], logps[c.batch_pairs:]

    def loss_fn(p, batch, ref_chosen, ref_rejected):
        logps = _sequence_logps(p, batch, c.chunk_size)
        pc, pr = logps[: c.batch_pairs], logps[c.batch_pairs:]
        per_example, cr, rr = losses.preference_loss(pc, pr, ref_chosen, ref_rejected, **dpo)
        return jnp.mean(per_example), losses.preference_metrics(per_example, cr, rr, pc, pr)

    def train_step(p, opt_state, batch, ref_chosen, ref_rejected):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, ref_chosen, ref_rejected)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    train_step = jax.jit(train_step, donate_argnums=(0, 1))  # params and optimizer state are updated in place
    opt_state = opt.init(params)
    before = _preferred_mass_and_kl(params, ref, c.vocab_size)
    history, window, first_loss = [], None, None
    for step in range(1, c.steps + 1):
        batch = _batch(jax.random.fold_in(key, step), c)
        params, opt_state, metrics = train_step(params, opt_state, batch, *reference_pass(ref, batch))
        if first_loss is None:
            first_loss = summaries.finalize(metrics)["loss"]
        window = metrics if window is None else summaries.merge(window, metrics)
        if step % c.log_every == 0 or step == c.steps:
            row = {"step": step, **summaries.finalize(window)}
            history.append(row)
            print(
                f"step {step:4d}  loss {row['loss']:.4f}  rewards/accuracies {row['rewards/accuracies']:.3f}  "
                f"rewards/margins {row['rewards/margins']:+.3f}  logps/chosen {row['logps/chosen']:8.3f}  "
                f"logps/rejected {row['logps/rejected']:8.3f}",
                flush=True,
            )
            window = None
    after = _preferred_mass_and_kl(params, ref, c.vocab_size)
    return {"first_loss": first_loss, "history": history, "preferred_mass": (before[0], after[0]),
            "kl": (before[1], after[1])}


def main(c: ml_collections.ConfigDict) -> None:
    check_config(c)
    print(f"dpo-jax smoke: toy DPO ({c.dpo.loss_type}, beta={c.dpo.beta}) on {jax.device_count()} "
          f"{jax.default_backend()} device(s), {c.steps} steps of {c.batch_pairs} pairs")
    result = train(c)
    (m0, m1), (_, kl) = result["preferred_mass"], result["kl"]
    if c.dpo.loss_type == "sigmoid" and not c.dpo.label_smoothing:
        print(f"first-step loss {result['first_loss']:.6f} (ln 2 = {math.log(2):.6f}: policy == reference)")
    print(f"probability of a preferred next token: {m0:.3f} -> {m1:.3f}; mean KL(policy || reference) "
          f"{kl:.3f} nats per token")
    final_acc = result["history"][-1]["rewards/accuracies"]
    if not (np.isfinite(m1) and m1 > m0 and final_acc > 0.5):
        raise SystemExit("smoke run FAILED: DPO did not move the policy toward the preferred tokens")
    print("smoke run OK")
