"""`dpo-jax judge-agreement`: a hand-made file with known agreement and a known human ceiling, the endpoint judge's
prompt variants side by side (an always-"A" stub shows its position bias), bad input named, and the command line."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax.commands import judge_agreement
from dpo_jax.data.formats import DataError
from dpo_jax.evaluation import agreement
from tests.test_judges import Stub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (chosen, rejected, annotations): the judge counts "good"s; per pair the judge's agreement with the majority,
# with one annotator, and the human-human agreement are known by hand
PAIRS = [("good", "bad", ["chosen"] * 3),  # judge 1: majority 1, annotator 1, humans 3/3 agree
         ("good", "bad", ["chosen", "chosen", "rejected"]),  # majority 1, annotator 2/3, humans 1 of 3 pairs
         ("bad", "good good", ["chosen"] * 3),  # judge 0: majority 0, annotator 0, humans 1
         ("good x", "good y", ["rejected", "rejected"]),  # judge tie: ½, ½, humans 1
         ("good", "bad", ["chosen", "rejected"]),  # even split: no majority; annotator ½, humans 0
         ("good", "bad", None)]  # no annotations: the label is one vote; no human pair
MAJORITY, ANNOTATOR, HUMAN = 3.5 / 5, (1 + 2 / 3 + 0 + 0.5 + 0.5 + 1) / 6, (1 + 1 / 3 + 1 + 1 + 0) / 5


def _write(path, pairs=PAIRS):
    with open(path, "w") as f:
        for i, (c, r, votes) in enumerate(pairs):
            row = {"prompt": f"post {i}", "chosen": c, "rejected": r}
            if votes is not None:
                row["annotations"] = votes
            f.write(json.dumps(row) + "\n")
    return str(path)


def good_count(texts):
    return [t.count("good") for t in texts]


def _config(tmp_path, data, **judge):
    c = judge_agreement.default_config()
    c.data_path, c.out_dir = data, str(tmp_path / "out")
    c.judge.kind, c.judge.function = "function", "tests.test_judge_agreement:good_count"
    c.judge.update(judge)
    return c


def test_known_agreement_and_human_ceiling(tmp_path):
    data = _write(tmp_path / "labels.jsonl")
    pairs = agreement.read_labelled_pairs(data)
    np.testing.assert_array_equal(agreement.majority(pairs.votes), [1, 1, 1, 0, np.nan, 1])
    (row,) = judge_agreement.main(_config(tmp_path, data))
    assert row["majority"] == pytest.approx(MAJORITY) and row["annotator"] == pytest.approx(ANNOTATOR)
    assert row["human_human"] == pytest.approx(HUMAN)
    assert row["majority_low"] <= MAJORITY <= row["majority_high"] and row["majority_high"] > row["majority_low"]
    md = (tmp_path / "out" / "agreement.md").read_text()
    assert "70.0 % [" in md and "of 5 |" in md and "66.7 % [" in md
    with open(tmp_path / "out" / "agreement.csv") as f:
        assert float(next(csv.DictReader(f))["human_human"]) == pytest.approx(HUMAN)
    records = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records] == [1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    assert all("candidate_score" in r and r["source"].endswith(f":{i + 1}") for i, r in enumerate(records))


def test_prompt_variants_side_by_side_show_an_always_a_judges_position_bias(tmp_path):
    data = _write(tmp_path / "labels.jsonl")
    stub = Stub(always_a=True)
    try:
        c = _config(tmp_path, data, kind="endpoint")
        c.judge.endpoint.update(base_url=stub.url, model="stub", backoff_s=0.01)
        c.templates = "summarization_simple,summarization_concise"
        rows = judge_agreement.main(c)
    finally:
        stub.close()
    assert [r["judge"].rsplit(" ", 1)[1] for r in rows] == ["(summarization_simple)", "(summarization_concise)"]
    for r in rows:  # every pair asked both ways (the command's default), an "A" every time
        assert (r["a_rate"], r["order_flips"], r["judged"]) == (1.0, 1.0, 6)
    assert len(stub.requests) == 2 * 2 * 6  # two templates, two orders: no verdict shared between the variants
    md = (tmp_path / "out" / "agreement.md").read_text()
    assert md.count("| 100.0 % | 100.0 % |") == 2


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "annotations": ["chosen", "maybe"]})
                   + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'annotations'"):
        agreement.read_labelled_pairs(str(bad))
    bad.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not a usable labelled pair \(identical_responses\)"):
        agreement.read_labelled_pairs(str(bad))
    with pytest.raises(ValueError, match="config.data_path is empty"):
        judge_agreement.main(_config(tmp_path, ""))
    with pytest.raises(ValueError, match="config.templates .* is for the endpoint judge"):
        c = _config(tmp_path, _write(tmp_path / "ok.jsonl"))
        c.templates = "summarization_simple"
        judge_agreement.main(c)


def test_the_command_line(tmp_path):
    data = _write(tmp_path / "labels.jsonl")
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "dpo_jax.main", "judge-agreement", f"--config.data_path={data}",
                             "--config.judge.kind=function",
                             "--config.judge.function=tests.test_judge_agreement:good_count",
                             f"--config.out_dir={out}"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "DPO_JAX_COMPILE_CACHE": "off"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| tests.test_judge_agreement:good_count | 70.0 % [" in result.stdout
    assert (out / "agreement.md").is_file()
