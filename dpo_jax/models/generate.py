"""Jitted autoregressive sampling with a KV cache and static shapes.

Prompts are left-padded to one length P so every row writes the same cache slot each step; the cache holds
P + max_new_tokens slots, so one compile serves a whole run. Each row has its own RNG key, folded with the step,
so a row's sample does not depend on what else is in the batch.

Two log-probs come back per token: `logps` under the model itself (temperature 1, no truncation) — exactly what a
forward pass over prompt + sample gives, which is what KL estimates and PPO need — and `sampling_logps` under the
distribution actually sampled from (temperature, top-k, top-p; 0 for greedy).

The temperature is an argument of the compiled function, not part of its static key, and may differ per row
(0 = greedy): one compile serves a whole temperature sweep, and several temperatures can share one batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, init_cache, logits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class Samples(NamedTuple):
    tokens: Array  # [B, N] generated ids; pad_id after EOS
    logps: Array  # [B, N] float32 log π(token | prefix), the model's own distribution
    sampling_logps: Array  # [B, N] float32 log-prob under the sampling distribution
    mask: Array  # [B, N] 1 for generated tokens up to and including EOS
    lengths: Array  # [B] number of generated tokens (EOS included)


def ended_with_eos(tokens: Any, mask: Any, eos_id: int | None) -> np.ndarray:
    """[..., N] sampled tokens and their mask -> [...] bool: the sample ended with EOS before its budget ran out
    (all False without an EOS id). Host arrays."""
    tokens = np.asarray(tokens)
    if eos_id is None:
        return np.zeros(tokens.shape[:-1], bool)
    return np.any((tokens == eos_id) & (np.asarray(mask) > 0), -1)


def filter_logits(raw: Array, s: SamplingConfig, temperature: Array | None = None) -> Array:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits [B, V]; removed entries become -inf.
    temperature: [B] per-row temperatures (> 0) instead of s.temperature."""
    x = raw / (s.temperature if temperature is None else temperature[:, None])
    if s.top_k:
        kth = jax.lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
        cutoff = jnp.min(jnp.where(before > s.top_p, jnp.inf, sorted_x), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def _choose(raw: Array, row_keys: Array, step: Array, temperature: Array, s: SamplingConfig
            ) -> tuple[Array, Array, Array]:
    """Next token per row and its two log-probs; rows at temperature 0 take the argmax."""
    model_logp = jax.nn.log_softmax(raw, axis=-1)
    greedy = temperature == 0
    filtered = filter_logits(raw, s, jnp.where(greedy, 1.0, temperature))
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    token = jnp.where(greedy, jnp.argmax(raw, axis=-1), sampled)
    sampling_lp = jnp.take_along_axis(jax.nn.log_softmax(filtered, -1), token[:, None], -1)[:, 0]
    return token, jnp.take_along_axis(model_logp, token[:, None], -1)[:, 0], jnp.where(greedy, 0.0, sampling_lp)


def _prefill(params, prompt_ids, prompt_mask, config: ModelConfig, s: SamplingConfig) -> tuple:
    """The prompts through the model into a cache of P + max_new_tokens slots: the decode loop's first carry
    (step, cache, key validity, last logits, next positions, samples so far, done, None)."""
    b, p = prompt_ids.shape
    n = s.max_new_tokens
    key_valid = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt_mask.astype(jnp.int32))
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    hidden, cache = Decoder(config).apply({"params": params}, prompt_ids, positions=positions,
                                          attention_mask=key_valid, cache=init_cache(config, b, p + n), cache_index=0)
    last_logits = logits(params, config, hidden[:, -1:])[:, 0]
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    empty = Samples(jnp.full((b, n), s.pad_id, jnp.int32), jnp.zeros((b, n)), jnp.zeros((b, n)),
                    jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), jnp.int32))
    return jnp.asarray(0), cache, key_valid, last_logits, next_pos, empty, jnp.zeros((b,), bool), None


