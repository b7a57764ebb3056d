"""The loss registry against independent float64 formulas, the DPO paper's identities, and extreme inputs."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses as L
from dpo_jax import summaries
from tests import reference_formulas as ref

ALL = L.loss_types()
NORMALIZED = {"ipo_mean", "simpo"}
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"}


def _inputs(seed, batch=16, scale=30.0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-40.0, scale, batch) for _ in range(4))
    lc, lr = rng.integers(1, 60, batch).astype(np.float64), rng.integers(1, 60, batch).astype(np.float64)
    return pc, pr, rc, rr, lc, lr


def _run(name, pc, pr, rc, rr, lc, lr, beta, eps=0.0, **kw):
    return L.preference_loss(
        jnp.asarray(pc, jnp.float32),
        jnp.asarray(pr, jnp.float32),
        jnp.asarray(rc, jnp.float32),
        jnp.asarray(rr, jnp.float32),
        loss_type=name,
        beta=beta,
        label_smoothing=eps,
        chosen_lengths=jnp.asarray(lc),
        rejected_lengths=jnp.asarray(lr),
        **kw,
    )


def _expected(name, pc, pr, rc, rr, lc, lr, beta, eps=0.0, **kw):
    if name in NORMALIZED:
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    return ref.pairwise(name, pc, pr, rc, rr, beta, eps, **kw)


def test_registry_lists_every_issue_loss():
    wanted = {"sigmoid", "ipo", "ipo_mean", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "aot", "aot_unpaired", "discopop", "simpo"}
    assert wanted <= set(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_loss_matches_published_formula(name, beta):
    args = _inputs(seed=zlib.crc32(f"{name}/{beta}".encode()), scale=5.0 / beta)
    eps = 0.1 if name in SMOOTHED else 0.0
    losses, _, _ = _run(name, *args, beta=beta, eps=eps)
    want = _expected(name, *args, beta=beta, eps=eps)
    assert losses.dtype == jnp.float32 and losses.shape == want.shape
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("gap", [1e4, -1e4])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_extreme_gaps_are_finite_in_value_and_gradient(name, gap, beta):
    """Log-prob gaps of ±1e4 (βh up to ±1e4): no NaN/Inf in losses or in their gradients."""
    b = 8
    pc = jnp.full((b,), -10.0) + jnp.linspace(0, gap, b)
    pr = jnp.full((b,), -10.0) - jnp.linspace(0, gap, b)
    rc = jnp.full((b,), -10.0)
    rr = jnp.full((b,), -10.0)
    lens = jnp.full((b,), 1.0)  # keep the gap itself extreme for the length-normalised losses

    def total(pc, pr):
        losses, _, _ = L.preference_loss(pc, pr, rc, rr, loss_type=name, beta=beta,
                                         chosen_lengths=lens, rejected_lengths=lens)
        return jnp.sum(losses), losses

    (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(pc, pr)
    assert np.all(np.isfinite(np.asarray(losses))), losses
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), g
    want = _expected(name, *(np.asarray(x, np.float64) for x in (pc, pr, rc, rr, lens, lens)), beta=beta)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-5)


def test_sigmoid_is_eq7_and_its_gradient_is_section4():
    """Eq. 7 value; §4 gradient: ∂L/∂logπ(y_w) = −β·σ(r̂_l − r̂_w), ∂L/∂logπ(y_l) = +β·σ(r̂_l − r̂_w)."""
    beta = 0.3
    pc, pr, rc, rr, _, _ = _inputs(7, scale=4.0)
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr))

    def mean_loss(pc, pr):
        return jnp.mean(L.preference_loss(pc, pr, rc, rr, beta=beta)[0])

    value, (g_c, g_r) = jax.value_and_grad(mean_loss, argnums=(0, 1))(pc, pr)
    r_w, r_l = beta * (np.asarray(pc) - np.asarray(rc)), beta * (np.asarray(pr) - np.asarray(rr))
    eq7 = -np.mean(np.log(1.0 / (1.0 + np.exp(-(r_w - r_l)))))
    np.testing.assert_allclose(float(value), eq7, rtol=1e-5)
    weight = 1.0 / (1.0 + np.exp(-(r_l - r_w)))  # σ(r̂_l − r̂_w)
    np.testing.assert_allclose(np.asarray(g_c), -beta * weight / len(weight), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_r), beta * weight / len(weight), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_policy_equal_to_reference_gives_zero_rewards(name):
    logps = jnp.asarray(np.random.default_rng(0).normal(-30, 10, (8,)), jnp.float32)
    lens = jnp.full((8,), 10.0)
    losses, cr, rr = L.preference_loss(logps, logps - 3.0, logps, logps - 3.0, loss_type=name,
                                       chosen_lengths=lens, rejected_lengths=lens)
    if name != "simpo":  # SimPO has no reference: its rewards are β·mean log π by definition
        assert np.all(np.asarray(cr) == 0.0) and np.all(np.asarray(rr) == 0.0)
    assert np.all(np.isfinite(np.asarray(losses)))


def test_policy_equal_to_reference_sigmoid_loss_is_ln2():
    logps = jnp.asarray([-12.5, -3.0, -100.0, -0.25], jnp.float32)
    losses, cr, rr = L.preference_loss(logps, logps * 2, logps, logps * 2, beta=0.1)
    np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=0, atol=1e-7)
    assert np.all(np.asarray(cr) == 0.0) and np.all(np.asarray(rr) == 0.0)


def test_rewards_are_beta_log_ratios_and_not_differentiated():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _inputs(3)[:4])
    _, cr, rr_ = L.preference_loss(pc, pr, rc, rr, beta=0.25)
    np.testing.assert_allclose(np.asarray(cr), 0.25 * (np.asarray(pc) - np.asarray(rc)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rr_), 0.25 * (np.asarray(pr) - np.asarray(rr)), rtol=1e-6)
    g = jax.grad(lambda pc: jnp.sum(L.preference_loss(pc, pr, rc, rr)[1]))(pc)
    assert np.all(np.asarray(g) == 0.0)


def test_reference_free_is_a_zero_reference():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _inputs(4)[:4])
    free = L.preference_loss(pc, pr, rc, rr, reference_free=True)
    zero = L.preference_loss(pc, pr, jnp.zeros_like(rc), jnp.zeros_like(rr))
    for a, b in zip(free, zero):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(free[0]), np.asarray(L.preference_loss(pc, pr, rc, rr)[0]))
    free_none = L.preference_loss(pc, pr, None, None, reference_free=True)
    np.testing.assert_array_equal(np.asarray(free_none[0]), np.asarray(free[0]))


def test_ipo_mean_divides_by_lengths_and_rewards_follow():
    pc, pr, rc, rr, lc, lr = _inputs(5)
    losses, cr, _ = _run("ipo_mean", pc, pr, rc, rr, lc, lr, beta=0.1)
    summed, _, _ = _run("ipo", pc, pr, rc, rr, lc, lr, beta=0.1)
    assert not np.allclose(np.asarray(losses), np.asarray(summed))
    np.testing.assert_allclose(np.asarray(cr), 0.1 * (pc - rc) / lc, rtol=1e-5)


def test_bco_pair_uses_explicit_delta():
    args = _inputs(6)
    losses, _, _ = _run("bco_pair", *args, beta=0.1, delta=0.7)
    np.testing.assert_allclose(np.asarray(losses), _expected("bco_pair", *args, beta=0.1, delta=0.7), rtol=1e-5)


def test_discopop_tau_is_a_loss_kwarg():
    args = _inputs(8, scale=10.0)
    losses, _, _ = _run("discopop", *args, beta=0.1, tau=0.3)
    np.testing.assert_allclose(np.asarray(losses), _expected("discopop", *args, beta=0.1, tau=0.3), rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    x = jnp.zeros((2,))
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid"):
        L.preference_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.preference_loss(x, x, x, x, loss_type="ipo_mean")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.preference_loss(x, x, x, x, loss_type="simpo")
    with pytest.raises(ValueError, match="'hinge' does not use label_smoothing"):
        L.preference_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"unknown loss_kwargs \['tua'\]; valid: tau"):
        L.preference_loss(x, x, x, x, loss_type="discopop", tua=0.1)
    with pytest.raises(ValueError, match="reference log-probs"):
        L.preference_loss(x, x, None, None)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.preference_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="needs label_smoothing < 0.5"):
        L.preference_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_length_normalized_flag():
    assert L.is_length_normalized("ipo_mean") and L.is_length_normalized("simpo")
    assert not L.is_length_normalized("ipo")


# ----- metrics -----------------------------------------------------------------------------------------------

def _metrics(pc, pr, rc, rr, mask=None):
    losses, cr, rr_ = L.preference_loss(pc, pr, rc, rr, beta=0.1)
    return L.preference_metrics(losses, cr, rr_, pc, pr, mask)


def test_metrics_have_trl_names_and_values():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _inputs(9)[:4])
    m = summaries.finalize(_metrics(pc, pr, rc, rr))
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    cw, cl = 0.1 * (np.asarray(pc) - np.asarray(rc)), 0.1 * (np.asarray(pr) - np.asarray(rr))
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(cw > cl), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], np.mean(cw - cl), rtol=1e-4)
    np.testing.assert_allclose(m["logps/rejected"], np.mean(np.asarray(pr)), rtol=1e-5)


def test_metrics_over_two_microbatches_equal_the_whole_batch():
    """Unequal micro-batches (5 + 11 real examples) still average exactly: means of means would not."""
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _inputs(10)[:4])
    mask = jnp.asarray([1.0] * 5 + [0.0] * 3 + [1.0] * 8)
    whole = summaries.finalize(_metrics(pc, pr, rc, rr, mask))
    a = _metrics(pc[:8], pr[:8], rc[:8], rr[:8], mask[:8])
    b = _metrics(pc[8:], pr[8:], rc[8:], rr[8:], mask[8:])
    parts = summaries.finalize(summaries.merge(a, b))
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)
    naive_mean = (summaries.finalize(a)["loss"] + summaries.finalize(b)["loss"]) / 2
    assert not np.isclose(naive_mean, whole["loss"])


def test_metrics_with_no_examples_are_nan():
    pc = jnp.zeros((2,))
    m = summaries.finalize(_metrics(pc, pc, pc, pc, jnp.zeros((2,))))
    assert all(math.isnan(v) for v in m.values())


def test_merge_refuses_different_keys():
    with pytest.raises(ValueError, match="different keys"):
        summaries.merge({"a": summaries.Mean.of(jnp.ones(2))}, {"b": summaries.Mean.of(jnp.ones(2))})


# ----- token-level baselines and the reward model -------------------------------------------------------------

def test_nll_and_unlikelihood_match_numpy():
    rng = np.random.default_rng(11)
    lp_w = -rng.exponential(2.0, (4, 9))
    lp_l = -rng.exponential(2.0, (4, 9))
    lp_l[0, 3] = 0.0  # p = 1 exactly: log(1 − p) must stay finite (capped)
    m_w = (rng.random((4, 9)) > 0.3).astype(np.float64)
    m_l = (rng.random((4, 9)) > 0.3).astype(np.float64)
    m_l[0, 3] = 1.0
    m_w[2] = 0.0  # an empty chosen row
    nll, count = L.nll_loss(jnp.asarray(lp_w, jnp.float32), jnp.asarray(m_w))
    np.testing.assert_allclose(np.asarray(nll), -(lp_w * m_w).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(count), m_w.sum(-1))
    ul = L.unlikelihood_loss(jnp.asarray(lp_w, jnp.float32), jnp.asarray(m_w), jnp.asarray(lp_l, jnp.float32),
                             jnp.asarray(m_l), alpha=0.5)
    p_l = np.minimum(np.exp(lp_l), 1 - 1e-6)
    want = -(lp_w * m_w).sum(-1) - 0.5 * (np.log(1 - p_l) * m_l).sum(-1)
    assert np.all(np.isfinite(np.asarray(ul)))
    np.testing.assert_allclose(np.asarray(ul), want, rtol=1e-4)
    g = jax.grad(lambda x: jnp.sum(L.log1m_exp(x)))(jnp.asarray([0.0, -1e-9, -1e-3, -5.0, -80.0]))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bradley_terry_loss_and_accuracy():
    rng = np.random.default_rng(12)
    rw, rl = rng.normal(0, 3, 32), rng.normal(0, 3, 32)
    losses, acc = L.bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl))
    np.testing.assert_allclose(np.asarray(losses), np.log1p(np.exp(-(rw - rl))), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(acc), (rw > rl).astype(np.float32))
    with_margin, _ = L.bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl), margin=1.0)
    np.testing.assert_allclose(np.asarray(with_margin), np.log1p(np.exp(-(rw - rl - 1.0))), rtol=1e-5)
    extreme, _ = L.bradley_terry_loss(jnp.asarray([1e4, -1e4]), jnp.asarray([0.0, 0.0]))
    assert np.all(np.isfinite(np.asarray(extreme)))
    margins = rng.uniform(0, 2, 32)  # a per-example margin field, and TRL's reward centering
    centered, _ = L.bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl), margin=jnp.asarray(margins),
                                       center_coefficient=0.01)
    want = np.log1p(np.exp(-(rw - rl - margins))) + 0.01 * (rw + rl) ** 2
    np.testing.assert_allclose(np.asarray(centered), want, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_padding_examples_take_no_part_in_any_loss(name):
    """Padding pairs (zero log-probs, example_mask 0) change no real example's loss, even for the losses that sort
    or average over the batch (aot, aot_unpaired, bco_pair), and their own losses are 0."""
    pc, pr, rc, rr, lc, lr = _inputs(seed=zlib.crc32(name.encode()), batch=6, scale=5.0)
    real, _, _ = _run(name, pc, pr, rc, rr, lc, lr, beta=0.5)
    pad = lambda x, v=0.0: np.concatenate([x[:2], [v], x[2:4], [v, v], x[4:]])  # noqa: E731
    mask = pad(np.ones(6), 0.0)
    padded, _, _ = _run(name, pad(pc), pad(pr), pad(rc), pad(rr), pad(lc, 1.0), pad(lr, 1.0), beta=0.5,
                        example_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(padded)[mask == 0], 0.0)
    assert float(jnp.sum(padded)) == pytest.approx(float(jnp.sum(real)), rel=1e-5, abs=1e-5)
    if name in ("aot", "aot_unpaired", "bco_pair", "sigmoid"):  # per-example, not only in the sum
        np.testing.assert_allclose(np.asarray(padded)[mask == 1], np.asarray(real), rtol=1e-5, atol=1e-6)


def test_the_audit_numbers_for_batch_level_losses_with_one_padding_pair():
    """2 real pairs + 1 padding pair (the audit's repro): the padded batch gives the 2-pair loss."""
    pc, pr, rc, rr = (np.asarray(v, np.float32) for v in ([-3.0, -5.0], [-6.0, -4.0], [-4.0, -4.5], [-5.0, -5.5]))
    for name in ("aot", "aot_unpaired", "bco_pair"):
        want = float(jnp.mean(L.preference_loss(pc, pr, rc, rr, loss_type=name, beta=1.0)[0]))
        pad = lambda x: np.concatenate([x, [0.0]]).astype(np.float32)  # noqa: E731
        got, _, _ = L.preference_loss(pad(pc), pad(pr), pad(rc), pad(rr), loss_type=name, beta=1.0,
                                      example_mask=jnp.asarray([1.0, 1.0, 0.0]))
        assert float(jnp.sum(got)) / 2 == pytest.approx(want, rel=1e-6), name


def test_reference_free_rewards_are_beta_times_the_policy_logps():
    """What `rewards/*` mean without a reference (documented in preference_loss / preference_metrics): β·log π."""
    pc, pr, rc, rr, lc, lr = _inputs(seed=11, batch=4)
    _, chosen, rejected = L.preference_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr),
                                            beta=0.2, reference_free=True)
    np.testing.assert_allclose(np.asarray(chosen), 0.2 * pc, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected), 0.2 * pr, rtol=1e-5)
