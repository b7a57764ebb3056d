"""Online DPO and TR-DPO: pairs from scores, an online step equal to an offline DPO step on the pairs it sampled,
the reference moved by the soft-update formula (and untouched without it), refusals, and the tiny online run."""

import json
import os

import jax
import numpy as np
import pytest

from dpo_jax.models.generate import SamplingConfig
from dpo_jax.rlhf.online_dpo import OnlineRollouts, pairs_from_scores, prompt_tokens
from dpo_jax.train.reference_source import PerBatchReference, SyncedReference
from tests import engine_helpers as H

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def test_pairs_from_scores_take_the_best_and_the_worst_and_drop_all_equal_rows():
    scores = np.array([[0.1, 0.9, 0.5], [2.0, 2.0, 1.0], [3.0, 3.0, 3.0], [-1.0, 5.0, 5.0]])
    best, worst, keep = pairs_from_scores(scores)
    assert best.tolist() == [1, 0, 0, 1] and worst.tolist() == [0, 2, 0, 0]  # first of equals
    assert keep.tolist() == [True, True, False, True]  # all-equal row: no pair
    with pytest.raises(ValueError, match="k >= 2"):
        pairs_from_scores(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="not finite"):
        pairs_from_scores(np.array([[0.0, np.nan]]))


def _low_tokens(rows, row_mask, texts, prompt_width=H.PROMPT):
    """A learnable reward: the share of the completion's tokens in the low half of the vocabulary."""
    completion = rows[:, prompt_width:]
    real = row_mask[:, prompt_width:] > 0
    return ((completion < H.MODEL.vocab_size // 2) & real).sum(1) / np.maximum(real.sum(1), 1)


def _rollouts(engine, ref_params, k=3, tokens=6):
    rng = np.random.default_rng(0)
    source = [{"chosen_input_ids": np.concatenate([rng.integers(0, 64, H.PROMPT), [1, 2]]),
               "chosen_loss_mask": np.array([0] * H.PROMPT + [1, 1])} for _ in range(8)]
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=1.0, eos_id=None, pad_id=0)
    reference = PerBatchReference(engine, ref_params)
    return OnlineRollouts(engine, lambda i: prompt_tokens(source[i]), reference, _low_tokens,
                          lambda rows, mask: [""] * len(rows), sampling, k, H.PROMPT, 0.0, seed=3), source


def test_an_online_step_is_an_offline_dpo_step_on_the_pairs_it_sampled():
    devices = jax.devices()[:1]
    online = H.engine(H.config(optimizer_name="sgd", lr=0.1), devices=devices)
    offline_config = H.config(optimizer_name="sgd", lr=0.1)
    online_config = H.config(optimizer_name="sgd", lr=0.1)
    online_config.train.mode = "online_dpo"
    online = H.engine(online_config, devices=devices)
    offline = H.engine(offline_config, devices=devices)
    ref = jax.tree.map(lambda x: x.copy(), online.state.params)
    rollouts, source = _rollouts(online, ref)
    local = {"example_id": np.arange(8, dtype=np.int32), "example_mask": np.ones(8, np.int32)}
    batch = rollouts(local, online.state)
    again = rollouts(local, online.state)  # the keys come from the step: the same samples
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    # the pairs are each prompt's best and worst sample, after the prompt it was given
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert np.array_equal(ids[:8, :H.PROMPT], np.stack([prompt_tokens(s) for s in source]))
    chosen, rejected = (_low_tokens(ids[s], batch["attention_mask"][s], None) for s in (slice(0, 8), slice(8, 16)))
    kept = batch["example_mask"] == 1
    assert np.all(chosen[kept] > rejected[kept]) and np.all(mask[:, :H.PROMPT] == 0)
    assert rollouts.pairs == 2 * kept.sum() and rollouts.pairs + rollouts.ties == 16  # two calls, counted
    np.testing.assert_allclose(batch["scores_margin"][kept], (chosen - rejected)[kept], rtol=1e-6)

    state_on, metrics_on = online.train_step(online.state, online.shard_batch(batch))
    state_off, metrics_off = offline.train_step(offline.state, offline.shard_batch(batch))
    assert float(metrics_on["loss"].total) == pytest.approx(float(metrics_off["loss"].total), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 state_on.params, state_off.params)
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "objective/scores_margin", "val/contain_eos_token"):
        assert name in metrics_on
    assert float(metrics_on["objective/kl"].total) == pytest.approx(0.0, abs=1e-4)  # π = π_ref at the first step


class _State:
    def __init__(self, step, params):
        self.step, self.params = np.asarray(step), params


