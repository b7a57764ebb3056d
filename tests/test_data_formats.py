"""Format readers on fixture files the tests write: exact prompts/responses, detection, and bad input."""

import gzip
import json

import pytest

from dpo_jax.data.formats import DataError, PreferenceExample, Skip, detect_format, read_examples


def _jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def _read(path, fmt=None):
    return list(read_examples(str(path), fmt))


HH_PROMPT = "\n\nHuman: Où est la gare? 🚉\n\nAssistant: Tout droit.\n\nHuman: Et après?\n\nAssistant:"


def test_hh_multi_turn_prompt_is_up_to_the_last_assistant(tmp_path):
    rows = [
        {"chosen": HH_PROMPT + " À gauche, merci!", "rejected": HH_PROMPT + " Je ne sais pas."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},  # same
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: x"},  # empty chosen
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out = _read(path)
    ex = out[0]
    assert isinstance(ex, PreferenceExample) and ex.example_id == 0
    assert ex.prompt == HH_PROMPT and ex.chosen == " À gauche, merci!" and ex.rejected == " Je ne sais pas."
    assert ex.sft_view() == (HH_PROMPT, " À gauche, merci!")
    assert [o.reason for o in out[1:]] == ["identical_responses", "prompt_mismatch", "empty_response"]
    assert out[2].where.endswith("hh.jsonl.gz:3")


def test_shp_ratio_filter_label_order_and_leading_space(tmp_path):
    base = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh.", "human_ref_B": "Magic."}
    rows = [dict(base, labels=1, score_A=10, score_B=2), dict(base, labels=0, score_A=2, score_B=10),
            dict(base, labels=1, score_A=3, score_B=2)]
    out = _read(_jsonl(tmp_path / "shp.jsonl", rows))
    assert out[0].prompt == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert (out[0].chosen, out[0].rejected) == (" Rayleigh.", " Magic.")
    assert (out[1].chosen, out[1].rejected) == (" Magic.", " Rayleigh.")
    assert isinstance(out[2], Skip) and out[2].reason == "score_ratio_below_threshold"
    assert out[1].example_id == 1
    loose = list(read_examples(str(tmp_path / "shp.jsonl"), "shp", shp_min_score_ratio=1.2))
    assert isinstance(loose[2], PreferenceExample)


def test_tldr_comparisons_prompt_and_choice(tmp_path):
    info = {"id": "t3", "subreddit": "relationships", "title": "Advice?", "post": "Long story…"}
    rows = [{"info": info, "summaries": [{"text": " I need advice."}, {"text": " Story."}], "choice": 1},
            {"info": {"id": "cnn", "article": "News", "title": "t", "subreddit": None},
             "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}]
    out = _read(_jsonl(tmp_path / "comparisons.jsonl", rows))
    assert out[0].prompt == "SUBREDDIT: r/relationships\nTITLE: Advice?\nPOST: Long story…\nTL;DR:"
    assert (out[0].chosen, out[0].rejected) == (" Story.", " I need advice.")
    assert isinstance(out[1], Skip) and out[1].reason == "not_reddit_post"


def _conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_ultrafeedback_and_conversational_generic(tmp_path):
    user = ("user", "Write a haiku")
    rows = [{"prompt": "Write a haiku", "chosen": _conv(user, ("assistant", "Old pond...")),
             "rejected": _conv(user, ("assistant", "No.")), "score_chosen": 9.0, "score_rejected": 2.0}]
    out = _read(_jsonl(tmp_path / "uf.jsonl", rows))
    assert detect_format(rows[0], "x") == "ultrafeedback"
    ex = out[0]
    assert ex.prompt == ({"role": "user", "content": "Write a haiku"},)
    assert ex.chosen == ({"role": "assistant", "content": "Old pond..."},) and ex.meta["score_chosen"] == 9.0
    mismatch = [{"prompt": "p", "chosen": _conv(("user", "a"), ("assistant", "x")),
                 "rejected": _conv(("user", "b"), ("assistant", "y"))}]
    assert _read(_jsonl(tmp_path / "uf2.jsonl", mismatch))[0].reason == "prompt_mismatch"

    trl_style = [{"prompt": _conv(("user", "2+2?")), "chosen": _conv(("assistant", "4")),
                  "rejected": _conv(("assistant", "5"))}]
    ex = _read(_jsonl(tmp_path / "conv.jsonl", trl_style))[0]
    assert detect_format(trl_style[0], "x") == "generic"
    assert ex.prompt == ({"role": "user", "content": "2+2?"},) and ex.rejected == ({"role": "assistant",
                                                                                     "content": "5"},)


def test_generic_strings_and_implicit_prompts(tmp_path):
    rows = [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
            {"chosen": "The answer is 42.", "rejected": "The answer is 41."},
            {"chosen": _conv(("user", "hi"), ("assistant", "hello")),
             "rejected": _conv(("user", "hi"), ("assistant", "go away"))},
            {"chosen": "abc", "rejected": "xyz"}]
    out = _read(_jsonl(tmp_path / "g.jsonl", rows), "generic")
    assert (out[0].prompt, out[0].chosen, out[0].rejected) == ("Q: 1+1?", " 2", " 3")
    assert (out[1].prompt, out[1].chosen, out[1].rejected) == ("The answer is 4", "2.", "1.")
    assert out[2].prompt == ({"role": "user", "content": "hi"},)
    assert out[2].chosen == ({"role": "assistant", "content": "hello"},)
    assert isinstance(out[3], Skip) and out[3].reason == "no_common_prompt"


def test_parquet_files_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 3),
                   tmp_path / "d" / "part-0.parquet")
    _jsonl(tmp_path / "d" / "part-1.jsonl", [{"prompt": "q", "chosen": " c", "rejected": " d"}])
    out = _read(tmp_path / "d")
    assert [e.example_id for e in out] == [0, 1, 2, 3] and out[3].prompt == "q"
    assert out[0].meta["source"].endswith("part-0.parquet:row 1")


@pytest.mark.parametrize("line, message", [
    ('{"chosen": "a", "rejected": ', r"bad\.jsonl:2: invalid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "p", "chosen": 3, "rejected": "x"}', r"bad\.jsonl:2: field 'chosen' must be str, got int"),
    ('{"prompt": "p", "chosen": "c"}', r"bad\.jsonl:2: missing field 'rejected'"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "high"}',
     r"bad\.jsonl:2: field 'margin' must be a finite number, got 'high'"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": NaN}',
     r"bad\.jsonl:2: field 'margin' must be a finite number, got nan"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}], [line])
    with pytest.raises(DataError, match=message):
        _read(path)


def test_unknown_format_and_undetectable_rows(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot tell the data format from fields \['text'\]"):
        _read(path)
    with pytest.raises(DataError, match="unknown data format 'hhh'"):
        _read(path, "hhh")
    with pytest.raises(DataError, match="no such file"):
        _read(tmp_path / "missing.jsonl")
