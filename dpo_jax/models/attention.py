"""Attention for the Decoder: which implementation a pass uses, XLA's causal attention (queries in blocks),
attention over a KV cache while decoding, and the boolean mask that encodes causality, padding, packed segments
and the sliding window. Its own module so models/decoder.py keeps the layers and the wiring."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.compile_target import target_platform
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.pair_attention import pair_attention

Array = jax.Array
# {"k", "v"}: [layers, B, kv_heads, S, head_dim] — slots next to head_dim, so the decode step's two attention
# matmuls read a layer's cache as it lies (with S before the heads, XLA:CPU transposed it every token)
Cache = dict[str, Array]


SEGMENT_STRIDE = 4  # segment id = SEGMENT_STRIDE · group (a packed pair) + role (padding, prompt, chosen, rejected)


def build_attention_mask(
    config: ModelConfig,
    query_index: Array,
    key_valid: Array,
    segment_ids: Array | None = None,
    shared_segment: int | None = None,
    positions: Array | None = None,
) -> Array:
    """Boolean [B, 1, Tq, S] mask: causal on slot indices, padding, packing segments and the sliding window.

    segment_ids: id = SEGMENT_STRIDE · group + role. Tokens attend within their own id, and to keys whose role is
    `shared_segment` in the same group (still causally): one prompt shared by the chosen and the rejected response
    packed after it, several such pairs (groups) one after another in a row, attention never crossing groups.

    query_index: [Tq] slot index of each query (0..T-1 without a cache; cache_index + t with one).
    key_valid: [B, S] 1 where a key slot holds a real token.
    positions: [B, T] token positions when queries and keys are the same tokens (no cache). The sliding window is
        measured in positions, not slots: in a packed row a response's positions restart after the shared prompt,
        and it must see the prompt keys it would see as its own sequence. With a cache (left-padded prompts, one
        token per slot after them) slot distance equals position distance for every real key.
    """
    key_index = jnp.arange(key_valid.shape[1])
    allowed = (key_index[None, :] <= query_index[:, None])[None]  # [1, Tq, S]
    if config.sliding_window is not None:
        if positions is None:
            distance = (query_index[:, None] - key_index[None, :])[None]
        else:
            distance = positions[:, :, None] - positions[:, None, :]  # [B, T, T]
        allowed = allowed & (distance < config.sliding_window)
    mask = allowed[:, None] & key_valid.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        if shared_segment is not None:
            group = segment_ids // SEGMENT_STRIDE
            same |= ((segment_ids % SEGMENT_STRIDE) == shared_segment)[:, None, :] & \
                (group[:, :, None] == group[:, None, :])
        mask &= same[:, None]
    return mask


def attention_impl(config: ModelConfig) -> str | None:
    """The attention a training/scoring pass uses: the config's, or automatically the Pallas kernel
    (models/pair_attention.py) when building for a TPU and XLA's elsewhere."""
    if config.attention_impl is None:
        return "pallas" if target_platform() == "tpu" else None
    return config.attention_impl


def causal_attention(q: Array, k: Array, v: Array, mask: Array | dict, config: ModelConfig,
                     shared_segment: int | None = None) -> Array:
    """Attention of T tokens over themselves (training and scoring passes; decoding is `cached_attention`). `mask` a
    dict of per-token inputs (Decoder: the Pallas kernel's path): the kernel, which builds the mask itself. Else
    `jax.nn.dot_product_attention` under the boolean mask; with XLA's attention the queries go in blocks of about
    `config.attention_query_block` rows, block i attending only the keys up to its own end. The causal upper triangle,
    masked for every query anyway, is then never computed — at 576 tokens in three blocks a third of the T × T work.
    Exact: each query's softmax sees the same unmasked keys."""
    if isinstance(mask, dict):
        return pair_attention(q, k, v, **mask, shared_segment=shared_segment, sliding_window=config.sliding_window,
                              scale=config.head_dim**-0.5, interpret=target_platform() != "tpu")
    impl = config.attention_impl
    t, size = q.shape[1], config.attention_query_block
    n = round(t / size) if size and impl != "cudnn" else 1
    if n < 2:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=config.head_dim**-0.5, implementation=impl)
    ends = [round(t * (i + 1) / n) for i in range(n)]
    return jnp.concatenate([
        jax.nn.dot_product_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask=mask[:, :, lo:hi, :hi],
                                     scale=config.head_dim**-0.5, implementation=impl)
        for lo, hi in zip([0] + ends[:-1], ends)], axis=1)


def cached_attention(q: Array, k: Array, v: Array, cache: Cache, mask: Array, cache_index: Array | int) -> Array:
    """T new queries [B, T, H, D] over a layer cache's keys [B, KV, S, D] and their own T keys [B, KV, T, D], without
    writing the cache: two score blocks under one softmax (one max, one sum). Writing the new keys into a layer's cache
    slice first, as a plain attention call needs, copies that layer's whole cache every decoded token — most of a decode
    step's memory traffic (docs/PERFORMANCE.md, "Sampling"); the Decoder instead writes every layer's new keys into the
    stacked cache once, in place. The cache's slots [cache_index, cache_index + T) are stale (not yet written): masked
    there, their mask entries serve the new block. A query with no visible key at all (a left-padding prompt slot) gets
    a uniform average, as XLA's masked attention gives it; nothing reads it."""
    b, t, h, d = q.shape
    kv, s = k.shape[1], cache["k"].shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    slot = jnp.arange(s)
    stale = (slot >= cache_index) & (slot < cache_index + t)
    old_mask = (mask & ~stale)[:, :, None]  # [B, 1, 1, T, S] against scores [B, KV, G, T, S]
    new_mask = jax.lax.dynamic_slice_in_dim(mask, cache_index, t, axis=3)[:, :, None]
    scale, lowest = d**-0.5, jnp.finfo(jnp.float32).min

    def scores(keys, keep):
        raw = jnp.einsum("btkgd,bksd->bkgts", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        return jnp.where(keep, raw * scale, lowest)

    old, new = scores(cache["k"], old_mask), scores(k, new_mask)
    top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    total = p_old.sum(-1) + p_new.sum(-1)  # [B, KV, G, T]
    out = (jnp.einsum("bkgts,bksd->btkgd", p_old.astype(q.dtype), cache["v"].astype(q.dtype),
                      preferred_element_type=jnp.float32) +
           jnp.einsum("bkgts,bksd->btkgd", p_new.astype(q.dtype), v.astype(q.dtype),
                      preferred_element_type=jnp.float32))
    return (out / jnp.moveaxis(total, 3, 1)[..., None]).reshape(b, t, h, d).astype(q.dtype)
