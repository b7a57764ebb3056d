"""The sentiment experiment end to end at a reduced scale: DPO beats π_SFT's reward, and the KL estimate behaves."""

import csv
import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dpo_jax.evaluation import intervals
from dpo_jax.experiments import sentiment as S
from dpo_jax.experiments import sentiment_config
from dpo_jax.experiments.sentiment_points import read_points
from dpo_jax.rlhf import best_of_n as bon
from tests.conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUN = ("import pickle, sys; from dpo_jax.experiments import sentiment as S; "
        "pickle.dump(S.run(pickle.load(open(sys.argv[1], 'rb'))), open(sys.argv[2], 'wb'))")


def run_at_default_level(c: ml_collections.ConfigDict) -> tuple[dict, str]:
    """S.run(c) in a subprocess compiled at XLA's default optimization level: its result and what it printed. The
    suite compiles at level 0 (tests/conftest.py: quick to compile, slow to run), and this experiment mostly runs.
    The subprocess shares the suite's compilation cache and the experiment's own cache directory."""
    config, result = os.path.join(c.cache_dir, "config.pkl"), os.path.join(c.cache_dir, "result.pkl")
    os.makedirs(c.cache_dir, exist_ok=True)
    with open(config, "wb") as f:
        pickle.dump(c, f)
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(FAST_COMPILE, "")}
    out = subprocess.run([sys.executable, "-c", _RUN, config, result], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    with open(result, "rb") as f:
        return pickle.load(f), out.stdout


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sentiment")
    c = sentiment_config.default_config()
    c.out_dir, c.cache_dir = str(tmp / "out"), str(tmp / "cache")
    c.sft.steps = 200  # the default model and tokenizer, trained for less time
    c.pairs.prefixes, c.eval.prefixes, c.eval.every = 256, 128, 20
    c.train.steps = 40
    # the reward model's rate chosen on validation pairs, two models of 60 steps (the time of one of 120)
    c.reward_model.steps, c.reward_model.learning_rates, c.best_of_n.ns = 60, (1e-3, 3e-3), (1, 2, 4, 16)
    c.ppo.targets, c.ppo.rollouts = (3.0,), 32  # PPO and PPO-GT at one target KL: 10 iterations x 4 epochs each
    # DPO's rate chosen on validation prefixes; both rates move DPO well clear of π_SFT in 40 steps (measured: Δ
    # reward +0.13 [+0.07, +0.19] at 3e-4; +0.2 more at 1e-3), so the tests below do not hang on noise
    c.sweep.learning_rates, c.sweep.families, c.sweep.prefixes = (3e-4, 1e-3), ("DPO",), 128
    c.seeds = (0,)
    c.methods = ml_collections.ConfigDict({"dpo_beta0p1": sentiment_config.method("dpo", seeds=(0, 1), beta=0.1),
                                           "preferred_ft": sentiment_config.method("sft"),  # DPO: its own seeds
                                           "online_dpo_beta0p1": sentiment_config.method("online_dpo", beta=0.1),
                                           "tr_dpo_beta0p1": sentiment_config.method("dpo", beta=0.1,
                                                                                     ref_sync_every=20,
                                                                                     ref_sync_alpha=0.6)})
    c.winrate.prefixes, c.winrate.validation_pairs = 64, 1000
    return c, run_at_default_level(c)[0]


def test_dpo_raises_the_ground_truth_reward_above_the_sft_policy(result):
    """By the project's own rule: "ahead" only when the 95 % interval (seeds and prompts, paired by prompt) excludes
    0 — a gain several standard errors wide, not one inside run-to-run noise."""
    c, r = result
    points = r["points"]
    sft = next(p for p in points if p["method"] == "sft")
    final = [p for p in points if p["method"] == "dpo_beta0p1" and p["step"] == c.train.steps]
    gain = intervals.difference_interval(np.stack([p["outcomes"]["vader"] for p in final]),
                                         sft["outcomes"]["vader"][None])
    assert len(final) == 2 and gain.low > 0, gain
    assert all(p["kl"] > 0.0 for p in final)
    assert r["vader_human_r"] > 0.35


def test_kl_is_zero_for_the_reference_and_nonnegative_otherwise(result):
    _, r = result
    sft = next(p for p in r["points"] if p["method"] == "sft")
    assert abs(sft["kl"]) < 1e-3  # π = π_ref: every sampled token's log-ratio is 0 (KV cache vs forward: ~1e-6)
    assert all(p["kl"] > -0.05 for p in r["points"])  # Monte-Carlo estimate of a KL: not meaningfully negative


def test_outputs_are_written(result):
    c, r = result
    for name in ("results.md", "results.csv", "frontier.png", "samples.jsonl", "pairs.jsonl"):
        assert os.path.getsize(os.path.join(c.out_dir, name)) > 0, name
    with open(os.path.join(c.out_dir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(r["points"]) and {row["method"] for row in rows} == {
        "sft", "best_of_n", "ppo_kl3", "ppo_gt_kl3", "dpo_beta0p1", "preferred_ft", "online_dpo_beta0p1",
        "tr_dpo_beta0p1"}
    assert {"seed", "step", "family", "rm_score", "vader", "kl"} <= set(rows[0])
    # every DPO and PPO point carries the reward model's score of its samples
    assert all(row["rm_score"] != "" for row in rows if row["family"] in ("DPO", "PPO", "PPO-GT"))
    stored = read_points(c.out_dir)  # the per-prompt outcomes behind every mean
    assert [(p["method"], p["seed"], p["step"]) for p in stored] == [
        (p["method"], p["seed"], p["step"]) for p in r["points"]]
    assert all(len(p["rewards"]) == c.eval.prefixes for p in stored)
    assert os.path.getsize(os.path.join(c.out_dir, "overoptimization.png")) > 0
    text = open(os.path.join(c.out_dir, "results.md")).read()
    assert "## DPO against the others at matched KL" in text and "Pearson r" in text
    assert "## Time per stage" in text and "| π_SFT |" in text


def test_the_equal_terms_table_counts_what_each_run_used(result):
    c, _ = result
    with open(os.path.join(c.out_dir, "budget.csv")) as f:
        runs = {(r["method"], int(r["seed"])): {k: float(v) for k, v in r.items() if k not in ("family", "method")}
                for r in csv.DictReader(f)}
    labelled = c.pairs.prefixes * c.pairs.samples_per_prefix  # every prefix's samples, scored by VADER once
    iterations, batch, rollouts = c.train.steps // c.ppo.epochs, c.train.batch_pairs, c.ppo.rollouts
    assert set(runs) == {("dpo_beta0p1", 0), ("dpo_beta0p1", 1), ("preferred_ft", 0), ("ppo_kl3", 0),
                         ("ppo_gt_kl3", 0), ("online_dpo_beta0p1", 0), ("tr_dpo_beta0p1", 0)}  # sweeps: tuning
    want = {"updates": c.train.steps, "sequences": c.train.steps * 2 * batch, "ground_truth_labels": labelled,
            "reward_model_queries": 0, "samples_generated": labelled}
    for key, value in want.items():
        assert runs["dpo_beta0p1", 1][key] == value and runs["tr_dpo_beta0p1", 0][key] == value, key
    # online DPO: its own samples are its labels, every one of them scored by VADER as it trains
    sampled = c.train.steps * c.online.prompts * c.online.samples_per_prompt
    assert {k: runs["online_dpo_beta0p1", 0][k] for k in want} == {
        "updates": c.train.steps, "sequences": c.train.steps * 2 * c.online.prompts, "ground_truth_labels": sampled,
        "reward_model_queries": 0, "samples_generated": sampled}
    ppo = {"updates": iterations * c.ppo.epochs, "sequences": iterations * rollouts * c.ppo.epochs,
           "learning_rate": c.ppo.learning_rate}
    assert runs["ppo_kl3", 0] | ppo == runs["ppo_kl3", 0] and runs["ppo_gt_kl3", 0] | ppo == runs["ppo_gt_kl3", 0]
    assert (runs["ppo_kl3", 0]["reward_model_queries"], runs["ppo_kl3", 0]["ground_truth_labels"]) == (
        iterations * rollouts, labelled)  # its reward: the model trained on the pairs
    assert (runs["ppo_gt_kl3", 0]["reward_model_queries"], runs["ppo_gt_kl3", 0]["ground_truth_labels"],
            runs["ppo_gt_kl3", 0]["samples_generated"]) == (0, iterations * rollouts, iterations * rollouts)
    assert all(r["seconds"] > 0 for r in runs.values())
    assert "## Equal terms: what each run used" in open(os.path.join(c.out_dir, "results.md")).read()


def test_learning_rates_are_chosen_on_validation_prefixes_the_test_never_uses(result):
    c, _ = result
    stages = S.Stages(c.copy_and_resolve_references())
    stages.data()
    test, validation = (stages.prefixes(stages.test_ids, n, c.seed + 4, sources=True, skip=skip)[2]
                        for n, skip in ((c.eval.prefixes, 0), (c.sweep.prefixes, c.eval.prefixes)))
    assert len(validation) == c.sweep.prefixes and not set(test) & set(validation)  # other sentences
    np.testing.assert_array_equal(stages.test_prefixes()[0], stages.prefixes(stages.test_ids, c.eval.prefixes,
                                                                              c.seed + 4)[0])
    with open(os.path.join(c.out_dir, "sweep.csv")) as f:
        sweep = list(csv.DictReader(f))
    # one row per validation evaluation: every eval.every updates of each rate's run, as the test runs
    periods = c.train.steps // c.eval.every
    assert [(r["family"], float(r["learning_rate"]), int(r["updates"])) for r in sweep] == [
        ("DPO", lr, c.eval.every * (i + 1)) for lr in c.sweep.learning_rates for i in range(periods)]
    eligible = [r for r in sweep if float(r["kl"]) <= c.sweep.max_kl]
    best = max(eligible, key=lambda r: float(r["reward"]))
    assert [r["chosen"] for r in sweep] == [str(r is best) for r in sweep]
    with open(os.path.join(c.out_dir, "budget.csv")) as f:
        rates = {(b["method"], float(b["learning_rate"])) for b in csv.DictReader(f)}
    # the choice is DPO's (both seeds); the other families keep their configured rates
    assert {("dpo_beta0p1", float(best["learning_rate"])), ("preferred_ft", c.train.learning_rate)} <= rates
    assert "## Learning rates, chosen on validation prefixes" in open(os.path.join(c.out_dir, "results.md")).read()


def test_a_method_runs_at_each_of_its_seeds_on_the_same_prompts(result):
    c, r = result
    dpo = [p for p in r["points"] if p["method"] == "dpo_beta0p1"]
    assert [(p["seed"], p["step"]) for p in dpo] == [(s, step) for s in (0, 1) for step in (20, 40)]
    first, second = dpo[1], dpo[3]  # the two seeds' final points: other batch orders, other samples
    assert not np.allclose(first["outcomes"]["vader"], second["outcomes"]["vader"])
    assert [p["seed"] for p in r["points"] if p["method"] == "preferred_ft"] == [0, 0]
    text = open(os.path.join(c.out_dir, "results.md")).read()
    import re

    assert re.search(r"\| dpo_beta0p1 \| DPO \| 2 \| [\d.e-]+ \| 40 \|", text)  # 2 runs, learning rate, updates


def test_win_rates_generalization_and_judge_validation_are_reported(result):
    c, _ = result
    with open(os.path.join(c.out_dir, "winrate.csv")) as f:
        rows = list(csv.DictReader(f))
    policies = ["sft", "ppo_kl3", "ppo_gt_kl3", "dpo_beta0p1", "online_dpo_beta0p1", "preferred_ft",
                "tr_dpo_beta0p1"]  # in training order (config.methods iterates by name)
    assert [(r["method"], float(r["temperature"])) for r in rows] == [
        (m, t) for m in policies for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(int(r["valid"]) == 64 and int(r["invalid"]) == 0 for r in rows)  # VADER always answers
    # like terms: the human side cut to the policy's budget; lengths, EOS rate and the length-controlled win rate
    budget = c.eval.max_new_tokens
    assert all(0 < float(r["baseline_length"]) <= budget and 0 < float(r["length"]) <= budget for r in rows)
    assert all(0 <= float(r["eos_rate"]) <= 1 and 0 <= float(r["lc_win_rate"]) <= 1 for r in rows)
    with open(os.path.join(c.out_dir, "winrate_outcomes.jsonl")) as f:  # per-prompt outcomes behind every row
        saved = {(o["method"], o["prefixes"], o["temperature"]): o for o in map(json.loads, f) if o["seed"] == 0}
    for r in rows:
        win = saved[(r["method"], "movies", float(r["temperature"]))]["win"]
        assert len(win) == 64 and np.mean(win) == pytest.approx(float(r["win_rate"]))
    mean = {m: sum(float(r["win_rate"]) for r in rows if r["method"] == m) / 5 for m in policies}
    # DPO's higher reward shows against the humans too (measured +0.12 over the five temperatures' 320 verdicts,
    # about 3 standard errors; asserted without a margin)
    assert mean["dpo_beta0p1"] > mean["sft"], mean
    with open(os.path.join(c.out_dir, "generalization.csv")) as f:
        general = list(csv.DictReader(f))
    assert [(g["method"], g["domain"]) for g in general] == [
        (m, d) for m in policies for d in ("movies", "amazon", "nyt", "tweets")]
    movies_t1 = {r["method"]: r["win_rate"] for r in rows if float(r["temperature"]) == 1.0}
    assert all(g["win_rate"] == movies_t1[g["method"]] for g in general if g["domain"] == "movies")
    text = open(os.path.join(c.out_dir, "results.md")).read()
    for section in ("## Win rate vs sampling temperature", "## Generalization to new input distributions",
                    "## Judge validation"):
        assert section in text
    import re

    agreement = {(j, d): float(a) for j, d, a in re.findall(r"- (VADER|learned reward model) on (\w+): ([\d.]+) %",
                                                             text)}
    assert set(agreement) == {("VADER", d) for d in ("movies", "amazon", "nyt", "tweets")} | {
        ("learned reward model", "movies")}
    assert agreement[("VADER", "movies")] > 60 and agreement[("VADER", "tweets")] > 60  # VADER's paper: r ≈ 0.45+
    assert os.path.getsize(os.path.join(c.out_dir, "winrate.png")) > 1000


def test_reward_model_is_scored_on_held_out_samples_and_best_of_n_picks_by_it(result):
    """What must hold on any machine. How well this small reward model generalizes from ~900 pairs is the main job's
    measurement, not an assertion: its held-out accuracy measured 0.54-0.59 (s.e. 0.024), and Best-of-N's VADER gain
    +0.03 to +0.1 (s.e. 0.04) — inside run-to-run noise (issue 34). That a reward model learns a preference is
    tests/test_reward_runs.py's."""
    c, r = result
    rm = r["reward_model"]
    assert 0.0 <= rm["rm_heldout_accuracy"] <= 1.0 and rm["rm_heldout_pairs"] > 300
    assert -1.0 <= rm["rm_vader_r_samples"] <= 1.0
    bon = [p for p in r["points"] if p["method"] == "best_of_n"]
    sft = next(p for p in r["points"] if p["method"] == "sft")
    assert [p["step"] for p in bon] == [1, 2, 4, 16] and bon[0]["kl"] == 0.0
    np.testing.assert_array_equal(bon[0]["outcomes"]["vader"], sft["outcomes"]["vader"])  # N = 1 is π_SFT's samples
    # each N's pick is the best of a superset of the smaller N's samples: its score is at least theirs, per prompt
    for smaller, larger in zip(bon, bon[1:]):
        assert np.all(larger["outcomes"]["rm_score"] >= smaller["outcomes"]["rm_score"])
    assert bon[-1]["rm_score"] > bon[0]["rm_score"] + 0.5
    text = open(os.path.join(c.out_dir, "results.md")).read()
    assert "held-out pair accuracy" in text and "## Best-of-N" in text


def test_the_reward_model_is_chosen_by_its_validation_pair_accuracy(result):
    """One model per rate; the kept one orders the most validation pairs (π_SFT samples of the validation prefixes,
    which the test prefixes never share) as VADER does, and it is the one PPO and Best-of-N use."""
    c, r = result
    rm = r["reward_model"]
    assert [row["learning_rate"] for row in rm["rm_sweep"]] == list(c.reward_model.learning_rates)
    best = max(rm["rm_sweep"], key=lambda row: row["validation_accuracy"])
    assert rm["rm_learning_rate"] == best["learning_rate"]
    assert rm["rm_validation_accuracy"] == best["validation_accuracy"] and rm["rm_validation_pairs"] > 200
    text = open(os.path.join(c.out_dir, "results.md")).read()
    assert f"learning rate {best['learning_rate']:g}, the best of 2 by validation pair accuracy" in text
    assert "| reward-model learning rate | validation pair accuracy |" in text


def test_ppo_gt_is_evaluated_on_the_shared_schedule_and_moves_away_from_the_sft_policy(result):
    """At this size (10 iterations of 32 rollouts) PPO-GT's gain in VADER reward is inside
    run-to-run noise — +0.03 on one CPU, none on another (issue 34) — so no reward gain is asserted here; that PPO
    raises a reward it is given is tests/test_ppo.py's and tests/test_ppo_runs.py's toy tasks, far from π_SFT."""
    _, r = result
    gt = [p for p in r["points"] if p["method"] == "ppo_gt_kl3"]
    assert [p["step"] for p in gt] == [20, 40]  # optimizer updates, as every family's: iterations 5, 10 x 4 epochs
    assert gt[-1]["kl"] > 0.3


def test_experiment_command_needs_a_known_name():
    out = subprocess.run([sys.executable, "-m", "dpo_jax.main", "experiment", "imdb"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "name one of sentiment" in out.stderr


def test_rerunning_a_method_reuses_every_cached_stage(result):
    c, first = result
    again = c.copy_and_resolve_references()
    # its second seed only: the sweep (keyed without the seeds a method names) is still the cached one
    again.methods = {"dpo_beta0p1": sentiment_config.method("dpo", seeds=(1,), beta=0.1)}
    again.ppo.targets, again.winrate.prefixes = (), 0  # only what this test reads
    r, out = run_at_default_level(again)  # as the first run was: its numbers are compared
    assert "π_SFT: cached" in out and "pairs: " in out and "(cached:" in out and "learning-rate sweep: cached" in out
    want = [p for p in first["points"] if p["method"] == "dpo_beta0p1" and p["seed"] == 1]
    got = [p for p in r["points"] if p["method"] == "dpo_beta0p1"]
    assert [p["seed"] for p in got] == [1, 1]
    flat = lambda ps: [x for p in ps for x in (p["step"], p["reward"], p["kl"])]  # noqa: E731
    assert flat(got) == pytest.approx(flat(want), abs=1e-5)
    assert "summary (final point per method" in out


def test_evaluation_samples_at_temperature_one_whatever_the_pairs_used(result, monkeypatch):
    """The KL(π‖π_SFT) estimator is unbiased only for samples from π at temperature 1."""
    c, _ = result
    c = c.copy_and_resolve_references()
    c.pairs.temperature = 0.5
    stages = S.Stages(c)
    stages.data()
    stages.sft()
    seen, generate = [], bon.generate_chunks
    monkeypatch.setattr(bon, "generate_chunks", lambda *a, **k: seen.append(a[-1].temperature) or generate(*a, **k))
    prompts, mask = stages.prefixes(stages.test_ids, 8, 0)
    reward, kl, rm_score, texts = stages.evaluate(stages.sft_params, stages.sft_params, prompts, mask)
    assert seen == [1.0] and len(texts) == 8 and reward.shape == (8,) and np.abs(kl).max() < 1e-3
    assert rm_score is None  # no reward model in these stages


def test_zero_training_steps_evaluates_only_the_sft_policy(result):
    c, first = result
    again = c.copy_and_resolve_references()
    again.train.steps = again.reward_model.steps = 0
    again.winrate.prefixes = 0  # not read here
    r, out = run_at_default_level(again)  # sampled as the first run was (level 0 in-process: 33 s against 11 s)
    assert [p["method"] for p in r["points"]] == ["sft"]
    # π_SFT sampled on its own draws what Best-of-N's first samples were (the same keys; the batch's shape differs,
    # so a rare token may differ by rounding)
    sft = next(p for p in first["points"] if p["method"] == "sft")
    same = np.isclose(r["points"][0]["outcomes"]["vader"], sft["outcomes"]["vader"])
    assert same.mean() > 0.9 and abs(r["points"][0]["kl"]) < 1e-3
    assert "train.steps = 0: no method is trained" in out


def test_methods_are_named_entries_whose_unknown_fields_name_the_method(result):
    c, _ = result
    m = sentiment_config.default_config().methods
    cdpo = sentiment_config.method("dpo", beta=0.1, label_smoothing=0.2)
    assert (cdpo.mode, cdpo.dpo.beta, cdpo.dpo.label_smoothing, cdpo.seeds) == ("dpo", 0.1, 0.2, ())
    assert m.dpo_beta1.to_dict() == {"mode": "dpo", "seeds": (), "dpo": {"beta": 1.0}}
    assert sentiment_config.method("unlikelihood", seeds=(0,), unlikelihood_alpha=1.0).to_dict() == {
        "mode": "unlikelihood", "seeds": (0,), "dpo": {"unlikelihood_alpha": 1.0}}
    stages = S.Stages(c.copy_and_resolve_references())
    stages.data()
    with pytest.raises(ValueError, match=r"config.methods.typo.dpo: unknown key\(s\) \['bta'\]; valid: beta, "):
        stages.engine_for("typo", S.method("dpo", bta=0.5), 1e-3, 4, None)


def test_online_settings_that_cannot_make_pairs_are_refused_before_anything_runs(tmp_path):
    c = sentiment_config.default_config()
    c.out_dir, c.cache_dir = str(tmp_path / "out"), str(tmp_path / "cache")
    c.online.samples_per_prompt = 1
    with pytest.raises(ValueError, match=r"config.online.samples_per_prompt = 1 >= 2"):
        S.run(c)
    c.online.samples_per_prompt, c.online.temperature = 2, 0.0
    with pytest.raises(ValueError, match=r"config.online.temperature = 0.0 must be > 0"):
        S.run(c)
    assert not os.path.exists(c.out_dir)  # refused before the first stage
