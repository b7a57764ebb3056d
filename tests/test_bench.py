"""The bench scripts' own logic: equal inputs for both systems, and the scaling measurement on a tiny model."""

import importlib.util
import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from dpo_jax.data.formats import PreferenceExample
from dpo_jax.data.packing import packed_length
from dpo_jax.data.tokenize import Lengths, PairTokenizer

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_pairs_tokenize_to_exactly_the_stated_lengths(tmp_path):
    bench = _bench_module("dpo_vs_trl")
    bench.write_tokenizer(str(tmp_path / "tok"), 300)
    bench.write_pairs(str(tmp_path / "pairs.jsonl"), 4, 300, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    pair_tokenizer = PairTokenizer(tokenizer, Lengths(128, 48, "keep_start"))
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(rows) == 4
    for i, row in enumerate(rows):
        pair = pair_tokenizer(PreferenceExample(row["prompt"], row["chosen"], row["rejected"], i))
        for side in ("chosen", "rejected"):
            ids, mask = np.asarray(getattr(pair, f"{side}_input_ids")), np.asarray(getattr(pair, f"{side}_loss_mask"))
            assert len(ids) == bench.PROMPT_TOKENS + bench.RESPONSE_TOKENS  # no token merged or lost
            assert mask.sum() == bench.RESPONSE_TOKENS and ids[-1] == tokenizer.eos_token_id
            words = (row["prompt"] + row[side]).split()
            assert ids[:-1].tolist() == [int(w[1:]) for w in words]  # token w{i} is id i
        assert packed_length(pair.chosen_input_ids, pair.chosen_loss_mask, pair.rejected_input_ids,
                             pair.rejected_loss_mask) == bench.PROMPT_TOKENS + 2 * bench.RESPONSE_TOKENS


def test_ragged_pairs_follow_the_documented_hh_shape():
    bench = _bench_module("dpo_vs_trl")
    rng = np.random.default_rng(0)
    lengths = np.asarray([bench.pair_lengths(rng, "ragged") for _ in range(2000)])
    r = bench.RAGGED
    assert lengths[:, 0].min() >= r["low"] and lengths[:, 0].max() <= r["high"]
    assert lengths[:, 1:].min() >= r["low"] - 1 and lengths[:, 1:].max() <= r["high"] - 1  # + EOS: within [4, 256]
    assert abs(np.median(lengths[:, 0]) - r["prompt_median"]) < 8 and abs(np.median(lengths[:, 1]) + 1 -
                                                                            r["response_median"]) < 6
    assert (lengths[:, 0] == r["high"]).mean() > 0.01  # the long tail reaches the 256 cap, as HH's prompts do
    assert bench.pair_lengths(rng, "fixed") == (bench.PROMPT_TOKENS, bench.RESPONSE_TOKENS - 1,
                                                bench.RESPONSE_TOKENS - 1)
    long = np.asarray([bench.pair_lengths(rng, "ragged_long") for _ in range(2000)])  # same medians, longer tail
    assert abs(np.median(long[:, 0]) - r["prompt_median"]) < 10 and long.max() <= bench.RAGGED_LONG["high"]
    assert np.percentile(long.sum(1), 99) > 1.3 * np.percentile(lengths.sum(1), 99)
    # nothing truncated: prompt + response + EOS within max_length, the prompt within max_prompt_length
    assert (long[:, 0] + long[:, 1:].max(1)).max() + 1 <= bench.LENGTH_LIMITS["ragged_long"][0]
    assert long[:, 0].max() <= bench.LENGTH_LIMITS["ragged_long"][1]


def test_the_bench_reports_every_config_key_that_differs_from_the_defaults():
    from dpo_jax.train.run import default_run_config

    bench = _bench_module("dpo_vs_trl")
    c = default_run_config()
    assert bench.config_changes(c, default_run_config()) == {}
    c.train.global_batch_tokens, c.data.seq_buckets, c.model.lora.rank = 2304, (576,), 8
    assert bench.config_changes(c, default_run_config()) == {
        "train.global_batch_tokens": 2304, "data.seq_buckets": [576], "model.lora.rank": 8}


def test_scaling_point_reports_consistent_flops_and_memory():
    scaling = _bench_module("dpo_scaling")
    point = scaling.measure_point("tiny", pairs=2, seq_len=32, steps=1)
    assert point["tokens_per_step"] == 2 * 2 * 32 and point["step_s"] > 0 and point["compile_s"] > 0
    # XLA's count (recomputation and optimizer in, some elementwise work out) and MaxText's agree in magnitude
    assert 0.5 < point["xla_tflops_per_step"] / point["model_tflops_per_step"] < 3
    assert point["memory_mib"] > point["temp_mib"] > 0
    assert point["achieved_gflops"] == pytest.approx(point["model_tflops_per_step"] * 1e3 / point["step_s"])


def test_step_variants_batch_matches_the_bench_job():
    """bench/step_variants.py times the DPO-vs-TRL job: 8 packed rows of 48 + 80 + 80 tokens, a 160-wide window."""
    from dpo_jax.data.layout import scored_span

    bench = _bench_module("step_variants")
    batch = bench.bench_batch()
    assert batch["input_ids"].shape == (8, 208) and int(batch["loss_mask"].sum()) == 8 * 160
    assert {scored_span(m, p) for m, p in zip(batch["loss_mask"], batch["predecessor"])} == {160}
    with pytest.raises(ValueError, match="unknown variant 'bf16'"):
        bench.engine_for("bf16", 160)
