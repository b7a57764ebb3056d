"""Best-of-N: the analytic KL, one sampling pass serving every N' <= N, the argmax pick, chunked scoring."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models.decoder import init_params
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.reward import as_reward_model, score_rows, sequence_scores
from dpo_jax.rlhf import best_of_n as bon
from tests import engine_helpers as H


def test_analytic_kl_is_the_kl_of_the_max_of_n_draws():
    """For a continuous reward, best-of-n has density n·F^(n-1) relative to π, so KL = E[log n + (n-1) log F] with
    F the CDF at the max of n uniform draws: a Monte-Carlo check of log n − (n−1)/n."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 16, 64):
        f = rng.uniform(size=(200_000, n)).max(1)
        mc = np.mean(np.log(n) + (n - 1) * np.log(f))
        assert bon.best_of_n_kl(n) == pytest.approx(mc, abs=0.01)
    assert bon.best_of_n_kl(1) == 0.0 and bon.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="N >= 1"):
        bon.best_of_n_kl(0)


@pytest.fixture(scope="module")
def policy():
    return init_params(H.MODEL, jax.random.key(0))


def _prompts():
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 3, 4, 5]], np.int32)
    return ids, (np.arange(4)[None] >= np.array([[2], [0], [1]])).astype(np.int32)


def test_the_first_n_samples_of_a_pass_are_a_separate_n_sample_pass(policy):
    ids, mask = _prompts()
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=1, pad_id=0)
    big = bon.sample_n(policy, H.MODEL, ids, mask, 8, jax.random.key(1), s, batch_rows=5)
    small = bon.sample_n(policy, H.MODEL, ids, mask, 2, jax.random.key(1), s)
    assert big.tokens.shape == (3, 8, 6) and small.tokens.shape == (3, 2, 6)
    np.testing.assert_array_equal(big.tokens[:, :2], small.tokens)
    np.testing.assert_allclose(big.logps[:, :2], small.logps, atol=1e-5)
    assert len({tuple(t) for t in big.tokens.reshape(24, 6)}) > 12  # the samples really differ


def test_the_sweep_picks_the_argmax_of_the_first_n_scores():
    scores = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, -1.0, 4.0, 0.0]])
    truth = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    rows = bon.sweep(scores, [1, 2, 4], truth)
    assert [r["reward"] for r in rows] == [3.0, 3.5, 5.5]  # picks (0,0),(1,0) / (1,0),(0,0) / (3,2)
    assert [r["score"] for r in rows] == [pytest.approx(1.55), pytest.approx(1.95), pytest.approx(3.0)]
    assert [r["kl"] for r in rows] == [bon.best_of_n_kl(n) for n in (1, 2, 4)]
    with pytest.raises(ValueError, match="best-of-5 from 4"):
        bon.best_indices(scores, 5)


def test_chunked_scoring_of_completions_equals_one_batch(policy):
    config, params = as_reward_model(H.MODEL, policy, 0, jax.random.key(2))
    ids, mask = _prompts()
    s = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_id=1, pad_id=0)
    samples = bon.sample_n(policy, H.MODEL, ids, mask, 3, jax.random.key(3), s)
    rows, row_mask = bon.completion_rows(ids, mask, samples)
    assert rows.shape == (9, 9)

    @jax.jit
    def score(p, i, m):
        return sequence_scores(p, config, jnp.asarray(i), jnp.asarray(m))

    np.testing.assert_allclose(score_rows(score, params, rows, row_mask, batch_rows=4),
                               np.asarray(score(params, rows, row_mask)), atol=1e-6)
