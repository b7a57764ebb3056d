"""The sentiment report on hand-made points: families, the stored per-prompt outcomes, the final-point table's
intervals and the matched-KL comparison written into results.md."""

import csv
import zlib

import ml_collections
import numpy as np
import pytest

from dpo_jax.evaluation.intervals import difference_interval
from dpo_jax.experiments import sentiment_config, sentiment_rlhf, sentiment_sweep
from dpo_jax.experiments.sentiment_points import family, make_point, read_points, write_points
from dpo_jax.experiments.sentiment_report import final_lines, write_results

PROMPTS = 32


def _point(method, seed, step, reward, kl, noise=0.0, rm=True):
    # crc32, not hash(): Python salts str hashes per process, which made these draws (and a verdict) differ by run
    rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}/{step}".encode()))
    vader = reward + noise * rng.standard_normal(PROMPTS)
    return make_point(method, seed, step, vader, np.full(PROMPTS, kl), vader * 2 if rm else None)


def test_families_keep_cdpo_ipo_and_fixed_coefficient_ppo_out_of_the_paper_s_families():
    assert [family(m) for m in ("dpo_beta0p1", "cdpo_beta0p1", "ipo_beta0p1", "ppo_kl3", "ppo_gt_kl3", "ppo_beta1",
                                "ppo_gt_beta1", "best_of_n", "unlikelihood_alpha1", "preferred_ft", "sft",
                                "online_dpo_beta1", "tr_dpo_beta0p1")] == [
        "DPO", "cDPO", "IPO", "PPO", "PPO-GT", "PPO (fixed β)", "PPO-GT (fixed β)", "Best-of-N", "Unlikelihood",
        "Preferred-FT", "π_SFT", "Online DPO", "TR-DPO"]


def test_points_round_trip_with_their_per_prompt_outcomes(tmp_path):
    points = [_point("sft", 0, 0, 0.1, 0.0, noise=0.3), _point("dpo_beta0p1", 1, 30, 0.5, 2.0, noise=0.3),
              _point("preferred_ft", 0, 30, 0.2, 1.0, rm=False)]
    write_points(str(tmp_path), points)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["family", "method", "seed", "step", "vader", "kl", "rm_score"]
    assert [(r["family"], r["seed"], r["step"]) for r in rows] == [("π_SFT", "0", "0"), ("DPO", "1", "30"),
                                                                   ("Preferred-FT", "0", "30")]
    assert rows[2]["rm_score"] == "" and float(rows[1]["vader"]) == pytest.approx(points[1]["reward"], abs=1e-6)
    back = read_points(str(tmp_path))
    for a, b in zip(points, back):
        np.testing.assert_allclose(b["outcomes"]["vader"], a["outcomes"]["vader"], rtol=1e-6)
        assert (b["method"], b["seed"], b["step"]) == (a["method"], a["seed"], a["step"])
    # the report's intervals can be recomputed from what was stored
    got = difference_interval(back[1]["rewards"][None], back[0]["rewards"][None])
    assert got.estimate == pytest.approx(points[1]["reward"] - points[0]["reward"], abs=1e-5)
    with pytest.raises(ValueError, match="different numbers of prompts"):
        write_points(str(tmp_path), [points[0], make_point("dpo_x", 0, 1, [0.1], [0.0])])


def test_final_points_average_seeds_and_say_ahead_only_outside_the_interval():
    sft = _point("sft", 0, 0, 0.0, 0.0, noise=0.2)
    points = [sft] + [_point("dpo_beta0p1", s, step, 0.4, 3.0, noise=0.2) for s in (0, 1) for step in (10, 20)]
    points += [_point("preferred_ft", 0, 20, 0.0, 1.0, noise=0.2)]
    lines = "\n".join(final_lines(points, sft))
    dpo_row = next(line for line in lines.splitlines() if line.startswith("| dpo_beta0p1 |"))
    assert "| DPO | 2 | 20 |" in dpo_row and dpo_row.split("|")[7].strip() == "ahead"
    pft_row = next(line for line in lines.splitlines() if line.startswith("| preferred_ft |"))
    assert pft_row.split("|")[7].strip() == "level"  # the same mean as π_SFT, prompt noise only


def _config(tmp_path):
    c = sentiment_config.default_config()
    c.out_dir = str(tmp_path)
    c.methods = ml_collections.ConfigDict({"dpo_beta0p1": sentiment_config.method("dpo", beta=0.1),
                                           "cdpo_beta0p1": sentiment_config.method("dpo", beta=0.1,
                                                                                   label_smoothing=0.2)})
    return c


