"""PPO's math for language models (Ziegler et al. 2019; Stiennon et al. 2020; TRL's PPOTrainer), as pure functions
of [B, L] arrays over the generated tokens with a mask (1 up to and including EOS).

Alignment: `logps[:, t]` is log π(y_t | x, y_<t) and `values[:, t]` the value of the state that emits y_t (the
hidden state before y_t), so the reward of the action y_t is `rewards[:, t]` and GAE runs over t = L-1 .. 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x − mean)/std over the masked entries (unbiased variance, as TRL); the mean is added back unless
    `shift_mean`. Entries outside the mask come out 0."""
    mask = mask.astype(jnp.float32)
    n = jnp.sum(mask)
    mean = masked_mean(x, mask)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(logps: Array, ref_logps: Array, mask: Array, scores: Array, kl_coef: Array | float
                         ) -> tuple[Array, Array, Array]:
    """Per-token rewards −kl_coef·(log π − log π_ref), plus each sequence's score at its last generated token.
    Returns (rewards [B, L], kl [B, L] = log π − log π_ref, non_score_rewards [B, L]); 0 outside the mask."""
    mask = mask.astype(jnp.float32)
    kl = (logps - ref_logps) * mask
    non_score = -kl_coef * kl
    last = jnp.argmax(jnp.where(mask > 0, jnp.arange(mask.shape[1]), -1), axis=1)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * (jnp.sum(mask, 1, keepdims=True) > 0)
    return non_score + scores[:, None] * at_last, kl, non_score


def gae(rewards: Array, values: Array, mask: Array, gamma: float = 1.0, lam: float = 0.95) -> tuple[Array, Array]:
    """Generalized advantage estimation by a reverse `lax.scan`: (advantages, returns = advantages + values), 0
    outside the mask. The value after the last generated token is 0 (the episode ends there)."""
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))

    def step(carry, xs):
        r, v, nv, m = xs
        delta = r + gamma * nv - v
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (rewards, values, next_values, mask))
    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), xs, reverse=True)
    advantages = jnp.moveaxis(adv, 0, 1)
    return advantages, (advantages + values) * mask


def policy_loss(logps: Array, old_logps: Array, advantages: Array, mask: Array, clip: float = 0.2
                ) -> tuple[Array, dict[str, Array]]:
    """The clipped surrogate, a masked token mean; and TRL's statistics (clipfrac, approxkl = ½(Δ log π)², ratio)."""
    mask = mask.astype(jnp.float32)
    diff = logps - old_logps
    ratio = jnp.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
             "approxkl": 0.5 * masked_mean(jnp.square(diff), mask), "ratio": masked_mean(ratio, mask)}
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float = 0.2
               ) -> tuple[Array, Array]:
    """½ · masked mean of max((v − R)², (clip(v, v_old ± clip) − R)²), and the fraction where the clip binds."""
    mask = mask.astype(jnp.float32)
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    a, b = jnp.square(values - returns), jnp.square(clipped - returns)
    return 0.5 * masked_mean(jnp.maximum(a, b), mask), jax.lax.stop_gradient(masked_mean((b > a).astype(
        jnp.float32), mask))


def adaptive_kl_coef(kl_coef: Array | float, observed_kl: Array | float, target: float, horizon: float,
                     n_steps: int) -> Array:
    """Ziegler et al.'s controller: kl_coef · (1 + clip(KL/target − 1, ±0.2) · n_steps/horizon), n_steps = the
    episodes since the last update."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
