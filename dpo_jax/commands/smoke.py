"""A toy DPO run through the production pieces, in seconds: `dpo-jax smoke`.

The policy is a one-layer GPT-2-shaped Decoder. Preference pairs share a random prompt; the chosen response is
drawn from the lower half of the vocabulary ("preferred" tokens), the rejected one from the upper half. The run
uses what `dpo-jax train` uses — the engine (sharded jitted step), the loader, the reference log-probs
precomputed in a separate jitted pass, the loss registry and the one training loop (`Trainer.fit`) — so DPO
should move probability mass to the preferred half while the implicit-reward accuracy climbs to 1. The first step
has policy == reference, so its loss is exactly ln 2.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import losses, reference
from dpo_jax.config import ConfigError
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.config import shaped_config
from dpo_jax.models.decoder import Decoder, init_params, logits
from dpo_jax.train.engine import build_engine, default_engine_config
from dpo_jax.train.reference_source import ReferenceTables
from dpo_jax.train.trainer import Trainer


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 150
    c.log_every = 25
    c.batch_pairs = 16
    c.prompt_len = 4
    c.response_len = 8
    c.vocab_size = 64
    c.width = 32  # the Decoder's hidden size (one layer, two heads)
    c.chunk_size = 4  # log-prob chunk along the sequence; deliberately small to exercise the scan
    c.learning_rate = 1e-2  # Adam
    c.dpo = ml_collections.ConfigDict(dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0))
    return c


def check_config(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key for a config this run cannot use."""
    if c.vocab_size < 4 or c.vocab_size % 2:
        raise ConfigError(f"config.vocab_size must be an even number >= 4, got {c.vocab_size}")
    try:
        losses.validate_loss_args(**c.dpo)
    except ValueError as e:
        raise ConfigError(f"config.dpo: {e}") from None


def _pairs(c: ml_collections.ConfigDict, n: int, seed: int) -> list[dict[str, Any]]:
    """n pairs: a shared random prompt, a chosen response from the low half of the vocabulary, a rejected one
    from the high half; the responses are scored."""
    rng = np.random.default_rng(seed)
    half, mask = c.vocab_size // 2, np.r_[np.zeros(c.prompt_len), np.ones(c.response_len)].astype(np.int32)
    out = []
    for i in range(n):
        prompt = rng.integers(0, c.vocab_size, c.prompt_len)
        chosen, rejected = rng.integers(0, half, c.response_len), rng.integers(half, c.vocab_size, c.response_len)
        out.append({"example_id": i, "chosen_input_ids": np.r_[prompt, chosen].astype(np.int32),
                    "chosen_loss_mask": mask, "rejected_input_ids": np.r_[prompt, rejected].astype(np.int32),
                    "rejected_loss_mask": mask})
    return out


def _preferred_mass_and_kl(model, params, ref, prompts: np.ndarray) -> tuple[float, float]:
    """The next-token distribution after held-out prompts: mean probability of a preferred token, and mean
    KL(π‖π_ref) in nats."""
    def next_token(p):
        return jax.nn.log_softmax(logits(p, model, Decoder(model).apply({"params": p}, prompts))[:, -1], -1)

    logp, logq = next_token(params), next_token(ref)
    mass = jnp.mean(jnp.sum(jnp.exp(logp[:, : model.vocab_size // 2]), -1))
    kl = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
    return float(mass), float(kl)


def train(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the toy DPO; returns the log points and the before/after preferred mass and KL."""
    check_config(c)
    model = shaped_config("gpt2", c.vocab_size, c.width, 1, 2, 4 * c.width,
                          max_position_embeddings=c.prompt_len + c.response_len)
    e = default_engine_config()
    e.train.global_batch_pairs, e.train.logprob_chunk_size = c.batch_pairs, c.chunk_size
    e.dpo.update(c.dpo.to_dict())
    e.optimizer.name, e.optimizer.learning_rate, e.optimizer.warmup_steps = "adam", c.learning_rate, 0
    engine = build_engine(e, model, lambda: init_params(model, jax.random.key(c.seed)), devices=jax.devices()[:1])
    initial = jax.tree.map(jnp.copy, engine.state.params)  # the reference; the state's own buffers get donated

    loader = PreferenceLoader(_pairs(c, c.steps * c.batch_pairs, c.seed), global_batch_pairs=c.batch_pairs,
                              seq_len=c.prompt_len + c.response_len, seed=c.seed)
    table = reference.compute_table(initial, engine.reference_logps, loader.one_pass())  # separate jitted pass
    prompts = np.stack([p["chosen_input_ids"][: c.prompt_len] for p in _pairs(c, 256, c.seed + 1)])
    before = _preferred_mass_and_kl(model, initial, initial, prompts)
    trainer = Trainer(engine, steps=c.steps, reference=ReferenceTables({"train": table}),
                      writer=MetricWriter(None), log_every=c.log_every)
    state, _ = trainer.fit(engine.state, loader)
    loader.close()
    after = _preferred_mass_and_kl(model, state.params, initial, prompts)
    return {"first_loss": _first_loss(engine, initial, loader, table), "history": trainer.history,
            "preferred_mass": (before[0], after[0]), "kl": (before[1], after[1])}


def _first_loss(engine, params, loader: PreferenceLoader, table) -> float:
    """The loss of the first training batch at the initial policy (= the reference): the first step's loss."""
    batch = ReferenceTables({"train": table}).attach(loader.batch_at(0, 0), "train")
    metrics = engine.eval_step(params, engine.shard_batch(batch))
    return float(metrics["loss"].total / metrics["loss"].count)


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
