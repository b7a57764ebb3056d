"""One Flax linen decoder-only transformer whose `ModelConfig` switches cover every supported HF family.

`Decoder.apply({'params': p}, input_ids, ...)` returns the final normed hidden states [B, T, D]; the log-prob code
multiplies them with `unembedding(params, config)` in chunks, so full logits are never needed in training.
Every parameter carries logical axis names (embed, mlp, heads, kv_heads, head_dim, vocab, layers) for sharding rules.

Decoding uses an explicit KV cache (`init_cache`), passed in and returned, so sampling stays a pure jitted function.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.compile_target import target_platform
# SEGMENT_STRIDE and build_attention_mask are imported from here by the data layouts and tests
from dpo_jax.models.attention import (SEGMENT_STRIDE, Cache, attention_impl, build_attention_mask,  # noqa: F401
                                      cached_attention, causal_attention)
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.rotary import apply_rotary

Array = jax.Array

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _init(axes: tuple[str | None, ...], init: Any = nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, axes)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    config: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        pdt = jnp.dtype(c.param_dtype)
        d = x.shape[-1]
        scale = self.param("scale", _init((self.axis_name,), nn.initializers.ones), (d,), pdt)
        x32 = x.astype(jnp.float32)
        if c.norm_type == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + c.norm_eps)
            y = y * scale.astype(jnp.float32)
        else:
            mean = jnp.mean(x32, -1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
            bias = self.param("bias", _init((self.axis_name,), nn.initializers.zeros), (d,), pdt)
            y = (x32 - mean) * jax.lax.rsqrt(var + c.norm_eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(jnp.dtype(c.dtype))


def _dense(config: ModelConfig, features, axes, name, use_bias, in_axes=-1):
    """DenseGeneral with logical axes on the kernel and bias (bias axes = the output axes); a projection named in
    `config.lora_targets` also gets a low-rank adapter beside it (`name_lora`), so the base parameters keep their
    paths (HF conversion and sharding are unchanged)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    dense = nn.DenseGeneral(
        features=features,
        axis=in_axes,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=_init(axes),
        bias_init=_init(axes[-n_out:], nn.initializers.zeros),
        name=name,
    )
    grad_layout = (lambda y: y) if use_bias else materialized_cotangent  # a bias's gradient already does its job
    if not (config.lora_rank and name in config.lora_targets):
        return lambda x: grad_layout(dense(x))
    adapter = LoraAdapter(config, features if isinstance(features, tuple) else (features,), axes,
                          in_axes if isinstance(in_axes, tuple) else (in_axes,), name=f"{name}_lora")
    return lambda x: grad_layout(dense(x) + adapter(x))


@jax.custom_vjp
def materialized_cotangent(y: Array) -> Array:
    """The identity, whose backward pass makes XLA:CPU write a projection's output gradient g once, row-major.

    The weight gradient x^T g contracts over tokens, so XLA:CPU's matmul wants g transposed; without a second
    consumer of g it fuses that transpose into the elementwise producer of g (SwiGLU's backward: five inputs read
    with a stride per output element), which cost 40 % of a Llama-shaped step (docs/PERFORMANCE.md). A bias's
    gradient (a column sum of g) is such a consumer, and is why biased models did not suffer; this gives g the same
    column sum times 0.0, which XLA may not fold away (0.0 · inf is NaN) and which leaves g bit-identical when
    finite. Other backends get the plain identity."""
    return y


def _materialized_cotangent_bwd(_, g):
    if target_platform() != "cpu":
        return (g,)
    return (g + 0.0 * jnp.sum(g, axis=tuple(range(g.ndim - 1)), keepdims=True),)


materialized_cotangent.defvjp(lambda y: (y, None), _materialized_cotangent_bwd)


