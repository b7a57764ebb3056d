"""Decoder behaviours not tied to a checkpoint: packed sequences and the unembedding helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, init_params, logits, unembedding

CONFIG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=48, qk_norm=True)


@pytest.mark.parametrize("position_embedding", ["rotary", "learned"])
def test_packed_sequences_equal_separate_forward_passes(position_embedding):
    config = CONFIG.replace(position_embedding=position_embedding, max_position_embeddings=32)
    params = init_params(config, jax.random.key(0))
    model = Decoder(config)
    apply = jax.jit(model.apply)  # compiled, not op by op (the suite's time)
    a, b = np.arange(1, 8), np.arange(20, 25)  # lengths 7 and 5, packed into one row of 14 with 2 pad tokens
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.concatenate([np.ones(7), 2 * np.ones(5), [3, 3]])[None].astype(np.int32)
    positions = np.concatenate([np.arange(7), np.arange(5), [0, 1]])[None]
    got = apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(positions),
                      segment_ids=jnp.asarray(segments))
    alone_a = apply({"params": params}, jnp.asarray(a[None]))
    alone_b = apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(np.asarray(got[0, :7]), np.asarray(alone_a[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[0, 7:12]), np.asarray(alone_b[0]), atol=1e-5)
    unpacked = apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(positions))
    assert np.abs(np.asarray(unpacked[0, 7:12]) - np.asarray(alone_b[0])).max() > 1e-3  # segments do matter


def test_tied_unembedding_is_the_embedding_and_lm_head_bias_is_used():
    config = CONFIG.replace(tie_word_embeddings=True, lm_head_bias=True)
    params = init_params(config, jax.random.key(1))
    assert "lm_head_kernel" not in params
    kernel, bias = unembedding(params, config)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(params["embed"]["embedding"]).T)
    params["lm_head_bias"] = jnp.arange(40, dtype=jnp.float32)
    hidden = Decoder(config).apply({"params": params}, jnp.ones((1, 3), jnp.int32))
    no_bias = hidden @ params["embed"]["embedding"].T
    np.testing.assert_allclose(np.asarray(logits(params, config, hidden) - no_bias),
                               np.broadcast_to(np.arange(40.0), (1, 3, 40)), atol=1e-5)


def test_presets_build_the_shapes_they_name_and_gpt2_matches_the_hf_reading():
    from dpo_jax.convert.families import _gpt2_config
    from dpo_jax.models.config import PRESETS, shaped_config

    for name, shape in PRESETS.items():
        config = shaped_config(vocab_size=100, **shape)
        assert config.family == shape["family"] and config.num_heads * config.head_dim == shape["hidden_size"], name
    hf = {"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}  # HF GPT2Config defaults
    assert _gpt2_config(hf) == shaped_config(vocab_size=100, max_position_embeddings=128, **PRESETS["gpt2-tiny"])
    with pytest.raises(ValueError, match="model family 'gptj' for a from-scratch model; valid: gpt2, llama"):
        shaped_config("gptj", 100, 64, 2, 4, 256)


def test_materialized_cotangent_is_the_identity_with_bit_identical_gradients():
    """The XLA:CPU layout workaround on bias-free projections (decoder.materialized_cotangent) changes no value."""
    from dpo_jax.models.decoder import materialized_cotangent

    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (4, 6))

    def loss(w, wrap):
        y = wrap(jnp.einsum("bthd,de->bthe", x, w))
        return jnp.sum(jax.nn.silu(y) * y)

    plain = jax.jit(jax.grad(lambda w: loss(w, lambda y: y)))(w)
    wrapped = jax.jit(jax.grad(lambda w: loss(w, materialized_cotangent)))(w)
    np.testing.assert_array_equal(wrapped, plain)
    np.testing.assert_array_equal(materialized_cotangent(x), x)
    assert float(jnp.abs(plain).max()) > 0


@pytest.mark.parametrize("switch", [{"sliding_window": 5}, {"scan_layers": True, "remat_policy": "dots"}],
                         ids=["sliding_window", "scanned_remat"])
def test_causal_query_blocks_equal_one_dense_attention(switch):
    """`attention_query_block` (queries in blocks that skip the causal upper triangle) changes no real token's
    hidden state or any gradient — with packed segments, a padded row, GQA, sliding windows — and does less work."""
    config = CONFIG.replace(**switch)
    blocked = config.replace(attention_query_block=7)  # 30 tokens: 4 query blocks
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 30), 0, 40)
    segments = jnp.asarray(np.repeat(np.arange(5) * 4 + 1, 6)[None].repeat(3, 0))  # five sequences of 6 per row
    mask = jnp.ones((3, 30), jnp.int32).at[2, 25:].set(0)

    def loss(p, c):
        hidden = Decoder(c).apply({"params": p}, ids, segment_ids=segments, attention_mask=mask)
        return jnp.sum(jnp.sin(hidden) * mask[..., None]), hidden

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (want, hidden), grads = step(params, config)
    (got, hidden_b), grads_b = step(params, blocked)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(hidden_b)[real], np.asarray(hidden)[real], atol=2e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
    flops = [step.lower(params, c).cost_analysis()["flops"] for c in (config, blocked)]
    assert flops[1] < flops[0]
    with pytest.raises(ValueError, match="attention_query_block = -1"):
        config.replace(attention_query_block=-1)
