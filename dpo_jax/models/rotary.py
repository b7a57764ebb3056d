"""Rotary position embeddings: frequencies (plain and Llama-3 scaled) and their application.

Two layouts exist in the wild for the same math: GPT-NeoX/Llama rotate the two halves of the rotary dims against
each other, GPT-J rotates adjacent pairs. Partial rotary (NeoX `rotary_pct`, GPT-J `rotary_dim`) rotates only the
leading dims of each head and passes the rest through.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[rotary_dims / 2] float32 inverse frequencies, with Llama-3 scaling applied when configured."""
    dim = config.rotary_dims
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = config.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotates x [B, T, heads, head_dim] by positions [B, T]; math in float32, result in x's dtype."""
    dim = config.rotary_dims
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))  # [B, T, dim/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
    if config.rope_interleaved:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(rot.shape)
    else:
        first, second = rot[..., : dim // 2], rot[..., dim // 2:]
        rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
