"""Chunked log-probs: exact against float64 NumPy and the naive path, in value and gradient, and memory-bounded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import naive_sequence_logprobs, sequence_logprobs, token_logprobs


def _problem(seed=0, n=4, t=13, d=16, v=50, with_bias=True):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(0, 1, (n, t, d)).astype(np.float32)
    kernel = rng.normal(0, 0.5, (d, v)).astype(np.float32)
    bias = rng.normal(0, 0.5, (v,)).astype(np.float32) if with_bias else None
    ids = rng.integers(0, v, (n, t)).astype(np.int32)
    mask = np.zeros((n, t), np.float32)
    mask[0, 4:11] = 1  # prompt 0..3, response 4..10, padding 11..12
    mask[1, 1:] = 1  # whole row scored (column 0 can never be)
    mask[2, 7:9] = 1
    # row 3 stays empty
    return hidden, kernel, bias, ids, mask


def _numpy_token_logps(hidden, kernel, bias, ids):
    logits = hidden.astype(np.float64) @ kernel.astype(np.float64)
    if bias is not None:
        logits += bias
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = np.zeros(ids.shape)
    out[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return out


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 128])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_values_match_float64_numpy(chunk_size, with_bias):
    hidden, kernel, bias, ids, mask = _problem(with_bias=with_bias)
    out = sequence_logprobs(hidden, kernel, ids, mask, bias=bias, chunk_size=chunk_size)
    want = _numpy_token_logps(hidden, kernel, bias, ids) * mask * (np.arange(ids.shape[1]) > 0)
    assert out.token_logps.dtype == jnp.float32 and out.sums.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.token_logps), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.sums), want.sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.counts), [7, 12, 2, 0])
    assert float(out.sums[3]) == 0.0  # the empty row


@pytest.mark.parametrize("chunk_size", [3, 12, 64])
def test_chunked_gradients_match_naive(chunk_size):
    hidden, kernel, bias, ids, mask = _problem(seed=1)
    weights = jnp.asarray([1.0, -0.5, 2.0, 3.0])  # distinct per-row weights exercise every row's cotangent

    def objective(fn, **kw):
        def f(h, k, b):
            return jnp.sum(weights * fn(h, k, ids, mask, bias=b, **kw).sums)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, kernel, bias)

    v_chunk, g_chunk = objective(sequence_logprobs, chunk_size=chunk_size)
    v_naive, g_naive = objective(naive_sequence_logprobs)
    np.testing.assert_allclose(float(v_chunk), float(v_naive), rtol=1e-5)
    for gc, gn in zip(g_chunk, g_naive):
        np.testing.assert_allclose(np.asarray(gc), np.asarray(gn), rtol=1e-4, atol=1e-5)
    # Hidden states that predict nothing scored (padding, the empty row, the last position) get no gradient.
    g_hidden = np.asarray(g_chunk[0])
    assert np.all(g_hidden[3] == 0.0) and np.all(g_hidden[0, 11:] == 0.0) and np.all(g_hidden[:, -1] == 0.0)
    assert np.any(g_hidden[0, 3] != 0.0)  # position 3 predicts the first response token


@pytest.mark.parametrize("with_predecessor", [False, True])
def test_a_score_window_computes_only_its_positions_with_the_same_values_and_gradients(with_predecessor):
    hidden, kernel, bias, ids, mask = _problem(seed=2)
    mask[1] = 0
    mask[1, 9:] = 1  # scored to the row's end: its window (size 7) must move left to fit in T = 13
    predecessor = None
    if with_predecessor:  # a packed-looking row: token 8 continues from position 5, not 7
        predecessor = np.tile(np.arange(-1, 12), (4, 1)).astype(np.int32)
        predecessor[:, 8] = 5
        predecessor = jnp.asarray(predecessor)
    scored = (mask > 0) & (np.arange(13) > 0)
    starts = jnp.asarray(np.argmax(scored, axis=1), jnp.int32)  # row 3 has none: 0
    weights = jnp.asarray([1.0, -0.5, 2.0, 3.0])

    def run(**where):
        def f(h, k, b):
            out = sequence_logprobs(h, k, ids, mask, bias=b, chunk_size=4, predecessor=predecessor, **where)
            return jnp.sum(weights * out.sums), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(hidden, kernel, bias)

    # The same tokens as explicit positions (how packed rows gather theirs), -1 filling each row's spare slots.
    positions = np.full((4, 8), -1, np.int32)
    for r in range(4):
        where = np.flatnonzero(scored[r])
        positions[r, :len(where)] = where

    # Rows 0-1 and 2-3 gathered in pairs (score groups): positions index a group's two rows one after the other.
    grouped = np.full((2, 12), -1, np.int32)
    for g in range(2):
        where = np.concatenate([np.flatnonzero(scored[2 * g + i]) + 13 * i for i in range(2)])
        grouped[g, :len(where)] = where

    (v_full, full), g_full = run()
    for kwargs in ({"window": (starts, 7)}, {"positions": jnp.asarray(positions)},
                   {"positions": jnp.asarray(grouped), "rows_per_gather": 2}):
        (v_win, win), g_win = run(**kwargs)
        np.testing.assert_allclose(np.asarray(win.token_logps), np.asarray(full.token_logps), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(win.counts), np.asarray(full.counts))
        np.testing.assert_allclose(float(v_win), float(v_full), rtol=1e-6)
        for gw, gf in zip(g_win, g_full):
            np.testing.assert_allclose(np.asarray(gw), np.asarray(gf), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(full.sums[1])) > 0  # the moved window still covers row 1's tokens
    # Unmasked, positions outside the window are 0 with a window and a log-prob without one.
    raw = token_logprobs(hidden, kernel, ids, bias=bias, predecessor=predecessor, window=(starts, 7))
    assert np.all(np.asarray(raw)[0, :4] == 0.0) and np.all(np.asarray(raw)[0, 11:] == 0.0)
    assert np.all(np.asarray(token_logprobs(hidden, kernel, ids, bias=bias))[0, 1:4] != 0.0)
    with pytest.raises(ValueError, match="rows_per_gather = 3 needs positions and a row count"):
        token_logprobs(hidden, kernel, ids, positions=jnp.asarray(grouped), rows_per_gather=3)


def test_a_score_window_shrinks_the_unembedding_matmul():
    hidden, kernel, bias, ids, mask = _problem(t=64, v=50)
    starts = jnp.zeros((4,), jnp.int32)
    window = jax.jit(lambda h: token_logprobs(h, kernel, ids, window=(starts, 16))).lower(hidden).as_text()
    full = jax.jit(lambda h: token_logprobs(h, kernel, ids)).lower(hidden).as_text()
    assert "4x16x50" in window and "4x63x50" not in window  # logits for 16 positions per row, not T - 1 = 63
    assert "4x63x50" in full


def test_bfloat16_inputs_give_float32_logprobs_close_to_float32_path():
    hidden, kernel, bias, ids, mask = _problem(seed=2, d=64, v=300)
    out16 = sequence_logprobs(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), ids, mask,
                              bias=jnp.asarray(bias, jnp.bfloat16), chunk_size=4)
    out32 = sequence_logprobs(hidden, kernel, ids, mask, bias=bias, chunk_size=4)
    assert out16.token_logps.dtype == jnp.float32 and out16.sums.dtype == jnp.float32
    # bf16 inputs (8-bit mantissa) with float32 accumulation: errors of a few percent per token at most.
    np.testing.assert_allclose(np.asarray(out16.token_logps), np.asarray(out32.token_logps), rtol=0.05, atol=0.3)


def test_float32_kernel_gradient_stays_float32_under_bfloat16_compute():
    hidden, kernel, bias, ids, mask = _problem(seed=3)
    g = jax.grad(lambda k: jnp.sum(sequence_logprobs(jnp.asarray(hidden, jnp.bfloat16), k, ids, mask,
                                                     compute_dtype=jnp.bfloat16).sums))(kernel)
    assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))


def test_shape_errors_name_the_problem():
    hidden, kernel, _, ids, mask = _problem()
    with pytest.raises(ValueError, match=r"kernel must be \[D=16, V\]"):
        token_logprobs(hidden, kernel.T, ids)
    with pytest.raises(ValueError, match="input_ids must be"):
        token_logprobs(hidden, kernel, ids[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, kernel, ids, chunk_size=0)


def _compiled_temp_bytes(fn, n, t, d, v, **kw):
    def loss(h, k, ids, m):
        return jnp.sum(fn(h, k, ids, m, **kw).sums)

    specs = (jax.ShapeDtypeStruct((n, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
             jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, t), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_value_and_grad_never_materialises_full_logits():
    """Compiled temp memory of value-and-grad at a GPT-NeoX vocabulary (50,304): well below N·T·V·4 bytes, and
    flat in T (it scales with the chunk), while the naive path needs several full logits tensors."""
    n, d, v, chunk = 4, 64, 50304, 64
    full = lambda t: n * t * v * 4  # noqa: E731
    naive = _compiled_temp_bytes(naive_sequence_logprobs, n, 1024, d, v)
    chunked_1k = _compiled_temp_bytes(sequence_logprobs, n, 1024, d, v, chunk_size=chunk)
    chunked_2k = _compiled_temp_bytes(sequence_logprobs, n, 2048, d, v, chunk_size=chunk)
    assert naive >= full(1024)  # the measurement sees a full logits tensor when there is one
    assert chunked_1k < 0.2 * full(1024), (chunked_1k, full(1024))
    assert chunked_2k < 0.1 * full(2048), (chunked_2k, full(2048))
    assert chunked_2k < 1.5 * chunked_1k  # doubling T does not double the temp memory
