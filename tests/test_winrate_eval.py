"""`dpo-jax eval`'s sampling evaluation on tiny runs: win rates per temperature against the eval split's preferred
responses or another run, recomputable from completions.jsonl; greedy is deterministic; bad input fails early."""

import csv
import json
import os

import numpy as np
import pytest

from dpo_jax.commands import evaluate as eval_command
from dpo_jax.evaluation.winrate import win_rate
from dpo_jax.train import run as train_run
from tests.test_runs import TINY, _config, _overrides

JUDGE = f"{TINY}:polite_reward"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("winrate")
    cache = str(root / "cache")
    out = {}
    for mode in ("dpo", "sft"):
        out[mode] = str(root / mode)
        train_run.train(_config(mode, _overrides(out[mode], cache, **{"train.steps": 8, "train.save_every": 8})))
    return root, cache, out


def _eval_config(fixture, **winrate):
    root, cache, dirs = fixture
    c = _config("dpo", _overrides(dirs["dpo"], cache, **{"data.eval_path": os.path.join(
        os.path.dirname(TINY), "data", "tiny_hh", "eval.jsonl")}))
    w = c.winrate
    w.temperatures, w.prompts, w.max_new_tokens, w.name = (0.0, 1.0), 8, 12, "dpo"
    w.judge.kind, w.judge.function = "function", JUDGE
    for k, v in winrate.items():
        w[k] = v if not isinstance(v, dict) else w[k].update(v) or w[k]
    return c