class LoraAdapter(nn.Module):
    """The low-rank update (alpha / r) · x A B of one projection (Hu et al., 2021; PEFT's initialisation: A uniform
    in ±1/sqrt(fan_in), B = 0, so a new adapter leaves the model unchanged). Float32 parameters whatever the base's
    dtype; the rank axis is replicated (logical name None), the others shard like the base kernel's.
    With `lora_dropout`, the adapter's input is dropped (as PEFT) when the caller passes a "dropout" key — the
    training steps do; evaluation, sampling and the reference never do, so they need no switch."""

    config: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # the base kernel's logical axes: inputs, then outputs
    in_axes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, r, n_in = self.config, self.config.lora_rank, len(self.in_axes)
        in_shape = tuple(x.shape[a] for a in self.in_axes)
        init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                                  out_axis=-1)
        a = self.param("a", _init(self.axes[:n_in] + (None,), init_a), in_shape + (r,), jnp.float32)
        b = self.param("b", _init((None,) + self.axes[n_in:], nn.initializers.zeros), (r,) + self.features,
                       jnp.float32)
        dt = jnp.dtype(c.dtype)
        if c.lora_dropout and self.has_rng("dropout"):
            x = nn.Dropout(c.lora_dropout, deterministic=False)(x)
        contract = tuple(a % x.ndim for a in self.in_axes)
        low = jax.lax.dot_general(x, a.astype(dt), ((contract, tuple(range(n_in))), ((), ())))
        return jnp.tensordot(low, b.astype(dt), axes=1) * (c.lora_alpha / r)


class Attention(nn.Module):
    config: ModelConfig
    shared_segment: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache_index=None, layer_cache=None):
        c = self.config
        h, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q = _dense(c, (h, hd), ("embed", "heads", "head_dim"), "q", c.qkv_bias)(x)
        k = _dense(c, (kv, hd), ("embed", "kv_heads", "head_dim"), "k", c.qkv_bias)(x)
        v = _dense(c, (kv, hd), ("embed", "kv_heads", "head_dim"), "v", c.qkv_bias)(x)
        if c.qk_norm:
            q = Norm(c, "head_dim", name="q_norm")(q)
            k = Norm(c, "head_dim", name="k_norm")(k)
        if c.position_embedding == "rotary":
            q, k = apply_rotary(q, positions, c), apply_rotary(k, positions, c)
        new_cache = None
        if layer_cache is not None:  # decoding: returns only this step's keys/values; the Decoder writes them
            k, v = (jnp.swapaxes(x, 1, 2).astype(layer_cache[n].dtype) for n, x in (("k", k), ("v", v)))
            out, new_cache = cached_attention(q, k, v, layer_cache, mask, cache_index), {"k": k, "v": v}
        else:
            # softmax_custom_jvp: the softmax's derivative as y · (g − Σ y·g) rather than through exp / sum (JAX's
            # default still): a third less attention backward work (docs/PERFORMANCE.md), same values
            with jax.softmax_custom_jvp(True):
                out = causal_attention(q, k, v, mask, c, shared_segment=self.shared_segment)
        out = _dense(c, c.hidden_size, ("heads", "head_dim", "embed"), "o", c.attn_out_bias, in_axes=(-2, -1))(out)
        return out, new_cache


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = _ACTIVATIONS[c.activation]
        if c.mlp_type == "swiglu":
            gate = _dense(c, c.intermediate_size, ("embed", "mlp"), "gate", c.mlp_bias)(x)
            up = _dense(c, c.intermediate_size, ("embed", "mlp"), "up", c.mlp_bias)(x)
            return _dense(c, c.hidden_size, ("mlp", "embed"), "down", c.mlp_bias)(act(gate) * up)
        hidden = act(_dense(c, c.intermediate_size, ("embed", "mlp"), "fc_in", c.mlp_bias)(x))
        return _dense(c, c.hidden_size, ("mlp", "embed"), "fc_out", c.mlp_bias)(hidden)


class Block(nn.Module):
    """One layer; the residual wiring is the config's `residual` switch. Scan-compatible signature."""

    config: ModelConfig
    shared_segment: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache_index=None, layer_cache=None):
        c = self.config
        attn, mlp = Attention(c, self.shared_segment, name="attn"), Mlp(c, name="mlp")
        normed = Norm(c, name="attn_norm")(x)
        a, new_cache = attn(normed, positions, mask, cache_index, layer_cache)
        if c.residual == "sequential":
            x = x + a
            x = x + mlp(Norm(c, name="mlp_norm")(x))
        elif c.residual == "parallel":
            x = x + a + mlp(Norm(c, name="mlp_norm")(x))
        else:  # parallel_shared_norm (GPT-J)
            x = x + a + mlp(normed)
        return x, new_cache