def _decode_step(carry: tuple, params, row_keys, temperature, prompt_length: int, config: ModelConfig,
                 s: SamplingConfig) -> tuple:
    """One token for every row: choose it from the last logits, record it, feed it through the cached model."""
    i, cache, key_valid, raw, pos, out, done, _ = carry
    token, lp, slp = _choose(raw, row_keys, i, temperature, s)
    live = ~done
    token = jnp.where(live, token, s.pad_id)
    out = Samples(
        out.tokens.at[:, i].set(token),
        out.logps.at[:, i].set(jnp.where(live, lp, 0.0)),
        out.sampling_logps.at[:, i].set(jnp.where(live, slp, 0.0)),
        out.mask.at[:, i].set(live.astype(jnp.int32)),
        out.lengths + live.astype(jnp.int32),
    )
    if s.eos_id is not None:
        done = done | (token == s.eos_id)
    key_valid = key_valid.at[:, prompt_length + i].set(1)
    hidden, cache = Decoder(config).apply({"params": params}, token[:, None], positions=pos[:, None],
                                          attention_mask=key_valid, cache=cache, cache_index=prompt_length + i)
    return i + 1, cache, key_valid, logits(params, config, hidden)[:, 0], pos + 1, out, done, None


def _generate(params, prompt_ids, prompt_mask, row_keys, temperature, config: ModelConfig, s: SamplingConfig
              ) -> Samples:
    def cond(carry):
        i, *_, done, _ = carry
        return (i < s.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        return _decode_step(carry, params, row_keys, temperature, prompt_ids.shape[1], config, s)

    return jax.lax.while_loop(cond, body, _prefill(params, prompt_ids, prompt_mask, config, s))[5]


_generate_jit = jax.jit(_generate, static_argnames=("config", "s"))
# the loop's two parts on their own: `dpo-jax plan` counts a decode step's cost once and multiplies it
prefill_jit = jax.jit(_prefill, static_argnames=("config", "s"))
decode_step_jit = jax.jit(_decode_step, static_argnames=("prompt_length", "config", "s"))


def generate(
    params: dict,
    config: ModelConfig,
    prompt_ids: Array,
    prompt_mask: Array,
    rng: Array,
    sampling: SamplingConfig,
    temperature: Array | float | None = None,
) -> Samples:
    """Samples up to `sampling.max_new_tokens` tokens after left-padded prompts [B, P] (mask 1 on real tokens).

    rng: one key (split into one per row) or [B] keys, one per row. temperature: a scalar or [B] per-row
    temperatures (0 = greedy) instead of sampling's. Compiles once per (config, shapes, top-k, top-p, eos, pad):
    temperatures are traced.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, P]")
    if not isinstance(prompt_mask, jax.core.Tracer) and not bool(jnp.all(prompt_mask[:, -1] == 1)):
        raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 for every row")
    b = prompt_ids.shape[0]
    row_keys = rng if rng.shape == (b,) else jax.random.split(rng, b)
    if temperature is None:
        temperature = 0.0 if sampling.greedy else sampling.temperature
    elif not isinstance(temperature, jax.core.Tracer) and bool(jnp.any(jnp.asarray(temperature) < 0)):
        raise ValueError(f"temperatures must be >= 0 (0 = greedy), got {temperature}")
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    static = dataclasses.replace(sampling, temperature=1.0, greedy=False)  # the traced temperature rules
    return _generate_jit(params, prompt_ids, prompt_mask, row_keys, temperature, config, static)


def generate_chunks(params: dict, config: ModelConfig, prompt_ids, prompt_mask, keys: Array, sampling: SamplingConfig,
                    temperature=None, batch_rows: int = 1024) -> Samples:
    """`generate` over many rows [R, P] (one key per row; temperature None, a scalar or [R]) in chunks of
    at most `batch_rows`, as few as that allows, of equal size (1,664 rows: two of 832, not two of 1,024); the last
    chunk wraps around to the same shape, so one compile serves the pass. numpy fields [R]."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    r = len(ids)
    temps = None if temperature is None else np.broadcast_to(np.asarray(temperature, np.float32), (r,))
    rows = -(-r // -(-r // batch_rows))  # ceil(r / number of chunks)
    chunks = []
    for start in range(0, r, rows):
        take = np.arange(start, start + rows) % r
        out = generate(params, config, ids[take], mask[take], keys[take], sampling,
                       None if temps is None else temps[take])
        chunks.append(jax.tree.map(lambda x, k=min(rows, r - start): np.asarray(x)[:k], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)