def _read(out_dir):
    with open(os.path.join(out_dir, "winrate.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out_dir, "completions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return rows, records


def test_win_rates_against_chosen_and_another_run_recompute_from_the_completions(runs):
    from configs.tiny import polite_reward

    root, _, dirs = runs
    out = str(root / "vs_chosen")
    eval_command.evaluate(_eval_config(runs, runs=f"sft={dirs['sft']}", out_dir=out))
    rows, records = _read(out)
    assert [(r["method"], float(r["temperature"])) for r in rows] == [("dpo", 0.0), ("dpo", 1.0), ("sft", 0.0),
                                                                      ("sft", 1.0)]
    assert len(records) == 4 * 8 and os.path.getsize(os.path.join(out, "winrate.png")) > 1000
    for row in rows:  # the table is the judge's verdicts on exactly the recorded completions
        mine = [r for r in records if r["method"] == row["method"] and r["temperature"] == float(row["temperature"])]
        a = polite_reward([r["prompt"] + r["completion"] for r in mine])
        b = polite_reward([r["prompt"] + r["baseline"] for r in mine])
        want = win_rate(np.where(np.asarray(a) > b, 1.0, np.where(np.asarray(a) == b, 0.5, 0.0)))
        assert float(row["win_rate"]) == pytest.approx(want["win_rate"]) and int(row["valid"]) == 8
        assert float(row["low"]) == pytest.approx(want["low"])
    assert {r["baseline"] for r in records} <= {r["baseline"] for r in records if r["method"] == "sft"}
    assert any(r["completion"] for r in records)
    # like terms: the preferred response cut to the policy's 12 new tokens, on a seeded sample of the eval prompts
    from dpo_jax.data.tokenizers import load_tokenizer
    from dpo_jax.evaluation import agreement
    from dpo_jax.train.evaluation import seeded_sample
    from dpo_jax.train.model_source import tokenizer_dir

    c = _eval_config(runs)
    tok = load_tokenizer(c.data, tokenizer_dir(c.model))
    with open(c.data.eval_path) as f:
        split = [json.loads(line) for line in f]
    picked = seeded_sample(len(split), 8, 0)
    assert len(split) > 8 and list(picked) != list(range(8))
    responses = [agreement.read_labelled_pairs(c.data.eval_path).chosen[i] for i in picked]
    full = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in responses]
    cut = {r["prompt_index"]: r["baseline_length"] for r in records}
    assert max(full) > 12 and max(cut.values()) == 12  # a response longer than the budget was cut to it
    assert all(r["baseline_length"] <= 12 and r["length"] <= 12 for r in records)

    out2 = str(root / "vs_sft")
    eval_command.evaluate(_eval_config(runs, runs=f"sft={dirs['sft']}", baseline="sft", out_dir=out2))
    rows2, records2 = _read(out2)
    assert [r["method"] for r in rows2] == ["dpo", "dpo"]
    sft_at = {(r["temperature"], r["prompt"]): r["completion"] for r in records if r["method"] == "sft"}
    dpo_at = {(r["temperature"], r["prompt"]): r["completion"] for r in records if r["method"] == "dpo"}
    for r in records2:  # the baseline is the other run's completion at the same temperature; sampling repeats
        assert r["baseline"] == sft_at[(r["temperature"], r["prompt"])]
        assert r["completion"] == dpo_at[(r["temperature"], r["prompt"])]


def test_bad_input_fails_before_sampling(runs, tmp_path):
    root, cache, dirs = runs
    with pytest.raises(ValueError, match=r"winrate\.temperatures.*>= 0"):
        eval_command.evaluate(_eval_config(runs, temperatures=(0.0, -0.5), out_dir=str(tmp_path / "a")))
    empty = tmp_path / "nothing_trained"
    with pytest.raises(ValueError, match="'ghost'.*no policy checkpoint"):
        eval_command.evaluate(_eval_config(runs, runs=f"ghost={empty}", out_dir=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="baseline = 'nobody'"):
        eval_command.evaluate(_eval_config(runs, baseline="nobody", out_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="judge.kind"):
        eval_command.evaluate(_eval_config(runs, judge={"kind": "oracle"}))
    assert not any((tmp_path / x).exists() for x in "abc") and not empty.exists()


def test_reward_model_and_endpoint_judges_through_eval(runs, tmp_path):
    import jax
    import jax.numpy as jnp

    from dpo_jax.convert import native
    from dpo_jax.data.tokenizers import load_tokenizer
    from dpo_jax.models.reward import as_reward_model, sequence_scores
    from dpo_jax.train.export import restore_params
    from dpo_jax.train.model_source import tokenizer_dir
    from tests.test_judges import Stub

    root, _, dirs = runs
    _, policy, params, _ = restore_params(dirs["dpo"])
    c = _eval_config(runs)
    tok = load_tokenizer(c.data, tokenizer_dir(c.model))
    rm_config, rm_params = as_reward_model(policy, params, tok.pad_token_id, jax.random.key(7))
    native.save_model(str(tmp_path / "rm"), rm_config, rm_params)
    out = str(tmp_path / "rm_judge")
    c = _eval_config(runs, out_dir=out, temperatures=(1.0,))
    c.winrate.judge.kind, c.winrate.judge.model.source, c.winrate.judge.model.path = "reward_model", "checkpoint", \
        str(tmp_path / "rm")
    eval_command.evaluate(c)
    (row,), records = _read(out)

    # an independent path: one text at a time, left-padded (eval right-pads) to one width, no chunking, one device
    one = jax.jit(lambda p, ids, mask: sequence_scores(p, rm_config, ids, mask)[0])
    encoded = [[tok(r["prompt"] + r[k])["input_ids"] for r in records] for k in ("completion", "baseline")]
    width = max(len(ids) for ids in encoded[0] + encoded[1])

    def score(rows):
        return np.asarray([float(one(rm_params, jnp.asarray([[0] * (width - len(ids)) + ids]),
                                     jnp.asarray([[0] * (width - len(ids)) + [1] * len(ids)]))) for ids in rows])

    a, b = score(encoded[0]), score(encoded[1])
    assert np.min(np.abs(a - b)) > 1e-4  # no near-ties that rounding could flip
    assert float(row["win_rate"]) == pytest.approx(win_rate(np.where(a > b, 1.0, 0.0))["win_rate"])

    # the same reward model as `dpo-jax judge-agreement`'s judge on the eval split's labelled pairs (HH format: the
    # human label is `chosen`), against the independent path above
    from dpo_jax.commands import judge_agreement
    from dpo_jax.evaluation.agreement import read_labelled_pairs

    tok.save_pretrained(str(tmp_path / "tok"))
    a_c = judge_agreement.default_config()
    a_c.data_path, a_c.out_dir, a_c.tokenizer, a_c.limit = c.data.eval_path, str(tmp_path / "agree"), \
        str(tmp_path / "tok"), 6
    a_c.judge.kind, a_c.judge.model.source, a_c.judge.model.path = "reward_model", "checkpoint", str(tmp_path / "rm")
    (agree,) = judge_agreement.main(a_c)
    labelled = read_labelled_pairs(c.data.eval_path, 6)
    rows_of = lambda texts: [tok(p + t)["input_ids"] for p, t in zip(labelled.prompts, texts)]  # noqa: E731
    width = max(len(ids) for ids in rows_of(labelled.chosen) + rows_of(labelled.rejected))
    s_c, s_r = score(rows_of(labelled.chosen)), score(rows_of(labelled.rejected))
    assert agree["judged"] == 6 and agree["majority"] == pytest.approx(np.mean(s_c > s_r))

    stub = Stub()
    try:
        out = str(tmp_path / "llm_judge")
        c = _eval_config(runs, out_dir=out)
        c.winrate.judge.kind = "endpoint"
        c.winrate.judge.endpoint.update(base_url=stub.url, model="stub", template="dialogue", backoff_s=0.01)
        eval_command.evaluate(c)
        rows, records = _read(out)
        # 8 prompts at 2 temperatures, a quarter of them (seeded) asked in both orders
        assert [int(r["valid"]) + int(r["invalid"]) + int(r["failed"]) for r in rows] == [8, 8]
        assert [int(r["asked_twice"]) for r in rows] == [2, 2] and len(stub.requests) == 20
        assert len(open(os.path.join(out, "verdicts.jsonl")).read().splitlines()) == 20
        assert all(r["shown"] in ("candidate first", "baseline first") and r["reply"].endswith(r["verdict"])
                   and r["outcome"] in (0.0, 1.0) for r in records)
        assert sum("verdict_other_order" in r for r in records) == 4
        assert "Position bias" in open(os.path.join(out, "winrate.md")).read()
        eval_command.evaluate(c)  # resumed from the verdict cache: nothing asked again, the same table
        assert len(stub.requests) == 20 and _read(out)[0] == rows
    finally:
        stub.close()
