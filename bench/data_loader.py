"""Data pipeline throughput: tokenization into the TFDS cache, then loader batches/s (with/without prefetch).

    python bench/data_loader.py [--examples 3000] [--batch-pairs 64] [--max-length 512] [--grain]

--grain adds the same batches (same layout, buckets and padding) through grain's DataLoader + IndexSampler over
the same array_record source, in-process and with worker processes (`pip install grain`; not a dependency).

Text: English docstrings of the Python standard library (real prose and code, no download), cut into HH-format
dialogues with ~150-word prompts; tokenizer: an 8,192-token byte-level BPE trained on the same text.
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import pydoc
import re
import tempfile
import time

import numpy as np

from dpo_jax.data import storage
from dpo_jax.data.bpe import train_bpe_tokenizer
from dpo_jax.data.layout import PAIRS
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.tokenize import Lengths

MODULES = ["os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess", "threading",
           "asyncio", "argparse", "logging", "unittest", "typing", "dataclasses", "inspect", "email", "http.client",
           "urllib.request", "xml.etree.ElementTree", "sqlite3", "decimal", "statistics", "datetime", "csv"]


def corpus_words() -> list[str]:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    text = []
    for name in MODULES:
        module = pydoc.locate(name)
        for obj in [module] + [getattr(module, a, None) for a in dir(module)]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                text.append(doc)
    return re.findall(r"\S+", " ".join(text))


def write_hh(path: str, words: list[str], n: int, rng: np.random.Generator) -> None:
    def span(k):
        start = rng.integers(0, len(words) - k)
        return " ".join(words[start:start + k])

    with open(path, "w") as f:
        for _ in range(n):
            prompt = f"\n\nHuman: {span(int(rng.integers(60, 240)))}\n\nAssistant:"
            f.write(json.dumps({"chosen": prompt + " " + span(int(rng.integers(20, 200))),
                                "rejected": prompt + " " + span(int(rng.integers(20, 200)))}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--batch-pairs", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--step-ms", type=float, default=10.0,
                   help="simulated device step per batch (a sleep: it releases the GIL like a dispatched step)")
    p.add_argument("--grain", action="store_true", help="also time grain's DataLoader on the same batches")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    words = corpus_words()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        tok = train_bpe_tokenizer([" ".join(words[i:i + 200]) for i in range(0, len(words), 200)], 8192,
                                  os.path.join(d, "tok"))
        print(f"corpus {len(words):,} words; BPE 8192 trained in {time.perf_counter() - t:.1f} s")
        path = os.path.join(d, "train.jsonl")
        write_hh(path, words, args.examples, rng)
        t = time.perf_counter()
        split = storage.prepare({"train": path}, tok, Lengths(args.max_length, args.max_length // 2),
                                os.path.join(d, "cache"))["train"]
        prep = time.perf_counter() - t
        print(f"prepare (read + tokenize + write array_record): {args.examples} examples in {prep:.1f} s = "
              f"{args.examples / prep:,.0f} examples/s; mean length {split.lengths.mean():.0f} tokens, "
              f"max {split.lengths.max()}")
        buckets = (128, 256, args.max_length)
        loaders = {f"loader prefetch={prefetch}": lambda prefetch=prefetch: PreferenceLoader(
            split.source, global_batch_pairs=args.batch_pairs, seq_len=buckets, lengths=split.lengths,
            prefetch=prefetch) for prefetch in (0, 4)}
        if args.grain:
            reopen = ReopenedSource(split.source.dataset_info.data_dir, "train")
            loaders |= {f"grain DataLoader workers={w}": lambda w=w: grain_loader(reopen, args.batch_pairs,
                                                                                 buckets, w) for w in (0, 2)}
            loaders["grain MapDataset, 1 read thread"] = lambda: grain_map_dataset(split.source, args.batch_pairs,
                                                                               buckets)
        for name, make in loaders.items():
            loader = make()
            next(loader)  # start-up (thread or workers, first permutation)
            t = time.perf_counter()
            tokens = 0
            for _ in range(args.batches):
                tokens += int(next(loader)["attention_mask"].sum())
            dt = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
                time.sleep(args.step_ms / 1000)
            with_step = args.batches / (time.perf_counter() - t)
            getattr(loader, "close", lambda: None)()
            print(f"{name}: {args.batches / dt:,.1f} batches/s of {args.batch_pairs} pairs "
                  f"({2 * args.batch_pairs} rows, {tokens / dt:,.0f} real tokens/s); with a {args.step_ms:g} ms "
                  f"step per batch: {with_step:,.1f} steps/s (ideal {1000 / args.step_ms:,.1f})")


class ReopenedSource:
    """The prepared split's TFDS data source, reopened from its directory in each process (grain's worker
    processes pickle the source; the prepared builder itself cannot be rebuilt from its pickle)."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split, self._source = data_dir, split, None

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.builder_from_directory(self.data_dir).as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, i):
        return self._open()[i]

    def __getstate__(self):
        return {"data_dir": self.data_dir, "split": self.split, "_source": None}


def _collate(buckets: tuple[int, ...]):
    """The same padded [2b, T] batch as PreferenceLoader (pairs layout, smallest fitting bucket)."""
    def collate(examples):
        longest = max(max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in examples)
        out = PAIRS.host_rows(examples, next(b for b in buckets if b >= longest), 0)
        out["example_id"] = np.asarray([int(ex["example_id"]) for ex in examples], np.int32)
        return out
    return collate


def grain_loader(source, batch_pairs: int, buckets: tuple[int, ...], workers: int):
    """grain.DataLoader + IndexSampler (shuffled, endless) + Batch with our collation."""
    import grain.python as gp
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads its own absl flags (their defaults here)
    sampler = gp.IndexSampler(len(source), shuffle=True, num_epochs=None, seed=0)
    return iter(gp.DataLoader(data_source=source, sampler=sampler, worker_count=workers,
                              operations=[gp.Batch(batch_pairs, drop_remainder=True, batch_fn=_collate(buckets))]))


def grain_map_dataset(source, batch_pairs: int, buckets: tuple[int, ...]):
    """grain's dataset API: a shuffled MapDataset, batched, iterated with one read thread (its fastest here)."""
    import grain

    dataset = grain.MapDataset.source(source).shuffle(seed=0).repeat().batch(batch_pairs, batch_fn=_collate(buckets))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


if __name__ == "__main__":
    main()
