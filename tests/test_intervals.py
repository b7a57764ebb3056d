"""The intervals every published comparison carries (evaluation/intervals.py): bootstrap intervals against cases
computed by hand, pairing by prompt, envelope gaps at matched KL with every stretch named, shares never rounded to
100 %."""

import numpy as np
import pytest

from dpo_jax.evaluation.intervals import Interval, Run, describe_gap, difference_interval, envelope_gap, \
    runs_from_points, share_text, stretches


def test_the_bootstrap_of_two_prompts_is_the_hand_computed_one():
    # one seed, prompts scoring 0 and 1: a resampled mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so the 2.5th
    # and 97.5th percentiles are 0 and 1
    assert difference_interval(np.array([[0.0, 1.0]])) == Interval(0.5, 0.0, 1.0)
    # two seeds whose every prompt scores 0 and 1: the seeds' resampling alone gives the same distribution
    assert difference_interval(np.array([[0.0] * 5, [1.0] * 5])) == Interval(0.5, 0.0, 1.0)


def test_a_large_sample_interval_is_the_normal_one():
    rng = np.random.default_rng(1)
    a = rng.normal(0.3, 1.0, (1, 400))
    got = difference_interval(a)
    half = 1.96 * a.std() / np.sqrt(400)
    assert got.estimate == pytest.approx(a.mean())
    assert got.high - got.low == pytest.approx(2 * half, rel=0.15)
    assert got.verdict == "ahead"


def test_pairing_by_prompt_removes_the_prompts_shared_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0.0, 1.0, 64)  # a prompt's effect on both sides
    a, b = (difficulty + 0.2)[None], difficulty[None]
    paired = difference_interval(a, b)
    assert paired.estimate == pytest.approx(0.2) and paired.low == pytest.approx(0.2)
    assert paired.high == pytest.approx(0.2) and paired.verdict == "ahead"
    unpaired = difference_interval(a, b, paired=False)
    assert unpaired.low < 0 < unpaired.high and unpaired.verdict == "level"
    assert difference_interval(b, a).verdict == "behind"
    with pytest.raises(ValueError, match="same prompts on both sides: 64 and 3"):
        difference_interval(a, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        difference_interval(np.zeros(4))


def test_stretches_and_shares_are_printed_as_they_are():
    grid = np.arange(8.0)
    assert stretches(grid, [0, 1, 1, 0, 0, 1, 0, 1]) == [(1.0, 2.0), (5.0, 5.0), (7.0, 7.0)]
    assert stretches(grid, [0] * 8) == []
    assert share_text(0.998) == "99.8 %" and share_text(0.9996) == "> 99.9 %" and share_text(1.0) == "100.0 %"
    assert share_text(0.0004) == "< 0.1 %" and share_text(0.0) == "0.0 %"


def _run(family, seed, kl, reward, prompts=4, setting=""):
    """A run whose every prompt scores its point's mean (no prompt noise)."""
    return Run(family, seed, np.repeat(np.asarray(reward, float)[:, None], prompts, 1),
               np.repeat(np.asarray(kl, float)[:, None], prompts, 1), setting=setting)


def test_envelope_gaps_name_every_stretch_in_either_sides_favour():
    # A's staircase: 0.5, 0.6 from KL 2, 0.7 from 3, 0.8 at 4; B's: 0.4, then 0.9 from KL 2.5. A is ahead below
    # KL 2.5 and behind from there; without noise the intervals are the gaps themselves
    a = [_run("A", 0, [1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8])]
    b = [_run("B", 0, [1, 2.5, 4], [0.4, 0.9, 0.75])]
    got = envelope_gap(a, b, points=301, samples=50)
    np.testing.assert_allclose(got.low, got.gap)
    np.testing.assert_allclose(got.high, got.gap)
    assert got.gap[0] == pytest.approx(0.1) and got.gap[-1] == pytest.approx(-0.1)
    assert got.share("ahead") == pytest.approx(0.5, abs=0.01) and got.share("level") == 0.0
    (ahead_from, ahead_to), = stretches(got.grid, got.low > 0)
    (behind_from, behind_to), = stretches(got.grid, got.high < 0)
    assert (ahead_from, behind_to) == (1.0, 4.0)
    assert ahead_to == pytest.approx(2.49, abs=0.011) and behind_from == pytest.approx(2.5, abs=0.011)
    text = describe_gap(got, ("A", "B"))
    assert "Stretches with B ahead: KL 2.5" in text and "Stretches with A ahead: KL 1.00–2.4" in text
    assert "100" not in text
    assert describe_gap(envelope_gap(a, [_run("B", 0, [5, 6], [0.1, 0.2])]), ("A", "B")).endswith(
        "no comparison at matched KL.")


def test_a_gap_within_the_seeds_noise_is_level():
    # two seeds of B straddle A: the seed bootstrap makes the gap's interval cover 0 everywhere
    a = [_run("A", 0, [1, 2, 3], [0.5, 0.6, 0.7])]
    b = [_run("B", 0, [1, 2, 3], [0.3, 0.4, 0.5]), _run("B", 1, [1, 2, 3], [0.7, 0.8, 0.9])]
    got = envelope_gap(a, b, samples=400)
    assert got.share("level") == 1.0
    assert "level on 100.0 %" in describe_gap(got, ("A", "B"))


def test_the_bootstrap_keeps_every_setting_in_each_envelope():
    # A's envelope is two settings' runs (a small and a large β, one seed each): redrawing seeds within a setting
    # changes nothing, where redrawing runs across settings would drop one and widen the interval
    a = [_run("A", 0, [1, 2], [0.6, 0.7], setting="beta1"), _run("A", 0, [3, 4], [0.8, 0.9], setting="beta0.1")]
    b = [_run("B", 0, [1, 4], [0.5, 0.5])]
    got = envelope_gap(a, b, samples=200)
    np.testing.assert_allclose(got.low, got.gap)
    np.testing.assert_allclose(got.high, got.gap)


def test_runs_are_grouped_from_per_point_records():
    points = [{"family": "DPO", "method": "dpo_beta0p1", "seed": s, "step": step, "rewards": [step, 1.0],
               "kls": [0.1, 0.2]} for s in (0, 1) for step in (1, 2)]
    runs = runs_from_points(points)
    assert [(r.family, r.setting, r.seed, r.rewards.shape) for r in runs] == [
        ("DPO", "dpo_beta0p1", 0, (2, 2)), ("DPO", "dpo_beta0p1", 1, (2, 2))]
    np.testing.assert_array_equal(runs[1].rewards[:, 0], [1, 2])