class Decoder(nn.Module):
    config: ModelConfig

    def _block(self):
        c = self.config
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
        return block

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        attention_mask: Array | None = None,
        cache: Cache | None = None,
        cache_index: Array | int | None = None,
        shared_segment: int | None = None,
    ):
        """Final hidden states [B, T, D] (and the updated cache when `cache` is given).

        attention_mask: [B, T] (or [B, S] over the cache slots when decoding) with 1 for real tokens.
        positions default to the count of real tokens before each one (right- or left-padding both work).
        segment_ids: [B, T] packed-sequence ids; tokens attend only within their segment (and to the
            `shared_segment` role of their group: a prompt shared by the sequences packed after it; see
            build_attention_mask).
        """
        c = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t) if cache is None else (b, cache["k"].shape[3]), jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("Decoder: pass positions explicitly when decoding with a cache")
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if attention_impl(c) == "pallas" and cache is None:  # the kernel builds the mask from these, per block
            mask = {"key_valid": attention_mask, "positions": positions, "segment_ids": segment_ids}
        else:
            query_index = jnp.arange(t) if cache is None else cache_index + jnp.arange(t)
            mask = build_attention_mask(c, query_index, attention_mask, segment_ids, shared_segment,
                                        positions if cache is None else None)

        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                         param_dtype=jnp.dtype(c.param_dtype), embedding_init=_init(("vocab", "embed")),
                         name="embed")
        x = embed(input_ids)
        if c.position_embedding == "learned":
            x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=jnp.dtype(c.dtype),
                             param_dtype=jnp.dtype(c.param_dtype), embedding_init=_init((None, "embed")),
                             name="pos_embed")(positions)

        block = self._block()
        if c.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_layers,
                unroll=c.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new_cache = scanned(c, shared_segment, name="layers")(x, positions, mask, cache_index, cache)
        else:
            new_layers = []
            for i in range(c.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
                x, lc = block(c, shared_segment, name=f"layers_{i}")(x, positions, mask, cache_index, layer_cache)
                new_layers.append(lc)
            new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_layers)
        if cache is not None:  # every layer's new keys/values [L, B, KV, T, D] into the cache, one in-place write
            new_cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new_cache[name], cache_index, axis=3)
                         for name in cache}

        x = Norm(c, name="final_norm")(x)
        if c.head == "score":  # a reward model: one scalar per token, read at the last one (models/reward.py)
            self.param("score_kernel", _init(("embed", None), nn.initializers.normal((c.hidden_size + 1) ** -0.5)),
                       (c.hidden_size, 1), jnp.dtype(c.param_dtype))
        elif not c.tie_word_embeddings:
            # Created here so init makes it; used through `unembedding`, never as a full-logits matmul.
            self.param("lm_head_kernel", _init(("embed", "vocab")), (c.hidden_size, c.vocab_size),
                       jnp.dtype(c.param_dtype))
        if c.lm_head_bias and c.head == "lm":
            self.param("lm_head_bias", _init(("vocab",), nn.initializers.zeros), (c.vocab_size,),
                       jnp.dtype(c.param_dtype))
        return x if cache is None else (x, new_cache)


def unembedding(params: dict, config: ModelConfig) -> tuple[Array, Array | None]:
    """(kernel [D, V], bias [V] or None) of the output projection: the transposed embedding when tied."""
    if config.head != "lm":
        raise ValueError(f"this model has a {config.head!r} head (a reward model), not a language-model head: it "
                         "scores sequences and cannot give token log-probs or sample")
    params = nn.meta.unbox(params)
    kernel = params["embed"]["embedding"].T if config.tie_word_embeddings else params["lm_head_kernel"]
    return kernel, params.get("lm_head_bias")


def logits(params: dict, config: ModelConfig, hidden: Array) -> Array:
    """Full float32 logits [B, T, V] — for decoding and tests; training uses chunked log-probs instead."""
    kernel, bias = unembedding(params, config)
    out = jnp.einsum("btd,dv->btv", hidden.astype(jnp.dtype(config.dtype)), kernel.astype(jnp.dtype(config.dtype)),
                     preferred_element_type=jnp.float32)
    return out if bias is None else out + bias.astype(jnp.float32)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
    """An empty KV cache for `length` slots (prompt + new tokens)."""
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_params(config: ModelConfig, rng: Array) -> dict:
    """Random parameters (unboxed) for a config: tests and from-scratch models like the sentiment experiment's."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(Decoder(config).init(rng, ids)["params"])


def logical_axes(config: ModelConfig) -> Any:
    """The logical PartitionSpec of every parameter (a pytree like the params), computed without allocating."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype)))
    return nn.get_partition_spec(boxed["params"])
