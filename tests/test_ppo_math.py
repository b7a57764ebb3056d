"""PPO's math against plain NumPy loops written the way TRL's PPOTrainer writes them."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.rlhf import ppo_math as P


def _inputs(seed=0, b=5, length=9):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 1, 4, 7, 0])[:b]  # one row with no generated token
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    return rng, mask, [rng.normal(size=(b, length)).astype(np.float32) for _ in range(4)]


def test_gae_matches_the_reverse_loop():
    _, mask, (rewards, values, _, _) = _inputs()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        got_adv, got_ret = P.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
        r, v = rewards * mask, values * mask
        want = np.zeros_like(r)
        last = np.zeros(len(r))
        for t in reversed(range(r.shape[1])):
            nxt = v[:, t + 1] if t + 1 < r.shape[1] else 0.0
            last = (r[:, t] + gamma * nxt - v[:, t] + gamma * lam * last) * mask[:, t]
            want[:, t] = last
        np.testing.assert_allclose(got_adv, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_ret, (want + v) * mask, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(got_adv)[mask == 0]).max() == 0


def test_whitening_uses_only_masked_entries():
    rng, mask, (x, _, _, _) = _inputs(1)
    x = x + 3.0
    got = np.asarray(P.whiten(jnp.asarray(x), jnp.asarray(mask)))
    real = x[mask == 1]
    np.testing.assert_allclose(got[mask == 1], (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), rtol=1e-5)
    assert np.all(got[mask == 0] == 0)
    unshifted = np.asarray(P.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(unshifted[mask == 1], got[mask == 1] + real.mean(), rtol=1e-5)
    x_padded = np.where(mask == 1, x, 1e6)  # padding values never leak in
    np.testing.assert_allclose(P.whiten(jnp.asarray(x_padded), jnp.asarray(mask)), got, rtol=1e-5, atol=1e-6)


def test_kl_penalized_rewards_put_the_score_on_the_last_generated_token():
    _, mask, (lp, ref, _, _) = _inputs(2)
    scores = np.array([1.0, -2.0, 0.5, 3.0, 7.0], np.float32)
    rewards, kl, non_score = (np.asarray(a) for a in P.kl_penalized_rewards(
        jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask), jnp.asarray(scores), 0.05))
    want = -0.05 * (lp - ref) * mask
    np.testing.assert_allclose(non_score, want, rtol=1e-6, atol=1e-7)
    for i, n in enumerate(mask.sum(1).astype(int)):
        if n:
            want[i, n - 1] += scores[i]
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-6)
    assert rewards[4].sum() == 0  # no generated token: no score either
    np.testing.assert_allclose(kl, (lp - ref) * mask, rtol=1e-6)


def test_clipped_policy_and_value_losses_match_numpy():
    _, mask, (lp, old, adv, ret) = _inputs(3)
    old = lp + 0.3 * np.random.default_rng(5).normal(size=lp.shape).astype(np.float32)
    loss, stats = P.policy_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)
    ratio = np.exp(lp - old)
    a, b = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    m = mask == 1
    assert float(loss) == pytest.approx(np.maximum(a, b)[m].mean(), rel=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx((b > a)[m].mean())
    assert float(stats["approxkl"]) == pytest.approx(0.5 * ((lp - old) ** 2)[m].mean(), rel=1e-5)
    assert float(stats["ratio"]) == pytest.approx(ratio[m].mean(), rel=1e-5)
    assert 0 < float(stats["clipfrac"]) < 1

    v, v_old = ret + 0.5, ret - 0.1
    vloss, vclip = P.value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(ret), jnp.asarray(mask), 0.2)
    va, vb = (v - ret) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - ret) ** 2
    assert float(vloss) == pytest.approx(0.5 * np.maximum(va, vb)[m].mean(), rel=1e-5)
    assert float(vclip) == pytest.approx((vb > va)[m].mean())


def test_adaptive_kl_controller():
    """Ziegler et al.: the coefficient grows when KL overshoots the target, shrinks below it, by at most 20 %·n/H."""
    assert float(P.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 256)) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert float(P.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 256)) == pytest.approx(0.1 * (1 - 0.1 * 256 / 10000))
    assert float(P.adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 256)) == pytest.approx(0.1)
