"""The frontier's families, upper envelopes and the matched-KL comparison written into results.md."""

import numpy as np

from dpo_jax.experiments.sentiment_report import compare_envelopes, envelope, family


def _points(name, pairs):
    return [{"method": name, "kl": k, "reward": r} for k, r in pairs]


def test_families_put_cdpo_and_ipo_with_dpo_and_ppo_gt_apart_from_ppo():
    assert [family(m) for m in ("dpo_beta0p1", "cdpo_beta0p1", "ipo_beta0p1", "ppo_beta1", "ppo_gt_beta1",
                                "best_of_n", "unlikelihood_alpha1", "preferred_ft", "sft")] == [
        "DPO", "DPO", "DPO", "PPO", "PPO-GT", "Best-of-N", "Unlikelihood", "Preferred-FT", "π_SFT"]


def test_envelope_is_the_running_best_reward_by_kl():
    kl, best = envelope(_points("dpo", [(3.0, 0.2), (1.0, 0.5), (2.0, 0.4), (4.0, 0.7)]))
    np.testing.assert_array_equal(kl, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(best, [0.5, 0.5, 0.5, 0.7])  # a worse point at higher KL never lowers it


def test_matched_kl_comparison_says_where_each_envelope_is_above():
    dpo = _points("dpo", [(1.0, 0.3), (2.0, 0.5), (4.0, 0.6)])
    ppo = _points("ppo", [(1.0, 0.4), (3.0, 0.45), (5.0, 0.9)])
    text = compare_envelopes(dpo, ppo, ("DPO", "PPO"))
    # shared range 1-4: PPO above on [1, 2) (0.4 vs 0.3), DPO above on [2, 4] (0.5-0.6 vs 0.4-0.45): two thirds
    assert text.startswith("On the KL range both cover (1.00–4.00 nats), DPO's envelope lies above PPO's on 67 %")
    assert "largest gap in DPO's favour is +0.150 reward at KL 4.00" in text
    assert "in PPO's favour +0.100 at KL 1" in text
    assert "cover no common KL range" in compare_envelopes(dpo, _points("p", [(9.0, 1.0)]), ("DPO", "P"))
    assert "nowhere above" in compare_envelopes(_points("a", [(1.0, 1.0)] * 2 + [(3.0, 1.0)]), ppo, ("A", "PPO"))