def test_results_md_compares_envelopes_with_intervals_and_names_the_other_sides_stretch(tmp_path):
    # on the common KL range 1-3: DPO 0.5, then 0.8 at KL 3; PPO 0.2, then 0.9 from KL 2.5 (ahead there); cDPO far
    # above everywhere but not part of DPO's envelope
    sft = _point("sft", 0, 0, 0.0, 0.0)
    points = [sft]
    for seed in (0, 1):
        points += [_point("dpo_beta0p1", seed, 10, 0.5, 1.0), _point("dpo_beta0p1", seed, 20, 0.5, 2.0),
                   _point("dpo_beta0p1", seed, 30, 0.8, 3.0), _point("ppo_kl3", seed, 10, 0.2, 1.0),
                   _point("ppo_kl3", seed, 20, 0.9, 2.5), _point("ppo_kl3", seed, 30, 0.9, 5.0)]
    points += [_point("cdpo_beta0p1", 0, 10, 2.0, 1.0), _point("cdpo_beta0p1", 0, 30, 2.0, 5.0)]
    write_results(_config(tmp_path), points, 0.45)
    text = (tmp_path / "results.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("- On the KL range") and "PPO's" in x)
    assert "ahead of PPO's on 74.6 %" in line and "behind on 25.4 %" in line  # 150 and 51 of 201 grid KLs
    assert "Stretches with PPO ahead: KL 2.50–3.00" in line
    cdpo = next(x for x in text.splitlines() if x.startswith("- On the KL range") and "cDPO's" in x)
    assert "behind on 100.0 %" in cdpo  # cDPO's points did not lift DPO's envelope
    assert "DPO 2, PPO 2, cDPO 1" in text
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "overoptimization.png").stat().st_size > 0


def test_over_optimization_is_in_standardized_units(tmp_path):
    """Gains over π_SFT divided by π_SFT's per-prompt standard deviations: VADER by VADER's, the reward model's
    score (PPO) and DPO's implicit reward β·KL by the reward model's."""
    rng = np.random.default_rng(0)
    vader, rm = rng.normal(0.1, 0.5, PROMPTS), rng.normal(-1.0, 2.0, PROMPTS)
    sft = make_point("sft", 0, 0, vader, np.zeros(PROMPTS), rm)
    ppo = make_point("ppo_kl3", 0, 40, vader + 0.25, np.full(PROMPTS, 3.0), rm + 4.0)
    dpo = make_point("dpo_beta0p1", 0, 40, vader + 0.5, np.full(PROMPTS, 6.0), rm)
    write_results(_config(tmp_path), [sft, ppo, dpo], 0.45)
    rows = {line.split("|")[1].strip(): line.split("|") for line in (tmp_path / "results.md").read_text().splitlines()
            if line.startswith("| ppo_kl3 | 40 |") or line.startswith("| dpo_beta0p1 | 40 |")}
    vader_sd, rm_sd = vader.std(), rm.std()
    assert float(rows["ppo_kl3"][3]) == pytest.approx(4.0 / rm_sd, abs=0.01)
    assert float(rows["ppo_kl3"][4]) == pytest.approx(0.25 / vader_sd, abs=0.01)
    assert float(rows["dpo_beta0p1"][3]) == pytest.approx(0.1 * 6.0 / rm_sd, abs=0.01)
    assert float(rows["dpo_beta0p1"][4]) == pytest.approx(0.5 / vader_sd, abs=0.01)


def test_reward_model_pair_accuracy_counts_every_untied_pair_of_the_first_k():
    """The reward model's validation (and held-out) accuracy: every pair of a prompt's first k samples, ordered as
    the ground truth orders them; pairs the truth ties are left out."""
    truth = np.asarray([[0.5, 0.1, 0.1], [0.0, 0.0, 0.0], [0.2, 0.3, -0.4]])
    scores = np.asarray([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    # prompt 0: (0,1) wrong, (0,2) right, (1,2) tied; prompt 1: all tied; prompt 2: (0,1) right, (0,2), (1,2) wrong
    assert sentiment_rlhf.pair_accuracy(scores, truth, 3) == (2 / 5, 5)
    assert sentiment_rlhf.pair_accuracy(scores, truth, 2) == (1 / 2, 2)  # the first two samples only


def test_the_sweep_chooses_the_highest_validation_reward_within_the_kl_cap():
    """A rate that moves fast is not penalized for its later points past the cap, nor rewarded for them."""
    rows = [{"learning_rate": 1e-4, "updates": 40, "reward": 0.20, "kl": 1.0},
            {"learning_rate": 1e-4, "updates": 80, "reward": 0.25, "kl": 2.0},
            {"learning_rate": 1e-3, "updates": 40, "reward": 0.40, "kl": 5.5},
            {"learning_rate": 1e-3, "updates": 80, "reward": 0.60, "kl": 12.0}]
    assert sentiment_sweep.best_under_kl(rows, 6.0) is rows[2]
    assert sentiment_sweep.best_under_kl(rows, 2.0) is rows[1]
    assert sentiment_sweep.best_under_kl(rows, 20.0) is rows[3]
    assert sentiment_sweep.best_under_kl(rows, 0.5) is None


def test_the_human_baseline_is_cut_to_the_policy_s_budget():
    """Like terms: the human continuation a policy's completion is judged against is at most the policy's budget."""
    from types import SimpleNamespace

    from dpo_jax.experiments.sentiment_winrate import WinRates

    budget = 4
    st = SimpleNamespace(c=SimpleNamespace(eval=SimpleNamespace(max_new_tokens=budget)),
                         tokenizer=SimpleNamespace(decode=lambda ids: " ".join(map(str, ids))),
                         prefixes=lambda ids, n, seed, sources, skip: (np.zeros((2, 3)), np.ones((2, 3)),
                                                                       np.array([0, 1]), np.array([2, 3])))
    sentences = [list(range(10)), [100, 101, 102, 103, 104, 105]]
    block = WinRates._prefix_set(SimpleNamespace(st=st), sentences, 2, 0)
    assert block["prefix"] == ["0 1", "100 101 102"]
    assert block["human"] == ["2 3 4 5", "103 104 105"] and block["human_length"].tolist() == [budget, 3]
