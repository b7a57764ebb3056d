"""KV-cache decoding and sampling agree with the full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import token_logprobs
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, init_cache, init_params, logits, unembedding
from dpo_jax.models.generate import SamplingConfig, filter_logits, generate

LLAMA = ModelConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=48, sliding_window=6)
GPT2 = ModelConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   intermediate_size=64, norm_type="layernorm", position_embedding="learned", mlp_type="gelu",
                   activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                   max_position_embeddings=64, family="gpt2")
GPTJ = ModelConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   intermediate_size=64, norm_type="layernorm", rotary_dim=4, rope_interleaved=True,
                   residual="parallel_shared_norm", mlp_type="gelu", activation="gelu_tanh", mlp_bias=True,
                   lm_head_bias=True, family="gptj")
CONFIGS = {"llama_gqa_window": LLAMA, "gpt2": GPT2, "gptj": GPTJ, "llama_scanned": LLAMA.replace(scan_layers=True)}


def _params(config, seed=0):
    params = init_params(config, jax.random.key(seed))
    # Non-trivial norms/biases so every term of the forward pass matters.
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(seed + 1), p.shape), params)


def _left_padded_prompts():
    ids = np.array([[5, 9, 2, 7, 1, 3], [0, 0, 4, 8, 8, 6], [0, 0, 0, 0, 0, 11]])
    return ids, (np.arange(6) >= np.array([[0], [2], [5]])).astype(np.int32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decode_equals_full_forward_at_every_step(name):
    config = CONFIGS[name]
    params = _params(config)
    ids, mask = _left_padded_prompts()
    full = np.concatenate([ids, np.random.default_rng(0).integers(1, 53, (3, 5))], axis=1)  # teacher-forced tokens
    full_mask = np.concatenate([mask, np.ones((3, 5), np.int32)], axis=1)
    model = Decoder(config)

    @jax.jit  # one compile per input shape (full, prompt, one token) rather than an op-by-op run of each call
    def forward(ids, positions, valid, cache, index):
        hidden, cache = model.apply({"params": params}, ids, positions=positions, attention_mask=valid, cache=cache,
                                    cache_index=index)
        return logits(params, config, hidden), cache

    want = jax.jit(lambda ids, mask: logits(params, config, model.apply({"params": params}, ids,
                                                                         attention_mask=mask)))(full, full_mask)
    positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    cache, total = init_cache(config, 3, full.shape[1]), full.shape[1]
    key_valid = np.zeros((3, total), np.int32)
    key_valid[:, :6] = mask
    step, cache = forward(ids, positions[:, :6], key_valid.copy(), cache, 0)  # copies: key_valid changes below
    got = [step]
    for t in range(6, total):
        key_valid[:, t] = 1
        step, cache = forward(full[:, t:t + 1], positions[:, t:t + 1], key_valid.copy(), cache, t)
        got.append(step)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    real = full_mask.astype(bool)
    assert np.abs(got - np.asarray(want))[real].max() < 1e-5


@functools.partial(jax.jit, static_argnums=1)
def _forward_logps(params, config, prompt_ids, prompt_mask, samples):
    full = jnp.concatenate([jnp.asarray(prompt_ids), samples.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(prompt_mask), samples.mask], 1)
    hidden = Decoder(config).apply({"params": params}, full, attention_mask=full_mask)
    kernel, bias = unembedding(params, config)
    return token_logprobs(hidden, kernel, full, bias=bias)[:, prompt_ids.shape[1]:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampled_logps_equal_the_forward_pass(name):
    config = CONFIGS[name]
    params = _params(config, 3)
    ids, mask = _left_padded_prompts()
    s = SamplingConfig(max_new_tokens=9, temperature=0.8, top_k=30, top_p=0.95)
    out = generate(params, config, ids, mask, jax.random.key(7), s)
    forward = _forward_logps(params, config, ids, mask, out)
    assert np.abs(np.asarray((forward - out.logps) * out.mask)).max() < 1e-4
    assert np.all(np.asarray(out.sampling_logps) <= 1e-6)
    assert np.all(np.asarray(out.lengths) == 9)


def test_eos_stops_rows_and_pads_after_it():
    config = LLAMA
    params = _params(config, 5)
    ids, mask = _left_padded_prompts()
    free = generate(params, config, ids, mask, jax.random.key(1), SamplingConfig(max_new_tokens=12))
    eos = int(free.tokens[0, 3])  # a token row 0 emits at step 3: make it the EOS
    out = generate(params, config, ids, mask, jax.random.key(1), SamplingConfig(max_new_tokens=12, eos_id=eos,
                                                                                 pad_id=-1))
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(3):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        length = hits[0] + 1 if hits.size else 12
        assert out.lengths[row] == length and m[row].sum() == length
        np.testing.assert_array_equal(tokens[row, :length], np.asarray(free.tokens[row, :length]))
        assert np.all(tokens[row, length:] == -1)
    assert out.lengths[0] <= 4


def test_greedy_follows_the_argmax_of_the_forward_pass_and_top_k_1_is_greedy():
    config = GPT2
    params = _params(config, 2)
    ids, mask = _left_padded_prompts()
    greedy = generate(params, config, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, greedy=True))
    full = jnp.concatenate([jnp.asarray(ids), greedy.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), greedy.mask], 1)
    lg = logits(params, config, Decoder(config).apply({"params": params}, full, attention_mask=full_mask))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(lg[:, 5:-1], -1)), np.asarray(greedy.tokens))
    assert np.all(np.asarray(greedy.sampling_logps) == 0.0)
    top1 = generate(params, config, ids, mask, jax.random.key(9), SamplingConfig(max_new_tokens=6, top_k=1))
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def test_per_row_rng_makes_a_row_independent_of_its_batch():
    config = LLAMA
    params = _params(config, 4)
    ids, mask = _left_padded_prompts()
    keys = jax.random.split(jax.random.key(11), 3)
    s = SamplingConfig(max_new_tokens=8)
    batch = generate(params, config, ids, mask, keys, s)
    alone = generate(params, config, ids[1:2], mask[1:2], keys[1:2], s)
    np.testing.assert_array_equal(np.asarray(batch.tokens[1]), np.asarray(alone.tokens[0]))
    again = generate(params, config, ids, mask, keys, s)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(batch.tokens))
    other = generate(params, config, ids, mask, jax.random.split(jax.random.key(12), 3), s)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(batch.tokens))


def test_per_row_temperatures_equal_separate_runs_and_temperature_0_is_greedy_and_deterministic():
    config = LLAMA
    params = _params(config, 5)
    ids, mask = _left_padded_prompts()
    keys = jax.random.split(jax.random.key(3), 3)
    s = SamplingConfig(max_new_tokens=7)
    mixed = generate(params, config, ids, mask, keys, s, temperature=jnp.asarray([0.0, 0.5, 1.3]))
    for row, t in enumerate((0.0, 0.5, 1.3)):
        alone = generate(params, config, ids, mask, keys, s if t else SamplingConfig(max_new_tokens=7, greedy=True),
                         temperature=None if t == 0 else t)
        for field in ("tokens", "mask", "logps", "sampling_logps"):
            np.testing.assert_allclose(np.asarray(getattr(mixed, field)[row]), np.asarray(getattr(alone, field)[row]),
                                       rtol=1e-6, atol=1e-6, err_msg=f"{field} row {row} (T={t})")
    again = generate(params, config, ids, mask, jax.random.split(jax.random.key(99), 3), s, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(again.tokens[0]), np.asarray(mixed.tokens[0]))  # greedy: no rng
    assert np.all(np.asarray(again.sampling_logps) == 0.0)
    with pytest.raises(ValueError, match="temperatures must be >= 0"):
        generate(params, config, ids, mask, keys, s, temperature=jnp.asarray([1.0, -0.5, 1.0]))


def test_filter_logits_matches_numpy_top_k_and_top_p():
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 2, (4, 30)).astype(np.float32)
    s = SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=10, top_p=0.8)
    got = np.asarray(filter_logits(jnp.asarray(raw), s))
    for row in range(4):
        x = raw[row] / 0.7
        keep = x >= np.sort(x)[-10]
        x = np.where(keep, x, -np.inf)
        order = np.argsort(-x)
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        above = np.cumsum(p) - p
        nucleus = np.zeros(30, bool)
        nucleus[order[above <= 0.8]] = True
        np.testing.assert_array_equal(np.isfinite(got[row]), nucleus)
        np.testing.assert_allclose(got[row][nucleus], x[nucleus], rtol=1e-6)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(max_new_tokens=3, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=3, top_p=0.0)
    ids, mask = _left_padded_prompts()
    right_padded = mask[:, ::-1]
    with pytest.raises(ValueError, match="left-padded"):
        generate(_params(LLAMA), LLAMA, ids, right_padded, jax.random.key(0), SamplingConfig(max_new_tokens=2))