def test_the_reference_moves_by_the_soft_update_only_every_n_steps():
    e = H.engine(H.config(), devices=jax.devices()[:1])
    ref0 = jax.tree.map(lambda x: np.asarray(x).copy(), e.state.params)
    policy = jax.tree.map(lambda x: x + 1.0, e.state.params)
    inner = PerBatchReference(e, jax.tree.map(lambda x: x.copy(), e.state.params))
    synced = SyncedReference(inner, every=2, alpha=0.25)
    local = H.local_batch(0, 8)
    synced.attach(local, "train", _State(1, policy))  # step 1: not a multiple of 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), synced.params, ref0)
    synced.attach(local, "train", _State(2, policy))
    want = jax.tree.map(lambda r, p: 0.25 * np.asarray(p) + 0.75 * r, ref0, policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), synced.params, want)
    synced.attach(local, "train", _State(2, policy))  # the same step again: not moved twice
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), synced.params, want)
    synced.attach(local, "eval", _State(4, policy))  # evaluation never moves it
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), synced.params, want)
    never = SyncedReference(PerBatchReference(e, jax.tree.map(lambda x: x.copy(), e.state.params)), 0, 1.0)
    never.attach(local, "train", _State(2, policy))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), never.params, ref0)
    with pytest.raises(ValueError, match="ref_sync_alpha"):
        SyncedReference(inner, 2, 0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data, tokenizer and compilation cache for the module's tiny runs."""
    return str(tmp_path_factory.mktemp("online_cache"))


def _tiny(tmp_path, mode, cache_dir=None, **overrides):
    from dpo_jax.config import load_config_file

    c = load_config_file(f"{TINY}:{mode}")
    c.train.run_dir, c.train.tensorboard = str(tmp_path / mode), False
    c.data.cache_dir = cache_dir or str(tmp_path / "cache")
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def test_sync_and_online_settings_that_cannot_work_are_refused(tmp_path):
    from dpo_jax.commands.train import train

    with pytest.raises(ValueError, match="ref_sync_every = 5 .* needs config.dpo.reference = 'per_batch'.*precompute"):
        train(_tiny(tmp_path, "dpo", **{"dpo.ref_sync_every": 5}))
    with pytest.raises(ValueError, match="'precompute': online DPO samples new pairs"):
        train(_tiny(tmp_path, "online_dpo", **{"dpo.reference": "precompute"}))
    with pytest.raises(ValueError, match="data.layout = 'pairs'"):
        train(_tiny(tmp_path, "online_dpo", **{"data.layout": "packed"}))
    with pytest.raises(ValueError, match="samples_per_prompt = 1"):
        train(_tiny(tmp_path, "online_dpo", **{"online.samples_per_prompt": 1}))


def _train_logs(c) -> list[dict]:
    with open(os.path.join(c.train.run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"split": "train"' in line]


def test_the_tiny_online_run_raises_its_reward_and_logs_trl_s_metrics(tmp_path, cache):
    from dpo_jax.commands.train import train

    c = _tiny(tmp_path, "online_dpo", cache, **{"train.log_every": 4, "train.steps": 12, "data.eval_path": ""})
    train(c)
    with open(os.path.join(c.train.run_dir, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f if '"split": "train"' in line]
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                 "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token"):
        assert name in logs[-1], name
    assert logs[-1]["objective/scores"] > logs[0]["objective/scores"]  # measured 0.11, 0.18, 0.30 at steps 4, 8, 12
    assert logs[-1]["objective/kl"] > 0 and logs[-1]["rewards/accuracies"] > 0.5


def test_online_dpo_with_a_moving_reference_resumes_exactly(tmp_path, cache):
    """TR-DPO (the reference half-way to the policy every 2 steps) in an online run stopped at its step-3
    checkpoint (as a kill after it would) and resumed: steps 4-6 log what the uninterrupted run logs."""
    from dpo_jax.commands.train import train

    settings = {"train.log_every": 1, "train.save_every": 3, "dpo.ref_sync_every": 2, "dpo.ref_sync_alpha": 0.5,
                "online.samples_per_prompt": 2}
    whole = _tiny(tmp_path / "whole", "online_dpo", cache, **settings, **{"train.steps": 6})
    train(whole)
    part = _tiny(tmp_path / "part", "online_dpo", cache, **settings, **{"train.steps": 3})
    train(part)
    part.train.steps = 6
    train(part)
    a, b = _train_logs(whole), _train_logs(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a[3:], b[3:]):
        for key in ("loss", "objective/kl", "objective/scores", "rewards/margins", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert a[3]["objective/kl"] != 0  # the reference moved toward a trained policy: still a KL to it


def test_a_judge_that_fails_mid_run_stops_it_and_the_resumed_run_asks_nothing_twice(tmp_path, cache):
    """Online DPO labelled by an LLM judge (the loopback stub: it prefers the response with more 'good's) that goes
    down after 40 verdicts, in the third step: the run stops naming the URL and the verdicts kept; resumed (from
    its step-2 checkpoint) after the server is back, it asks none of the comparisons answered before."""
    from dpo_jax.commands.train import train
    from dpo_jax.evaluation.endpoint import JudgeError
    from tests.test_judges import Stub

    stub = Stub(fail_after=40)
    try:
        c = _tiny(tmp_path, "online_dpo", cache, **{"train.steps": 4, "train.save_every": 2, "train.log_every": 1,
                                                    "online.samples_per_prompt": 2, "online.reward_kind": "judge"})
        c.online.judge.kind = "endpoint"
        c.online.judge.endpoint.update(base_url=stub.url, model="stub", template="dialogue", backoff_s=0.01,
                                       max_retries=1, both_orders=0.0)
        with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*HTTP 503.*verdicts of this comparison are kept"):
            train(c)
        answered_before = set(stub.answered)
        assert len(answered_before) == 40
        stub.fail_after, before = None, len(stub.bodies)
        train(c)
        asked_again = set(stub.bodies[before:])
        assert not asked_again & answered_before  # every verdict of the failed run was reused from the cache
        logs = _train_logs(c)
        assert [r["step"] for r in logs] == [1, 2, 3, 4] and all("objective/scores" in r for r in logs)
    finally:
        stub.close()


def test_lora_online_dpo_trains_the_adapters_against_the_base(tmp_path, cache):
    from dpo_jax.commands.train import train
    from dpo_jax.models import lora
    from dpo_jax.train.export import restore_params

    c = _tiny(tmp_path, "online_dpo", cache, **{"train.steps": 3, "train.save_every": 1, "train.log_every": 1,
                                                "train.keep_checkpoints": 3, "dpo.reference": "base"})
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.targets = 8, 16.0, ("q", "v", "fc_in")
    c.optimizer.learning_rate = 3e-2
    train(c)
    logs = _train_logs(c)
    assert abs(logs[0]["objective/kl"]) < 1e-3 and abs(logs[-1]["objective/kl"]) > 1e-3  # adapters start at zero
    _, model, first, _ = restore_params(c.train.run_dir, 1)
    _, _, last, _ = restore_params(c.train.run_dir, 3)
    (base_1, adapters_1), (base_3, adapters_3) = lora.trainable(first, model), lora.trainable(last, model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), base_1, base_3)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(adapters_1), jax.tree.leaves(adapters_3)))


def test_iterative_dpo_trains_rounds_on_its_own_samples_against_the_reference_it_is_told(tmp_path, cache, capsys):
    """Two rounds with the reference moved to each round's starting policy (round 1's first loss is ln 2), the
    same with it fixed at the first policy (round 1 starts away from it), and a re-run that trains nothing."""
    import math
    import shutil

    from dpo_jax.commands.train import train

    def first_loss(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return next(json.loads(x) for x in f if '"split": "train"' in x)["loss"]

    settings = {"iterative.prompts_per_round": 32, "iterative.steps_per_round": 2, "train.log_every": 1}
    moved = _tiny(tmp_path / "moved", "iterative_dpo", cache, **settings, **{"iterative.reference": "previous"})
    train(moved)
    root = moved.train.run_dir
    pairs = [open(os.path.join(root, f"round_{r}", "pairs.jsonl")).read().splitlines() for r in (0, 1)]
    assert pairs[0] and pairs[1] and pairs[0] != pairs[1]  # round 1 sampled from round 0's trained policy
    assert all(set(json.loads(p)) == {"prompt", "chosen", "rejected"} for p in pairs[1])
    assert first_loss(os.path.join(root, "round_1", "run")) == pytest.approx(math.log(2), abs=1e-5)

    fixed = _tiny(tmp_path / "fixed", "iterative_dpo", cache, **settings, **{"iterative.reference": "initial"})
    os.makedirs(fixed.train.run_dir)
    for name in ("tokenizer", "initial_policy", "round_0"):  # round 0 is the same whichever the reference
        shutil.copytree(os.path.join(root, name), os.path.join(fixed.train.run_dir, name))
    train(fixed)
    assert "round 0: done" in capsys.readouterr().out
    assert abs(first_loss(os.path.join(fixed.train.run_dir, "round_1", "run")) - math.log(2)) > 1e-3

    train(moved)  # finished: nothing trained again
    out = capsys.readouterr().out
    assert "round 0: done" in out and "round 1: done" in out and "trained" not in out
