"""Tokenization, TFDS storage and the loader: exact ids and masks, truncation, bad-input policy, resume, hosts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax.data import storage
from dpo_jax.data.bpe import SPECIAL, train_bpe_tokenizer
from dpo_jax.data.formats import DataError, PreferenceExample, Skip
from dpo_jax.data.layout import scored_span
from dpo_jax.data.loader import LoaderState, PreferenceLoader
from dpo_jax.data.tokenize import Lengths, PairTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["Hello world, the world is wide.", "Human: question? Assistant: answer.", "naïve café 🚉 über"] * 50
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 400, str(tmp_path_factory.mktemp("tok")), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 400, str(tmp_path_factory.mktemp("tokbos")), add_bos=True)


def _ex(prompt, chosen, rejected, i=0):
    return PreferenceExample(prompt, chosen, rejected, i, {"source": f"f.jsonl:{i + 1}"})


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pair_ids_and_masks_are_exact(tokenizer):
    pt = PairTokenizer(tokenizer, Lengths(128, 64))
    pair = pt(_ex("Human: question? Assistant:", " answer.", " wide world."))
    eos = tokenizer.eos_token_id
    prompt = _enc(tokenizer, "Human: question? Assistant:")
    assert list(pair.chosen_input_ids) == _enc(tokenizer, "Human: question? Assistant: answer.") + [eos]
    assert list(pair.chosen_input_ids[:len(prompt)]) == prompt
    assert list(pair.chosen_loss_mask) == [0] * len(prompt) + [1] * (len(pair.chosen_input_ids) - len(prompt))
    assert list(pair.rejected_input_ids) == _enc(tokenizer, "Human: question? Assistant: wide world.") + [eos]
    assert pair.chosen_input_ids.dtype == np.int32 and pt.counts["boundary_merge"] == 0


def test_eos_once_bos_once_and_boundary_merges_counted(tokenizer, bos_tokenizer):
    pt = PairTokenizer(tokenizer, Lengths(128, 64))
    eos = tokenizer.eos_token_id
    pair = pt(_ex("Hello", " world" + SPECIAL["eos_token"], " wide"))
    assert list(pair.chosen_input_ids).count(eos) == 1 and pair.chosen_input_ids[-1] == eos
    merged = pt(_ex("Hello wor", "ld, the world", "ld is wide"))  # 'world' is one token across the boundary
    assert pt.counts["boundary_merge"] == 2
    assert list(merged.chosen_input_ids) == _enc(tokenizer, "Hello world, the world") + [eos]
    assert merged.chosen_loss_mask.sum() == len(merged.chosen_input_ids) - len(_enc(tokenizer, "Hello"))

    bos = bos_tokenizer.bos_token_id
    pb = PairTokenizer(bos_tokenizer, Lengths(128, 64))
    pair = pb(_ex("Hello", " world", " wide"))
    assert pair.chosen_input_ids[0] == bos and list(pair.chosen_input_ids).count(bos) == 1


def test_truncation_keep_end_keep_start_and_response_budget(bos_tokenizer):
    long_prompt = " ".join(["Hello world"] * 30)
    lengths = Lengths(max_length=24, max_prompt_length=10, truncation_mode="keep_end")
    pt = PairTokenizer(bos_tokenizer, lengths)
    pair = pt(_ex(long_prompt, " the world is wide. " * 5, " naïve"))
    prompt_len = int((pair.chosen_loss_mask == 0).sum())
    full_prompt = [bos_tokenizer.bos_token_id] + _enc(bos_tokenizer, long_prompt)
    assert prompt_len == 10 and pair.chosen_input_ids[0] == bos_tokenizer.bos_token_id
    assert list(pair.chosen_input_ids[1:10]) == full_prompt[-9:]  # BOS kept, then the prompt's end
    assert len(pair.chosen_input_ids) == 10 + (24 - 10)  # response cut to max_length - max_prompt_length
    assert pair.chosen_input_ids[-1] != bos_tokenizer.eos_token_id  # a cut response does not end
    assert pair.rejected_input_ids[-1] == bos_tokenizer.eos_token_id
    assert pt.counts["prompt_truncated"] == 2 and pt.counts["response_truncated"] == 1

    start = PairTokenizer(bos_tokenizer, Lengths(24, 10, "keep_start"))
    kept = start(_ex(long_prompt, " the world is wide. " * 5, " b"))  # the authors keep it: prompt cut, then responses
    assert list(kept.chosen_input_ids[:10]) == full_prompt[:10] and int((kept.chosen_loss_mask == 0).sum()) == 10
    assert len(kept.chosen_input_ids) == 10 + (24 - 10) and kept.rejected_input_ids[-1] == bos_tokenizer.eos_token_id
    assert list(kept.rejected_input_ids[:10]) == full_prompt[:10] and start.counts["prompt_truncated"] == 2
    skipped = PairTokenizer(bos_tokenizer, Lengths(24, 10, "skip"))(_ex(long_prompt, " a", " b"))
    assert isinstance(skipped, Skip) and skipped.reason == "prompt_too_long"  # only when asked for
    short = start(_ex("Hello world", " the world is wide. " * 5, " b"))
    prompt = [bos_tokenizer.bos_token_id] + _enc(bos_tokenizer, "Hello world")
    assert list(short.chosen_input_ids[:len(prompt)]) == prompt  # a prompt that fits is untouched
    assert len(short.chosen_input_ids) == len(prompt) + (24 - 10)  # authors: responses get max_length - max_prompt
    with pytest.raises(ValueError, match="max_prompt_length"):
        Lengths(10, 10)


def test_conversational_examples_use_the_chat_template(tokenizer):
    pt = PairTokenizer(tokenizer, Lengths(256, 128))
    user = ({"role": "user", "content": "hi"},)
    pair = pt(_ex(user, ({"role": "assistant", "content": "hello"},), ({"role": "assistant", "content": "go"},)))
    prompt_text = "<|user|>hi<|end|><|assistant|>"
    assert list(pair.chosen_input_ids) == _enc(tokenizer, prompt_text + "hello<|end|>") + [tokenizer.eos_token_id]
    assert int((pair.chosen_loss_mask == 0).sum()) == len(_enc(tokenizer, prompt_text))


def _write_hh(path, n, bad_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            p = f"\n\nHuman: question {i} é?\n\nAssistant:"
            f.write(json.dumps({"chosen": p + " answer " + "world " * (i % 7), "rejected": p + " no"}) + "\n")
        for line in bad_lines:
            f.write(line + "\n")
    return str(path)


def test_storage_round_trip_cache_and_bad_example_policy(tokenizer, tmp_path):
    identical = json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"})
    train = _write_hh(tmp_path / "train.jsonl", 20, [identical])
    test = _write_hh(tmp_path / "test.jsonl", 5)
    cache = str(tmp_path / "cache")
    prepared = storage.prepare({"train": train, "test": test}, tokenizer, Lengths(64, 32), cache)
    split = prepared["train"]
    assert len(split) == 20 and split.report["skipped_reading"] == {"identical_responses": 1}
    direct = PairTokenizer(tokenizer, Lengths(64, 32))
    first = direct(_ex("\n\nHuman: question 0 é?\n\nAssistant:", " answer ", " no"))
    np.testing.assert_array_equal(split.source[0]["chosen_input_ids"], first.chosen_input_ids)
    np.testing.assert_array_equal(split.source[0]["rejected_loss_mask"], first.rejected_loss_mask)
    assert [int(split.source[i]["example_id"]) for i in range(20)] == list(range(20))
    assert list(split.lengths) == [max(len(split.source[i]["chosen_input_ids"]),
                                       len(split.source[i]["rejected_input_ids"])) for i in range(20)]
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if "array_record" in f)
    mtimes = [os.path.getmtime(f) for f in files]
    again = storage.prepare({"train": train, "test": test}, tokenizer, Lengths(64, 32), cache)
    assert again["train"].report == split.report and len(again["test"]) == 5
    assert [os.path.getmtime(f) for f in files] == mtimes  # reused, not rebuilt
    other = storage.prepare({"train": train}, tokenizer, Lengths(48, 32), cache)  # new lengths -> new cache
    assert len(other["train"]) == 20 and len(os.listdir(os.path.join(cache, "tokenized_preferences"))) == 2

    with pytest.raises(DataError, match=r"train\.jsonl:21: bad example \(identical_responses\)"):
        storage.prepare({"train": train}, tokenizer, Lengths(64, 32), str(tmp_path / "c2"), on_bad_example="error")
    with pytest.raises(ValueError, match="on_bad_example = 'drop'"):
        storage.prepare({"train": train}, tokenizer, Lengths(64, 32), str(tmp_path / "c3"), on_bad_example="drop")


def test_a_pair_margin_reaches_the_loader_batch(tokenizer, tmp_path):
    """The generic format's optional `margin` (reward-model training) survives reading, tokenizing and batching."""
    rows = [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3", "margin": 1.5},
            {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = storage.prepare({"train": str(path)}, tokenizer, Lengths(32, 16), str(tmp_path / "cache"))["train"]
    batch = next(iter(PreferenceLoader(split.source, global_batch_pairs=4, seq_len=32, shuffle=False, prefetch=0)))
    np.testing.assert_array_equal(batch["margin"], [1.5, 0.0, 0.0, 0.0])
    assert batch["example_mask"].tolist() == [1, 1, 0, 0]


def test_storage_needs_no_tensorflow(tokenizer, tmp_path):
    """Prepare and read back in a fresh interpreter: TensorFlow is never imported (and is not installed here)."""
    train = _write_hh(tmp_path / "t.jsonl", 4)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    code = f"""
import importlib.util, sys
from transformers import AutoTokenizer
from dpo_jax.data import storage
from dpo_jax.data.tokenize import Lengths
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})
split = storage.prepare({{'train': {train!r}}}, tok, Lengths(64, 32), {str(tmp_path / 'cache')!r})['train']
assert len(split) == 4 and len(split.source[3]['chosen_input_ids']) > 0
assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
print('OK', importlib.util.find_spec('tensorflow') is None)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ----- loader -----------------------------------------------------------------------------------------------------

def _source(n=10, max_len=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        lc, lr, p = rng.integers(4, max_len + 1), rng.integers(4, max_len + 1), 2
        rows.append({"example_id": 100 + i,
                     "chosen_input_ids": rng.integers(1, 50, lc).astype(np.int32),
                     "chosen_loss_mask": (np.arange(lc) >= p).astype(np.int32),
                     "rejected_input_ids": rng.integers(1, 50, lr).astype(np.int32),
                     "rejected_loss_mask": (np.arange(lr) >= p).astype(np.int32)})
    lengths = np.array([max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows])
    return rows, lengths


def test_batches_are_fixed_shape_chosen_first_and_padded_at_epoch_end():
    rows, lengths = _source(10)
    loader = PreferenceLoader(rows, global_batch_pairs=4, seq_len=12, seed=1, num_epochs=1, prefetch=0)
    batches = list(loader)
    assert len(batches) == 3 and all(b["input_ids"].shape == (8, 12) for b in batches)
    seen = [int(i) for b in batches for i, m in zip(b["example_id"], b["example_mask"]) if m]
    assert sorted(seen) == list(range(100, 110))  # every example exactly once
    last = batches[-1]
    assert list(last["example_mask"]) == [1, 1, 0, 0] and list(last["example_id"][2:]) == [-1, -1]
    assert last["loss_mask"][[2, 3, 6, 7]].sum() == 0 and last["attention_mask"][[2, 3, 6, 7]].sum() == 0
    b = batches[0]
    for row, ex_id in enumerate(b["example_id"]):
        src = rows[ex_id - 100]
        n = len(src["chosen_input_ids"])
        np.testing.assert_array_equal(b["input_ids"][row, :n], src["chosen_input_ids"])
        np.testing.assert_array_equal(b["loss_mask"][row, :n], src["chosen_loss_mask"])
        m = len(src["rejected_input_ids"])
        np.testing.assert_array_equal(b["input_ids"][row + 4, :m], src["rejected_input_ids"])
        assert b["attention_mask"][row + 4].sum() == m and b["loss_mask"][row + 4, m:].sum() == 0


def test_shuffle_is_deterministic_per_seed_and_epoch_and_buckets_fit():
    rows, lengths = _source(16, max_len=30)
    make = lambda seed: PreferenceLoader(rows, global_batch_pairs=4, seq_len=(8, 16, 32), lengths=lengths,  # noqa
                                         seed=seed, num_epochs=2, prefetch=0)
    a, b, c = list(make(0)), list(make(0)), list(make(1))
    ids = lambda bs: [tuple(x["example_id"]) for x in bs]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert ids(a[:4]) != ids(a[4:])  # epochs are reshuffled
    for batch in a:
        longest = max(lengths[i - 100] for i in batch["example_id"])
        t = batch["input_ids"].shape[1]
        assert t >= longest and (t == 8 or longest > t // 2)  # the smallest bucket that fits


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_yields_exactly_the_uninterrupted_batches(prefetch):
    rows, lengths = _source(11, max_len=20)
    kwargs = dict(global_batch_pairs=4, seq_len=(10, 20), lengths=lengths, seed=3, num_epochs=3, prefetch=prefetch)
    full = list(PreferenceLoader(rows, **kwargs))
    first = PreferenceLoader(rows, **kwargs)
    head = [next(first) for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
    saved = LoaderState(*(np.asarray(x).copy() for x in first.state))
    first.close()
    assert (int(saved.epoch), int(saved.step)) == (1, 1)
    rest = list(PreferenceLoader(rows, state=saved, **kwargs))
    assert len(head) + len(rest) == len(full) == 9
    for got, want in zip(head + rest, full):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_close_stops_a_producer_that_finished_into_a_full_queue():
    rows, lengths = _source(8, max_len=10)
    loader = PreferenceLoader(rows, global_batch_pairs=2, seq_len=(10,), lengths=lengths, num_epochs=1, prefetch=1)
    next(loader)
    thread = loader._thread
    while thread.is_alive() and not loader._queue.full():  # the producer is now blocked on a full queue
        thread.join(0.01)
    loader.close()
    assert not thread.is_alive()


def test_two_hosts_read_disjoint_shards_that_cover_the_data():
    rows, _ = _source(14)

    class Counting(list):
        def __init__(self, rows):
            super().__init__(rows)
            self.read = set()

        def __getitem__(self, i):
            self.read.add(i)
            return super().__getitem__(i)

    hosts = [Counting(rows) for _ in range(2)]
    per_host = [list(PreferenceLoader(h, global_batch_pairs=4, seq_len=12, seed=5, process_index=k,
                                      process_count=2, num_epochs=1, prefetch=0)) for k, h in enumerate(hosts)]
    assert hosts[0].read.isdisjoint(hosts[1].read) and hosts[0].read | hosts[1].read == set(range(14))
    for b0, b1 in zip(*per_host):
        assert b0["input_ids"].shape == b1["input_ids"].shape == (4, 12)
    ids = [int(i) for hb in per_host for b in hb for i, m in zip(b["example_id"], b["example_mask"]) if m]
    assert sorted(ids) == list(range(100, 114))


def test_loader_configuration_errors_and_worker_errors():
    rows, lengths = _source(8)
    with pytest.raises(ValueError, match="global batch of 6 pairs is not divisible by the data-parallel size"):
        PreferenceLoader(rows, global_batch_pairs=6, seq_len=12, data_parallel_size=4)
    with pytest.raises(ValueError, match="more than the largest seq_len 8"):
        PreferenceLoader(rows, global_batch_pairs=4, seq_len=(4, 8), lengths=lengths)
    with pytest.raises(ValueError, match="buckets need `lengths`"):
        PreferenceLoader(rows, global_batch_pairs=4, seq_len=(4, 12))

    class Broken(list):
        def __getitem__(self, i):
            raise OSError("disk gone")

    loader = PreferenceLoader(Broken(rows), global_batch_pairs=4, seq_len=12, prefetch=2)
    with pytest.raises(OSError, match="disk gone"):
        next(loader)


def test_build_loaders_from_the_data_config(tokenizer, tmp_path, capsys):
    from dpo_jax.data.pipeline import build_loaders, default_data_config, resolve_format, resolve_lengths

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    c = default_data_config()
    c.train_path = _write_hh(tmp_path / "train.jsonl", 9, ['{"chosen": "no turn", "rejected": "x"}'])
    c.eval_path = _write_hh(tmp_path / "eval.jsonl", 3)
    c.tokenizer, c.cache_dir = str(tmp_path / "tok"), str(tmp_path / "cache")
    c.max_length, c.max_prompt_length, c.seq_buckets = 64, 32, (32, 64)
    assert resolve_format(c) == "hh" and resolve_lengths(c, "hh").truncation_mode == "keep_end"
    with pytest.raises(ValueError, match=r"config.data.layout = 'packed' packs pairs into rows of one length, but "
                                         r"config.data.seq_buckets = \(32, 64\) gives several"):
        build_loaders(c, global_batch_pairs=4, seed=0, data_parallel_size=2)  # the default layout
    c.layout = "shared_prompt"
    loaders = build_loaders(c, global_batch_pairs=4, seed=0, data_parallel_size=2)
    out = capsys.readouterr().out
    assert "data train: 9 examples; skipped 1 (no_assistant_turn 1)" in out and "data eval: 3 examples" in out
    evals = list(loaders["eval"])
    assert len(evals) == 1 and list(evals[0]["example_mask"]) == [1, 1, 1, 0]
    # The score window is the split's longest scored span (stored with the tokenized data), rounded up to 16.
    spans = [scored_span(m, p) for m, p in zip(evals[0]["loss_mask"], evals[0]["predecessor"])]
    assert loaders["eval"].score_window == -(-max(spans) // 16) * 16 > 0
    assert next(loaders["train"])["input_ids"].shape[0] == 4  # one packed row per pair
    loaders["train"].close()
    c.layout = "pairs"
    loaders = build_loaders(c, global_batch_pairs=4, seed=0, data_parallel_size=2)
    assert next(loaders["train"])["input_ids"].shape[0] == 8  # chosen rows, then rejected rows
    spans = [scored_span(m) for m in next(iter(loaders["eval"]))["loss_mask"]]
    assert loaders["eval"].score_window == -(-max(spans) // 16) * 16 > 0
    loaders["train"].close()
    c.layout, c.seq_buckets = "packed", ()
    loaders = build_loaders(c, global_batch_pairs=4, seed=0, data_parallel_size=2)
    most = max(loader.pairs_per_row for loader in loaders.values())
    assert 1 <= most < 8 and all(loader.layout.max_pairs_per_row == most for loader in loaders.values())
    loaders["train"].close()  # K shrinks to what a planned row holds: the same batches, smaller per-pair arrays
    c.pack_lookahead = 0
    with pytest.raises(ValueError, match=r"config.data.pack_lookahead = 0: must be >= 1"):
        build_loaders(c, global_batch_pairs=4, seed=0)
    c.pack_lookahead, c.format = 16, "shp"
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing field 'history'"):
        build_loaders(c, global_batch_pairs=4, seed=0)
    c.format, c.truncation_mode = "generic", "middle"
    with pytest.raises(ValueError, match="truncation_mode = 'middle'"):
        build_loaders(c, global_batch_pairs=4, seed=0)


def test_the_packed_default_derives_a_token_budget_that_divides_and_resumes(tokenizer, tmp_path):
    """No token budget set: the packed layout derives one from the train split's lengths — a row count the mesh and
    the micro-batches divide, whose mean pairs per step is the nearest to the request — and a loader rebuilt at a
    mid-epoch position gives the batches the first would have; exact_pairs keeps exactly the pairs."""
    from dpo_jax.data.pipeline import build_loaders, default_data_config

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    c = default_data_config()
    c.train_path = _write_hh(tmp_path / "train.jsonl", 96)  # responses of 1 to 7 words: ragged packed pairs
    c.tokenizer, c.cache_dir, c.max_length, c.max_prompt_length = str(tmp_path / "tok"), str(tmp_path / "c"), 64, 32
    c.seq_buckets = (80,)  # rows that hold several pairs
    kw = dict(global_batch_pairs=12, seed=0, data_parallel_size=2, micro_batches=2)
    train = build_loaders(c, **kw)["train"]
    rows, seq_len = train.planned_rows, train.buckets[0]
    assert (train.budget, train.global_batch, train.global_batch_tokens) == ("derived", 12, rows * seq_len)
    assert rows % 4 == 0 and 4 <= rows < 12  # dp x micro-batches; several pairs share a row
    gap = abs(train.mean_pairs(0) - 12)
    for other in (rows - 4, rows + 4):  # the neighbouring budgets the mesh allows carry pairs further from 12
        if other > 0:
            near = build_loaders(c, **kw, global_batch_tokens=other * seq_len)["train"]
            assert near.budget == "explicit" and abs(near.mean_pairs(0) - 12) >= gap
            near.close()
    first = [next(train) for _ in range(5)]
    assert len({int(b["example_mask"].sum()) for b in first}) > 1  # the pairs per step vary
    again = build_loaders(c, **kw, train_state=LoaderState(np.asarray(0, np.int64), np.asarray(3, np.int64)))
    for want in first[3:]:
        got = next(again["train"])
        assert all(np.array_equal(got[k], want[k]) for k in want)
    exact = build_loaders(c, **kw, exact_pairs=True)["train"]
    assert exact.budget == "" and exact.planned_rows % 4 == 0
    # The step's window covers the reference pass, which reads the split in file order: with a score group per batch
    # shard (no micro-batches) that pass's fullest group held 96 scored tokens where the shuffled plan's held 88, and
    # a step built for 88 dropped scored tokens from the reference log-probs (first DPO loss 0.61, not ln 2).
    grouped = build_loaders(c, global_batch_pairs=12, seed=0, data_parallel_size=2, exact_pairs=True)["train"]
    assert grouped.score_groups == 2
    for loader in (train, exact, grouped):
        assert loader.score_window >= loader.one_pass(prefetch=0).score_window > 0
    assert [int(next(exact)["example_mask"].sum()) for _ in range(7)] == [12] * 7  # 96 pairs: 8 batches of 12
    for loader in (train, again["train"], exact, grouped):
        loader.close()
    with pytest.raises(ValueError, match=r"config.train.exact_pairs = True asks for 12 pairs a step, but "
                                         r"config.train.global_batch_tokens = 256 asks for a token budget"):
        build_loaders(c, **kw, exact_pairs=True, global_batch_tokens=256)
