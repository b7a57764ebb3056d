"""Reward-model runs end to end: from an SFT checkpoint, eval accuracy, HF export, exact resume after SIGKILL."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from dpo_jax import sharding
from dpo_jax.convert.hf import load_hf_checkpoint
from dpo_jax.models.decoder import logical_axes
from dpo_jax.models.reward import make_scorer, score_texts, sequence_scores
from dpo_jax.train import run as train_run
from dpo_jax.train.export import export
from tests.test_runs import REPO, _cli, _config, _overrides, _train_lines, assert_same_lines, kill_and_resume

EVAL = os.path.join(REPO, "configs", "data", "tiny_hh", "eval.jsonl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, cache):
    """π_SFT: a few SFT steps on the tiny data, exported as an HF causal LM."""
    root = tmp_path_factory.mktemp("sft")
    train_run.train(_config("sft", _overrides(root / "run", cache, **{"train.steps": 6})))
    export(str(root / "run"), str(root / "hf"))
    return root / "hf"


def test_reward_model_from_sft_learns_the_eval_preference_and_exports_to_transformers(sft_export, tmp_path, cache):
    c = _config("reward", _overrides(tmp_path / "rm", cache, **{"train.steps": 12, "data.eval_path": EVAL,
                                                                 "train.eval_every": 12}))
    c.model.source, c.model.path, c.data.tokenizer = "hf", str(sft_export), ""
    train_run.train(c)
    rows = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals[-1]["accuracy"] >= 0.8 and evals[-1]["loss"] < 0.5  # chance: 0.5 and ln 2
    assert {"accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected"} <= evals[-1].keys()

    export(str(tmp_path / "rm"), str(tmp_path / "rm_hf"))
    hf = T.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm_hf")).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(str(tmp_path / "rm_hf"))
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.pad_token_id is not None
    texts = ["\n\nHuman: What colour is snow?\n\nAssistant: White, usually.", "\n\nHuman: Hi\n\nAssistant: Go away."]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(enc["input_ids"]),
                  attention_mask=torch.as_tensor(enc["attention_mask"])).logits[:, 0].numpy()
    config, params = load_hf_checkpoint(str(tmp_path / "rm_hf"))
    got = sequence_scores(params, config, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
    shardings = sharding.param_shardings(logical_axes(config), params, mesh, sharding.DEFAULT_RULES)
    score = make_scorer(config, mesh, sharding.DEFAULT_RULES, shardings)  # texts -> scores on a 2-device mesh
    by_text = score_texts(score, jax.device_put(params, shardings), tokenizer, texts + texts[:1], 64, batch_rows=2)
    np.testing.assert_allclose(by_text, np.r_[want, want[:1]], atol=1e-4)

    # Best-of-N from π_SFT ranked by this reward model: the command's files, picks = argmax of the first N' scores
    from dpo_jax.commands import best_of_n as best_of_n_command
    from dpo_jax.config import load_config_file

    b = load_config_file(f"{REPO}/configs/tiny.py:best_of_n")
    b.policy.path, b.reward_model.path, b.out_dir = str(sft_export), str(tmp_path / "rm_hf"), str(tmp_path / "bon")
    b.prompts.limit, b.batch_rows = 6, 16
    best_of_n_command.main(b)
    samples = [json.loads(line) for line in open(tmp_path / "bon" / "samples.jsonl")]
    best = [json.loads(line) for line in open(tmp_path / "bon" / "best_of_n.jsonl")]
    assert len(samples) == 6 and all(len(s["scores"]) == 8 for s in samples)
    for row in best:
        scores = next(s["scores"] for s in samples if s["prompt"] == row["prompt"])
        assert row["sample"] == int(np.argmax(scores[:row["n"]])) and row["score"] == pytest.approx(max(
            scores[:row["n"]]))
    table = list(open(tmp_path / "bon" / "rewards.csv"))[1:]
    assert [int(line.split(",")[0]) for line in table] == [1, 2, 4, 8]
    means = [float(line.split(",")[2]) for line in table]
    assert means == sorted(means)  # the max of more samples of the same pass never drops
    b.policy.path, b.reward_model.path = b.reward_model.path, b.policy.path  # swapped: each is the wrong kind
    with pytest.raises(ValueError, match=r"config\.policy\.path = '.*rm_hf' is not a policy"):
        best_of_n_command.main(b)
    b.policy.path = str(sft_export)
    with pytest.raises(ValueError, match=r"config\.reward_model\.path = '.*' is not a reward model"):
        best_of_n_command.main(b)

    policy = _config("dpo", _overrides(tmp_path / "dpo", cache))
    policy.model.source, policy.model.path, policy.data.tokenizer = "hf", str(tmp_path / "rm_hf"), ""
    with pytest.raises(ValueError, match=r"config\.model\.path = '.*rm_hf' is a reward model \('score' head\); "
                                         r"config\.train\.mode = 'dpo' trains a policy"):
        train_run.train(policy)


def test_reward_run_resumes_exactly_after_sigkill(tmp_path, cache):
    train_run.train(_config("reward", _overrides(tmp_path / "straight", cache)))
    want = _train_lines(tmp_path / "straight")
    assert [r["step"] for r in want] == [3, 6, 9, 12] and want[-1]["accuracy"] > 0.5
    overrides = _overrides(tmp_path / "killed", cache)
    kill_and_resume(_cli(overrides, "reward"), "[train] step 9")
    got = _train_lines(tmp_path / "killed")
    assert [r["step"] for r in got] == [3, 6, 9, 12]
    assert_same_lines(got, want)
