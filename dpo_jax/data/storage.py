"""TFDS storage: raw examples and tokenized pairs written as array_record and read back with data sources.

No TensorFlow is needed at any point (TFDS writes array_record and serves `ArrayRecordDataSource`s without it).
Each dataset's TFDS config name is a fingerprint of its inputs — the raw files (paths, sizes, mtimes), the format
options, and for tokenized data the tokenizer files and lengths — so a changed input builds a new cache instead of
silently reusing a stale one, and an unchanged one is reused. Everything lives under the user's cache directory.

Bad examples are handled here, once: `on_bad_example="error"` raises at the first one (naming file and line),
`"skip"` drops it and counts it by reason; the counts are stored with the dataset and reported on every run.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dpo_jax.data.formats import (BAD_EXAMPLE_POLICIES, DataError, PreferenceExample, Skip, data_files,
                                  read_examples)
from dpo_jax.data.layout import scored_span
from dpo_jax.data.packing import pack_pair
from dpo_jax.data.tokenize import Lengths, PairTokenizer
from dpo_jax.fingerprint import fingerprint


def files_fingerprint(path: str) -> list:
    return [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in data_files(path)]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what determines token ids: the vocabulary/merges and special tokens (and the chat template)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map,
               "chat_template": getattr(tokenizer, "chat_template", None), "class": type(tokenizer).__name__}
    if hasattr(tokenizer, "backend_tokenizer"):
        payload["backend"] = tokenizer.backend_tokenizer.to_str()
    return fingerprint(payload)


def _apply_policy(items, policy: str, counts: collections.Counter) -> Iterator[Any]:
    if policy not in BAD_EXAMPLE_POLICIES:
        raise ValueError(f"data.on_bad_example = {policy!r}; valid: {', '.join(BAD_EXAMPLE_POLICIES)}")
    for item in items:
        if isinstance(item, Skip):
            if policy == "error":
                raise DataError(f"{item.where}: bad example ({item.reason}); set data.on_bad_example='skip' to "
                                "drop such examples")
            counts[item.reason] += 1
            continue
        yield item


def _texts(t):  # str or messages -> JSON text
    return json.dumps(t, ensure_ascii=False)


class RawPreferences(tfds.core.GeneratorBasedBuilder):
    """Normalised PreferenceExamples of any supported format (texts stored as JSON: strings or message lists)."""

    VERSION = tfds.core.Version("1.1.0")  # 1.1: the generic format keeps a `margin` field

    def __init__(self, *, splits: dict[str, str], format: str | None, on_bad_example: str,
                 shp_min_score_ratio: float = 2.0, **kwargs):
        self._splits = splits
        self._format, self._policy, self._ratio = format, on_bad_example, shp_min_score_ratio
        key = {"splits": {k: files_fingerprint(v) for k, v in splits.items()}, "format": format,
               "policy": on_bad_example, "shp_min_score_ratio": shp_min_score_ratio}
        super().__init__(config=tfds.core.BuilderConfig(name=fingerprint(key)), **kwargs)

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"prompt": text, "chosen": text, "rejected": text, "meta": text, "example_id": np.int64}),
            metadata=tfds.core.MetadataDict(), disable_shuffling=True)  # data-source index i = i-th example

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name, path) for name, path in self._splits.items()}

    def _generate_examples(self, split: str, path: str):
        counts: collections.Counter = collections.Counter()
        items = read_examples(path, self._format, shp_min_score_ratio=self._ratio)
        for ex in _apply_policy(items, self._policy, counts):
            yield ex.example_id, {"prompt": _texts(ex.prompt), "chosen": _texts(ex.chosen),
                                  "rejected": _texts(ex.rejected), "meta": json.dumps(ex.meta, default=str),
                                  "example_id": ex.example_id}
        self.info.metadata[f"skipped/{split}"] = dict(counts)


def decode_raw(record: dict) -> PreferenceExample:
    def text(v):
        t = json.loads(v.decode() if isinstance(v, bytes) else v)
        return tuple(t) if isinstance(t, list) else t

    meta = record["meta"]
    return PreferenceExample(text(record["prompt"]), text(record["chosen"]), text(record["rejected"]),
                             int(record["example_id"]), json.loads(meta.decode() if isinstance(meta, bytes) else meta))


class TokenizedPreferences(tfds.core.GeneratorBasedBuilder):
    """TokenizedPairs of a RawPreferences dataset for one tokenizer and one set of lengths."""

    VERSION = tfds.core.Version("1.4.0")  # 1.1: packed lengths; 1.2: scored spans; 1.3: keep_start cuts the prompt;
    # 1.4: margin

    def __init__(self, *, raw: RawPreferences, tokenizer, lengths: Lengths, on_bad_example: str, **kwargs):
        self._raw, self._policy = raw, on_bad_example
        self._tokenizer, self._lengths = tokenizer, lengths
        key = {"raw": raw.builder_config.name, "tokenizer": tokenizer_fingerprint(tokenizer),
               "lengths": vars(lengths), "policy": on_bad_example}
        super().__init__(config=tfds.core.BuilderConfig(name=fingerprint(key)), **kwargs)

    def _info(self):
        seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"chosen_input_ids": seq, "chosen_loss_mask": seq, "rejected_input_ids": seq,
             "rejected_loss_mask": seq, "example_id": np.int64, "margin": np.float32}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)  # index i of the data source is the i-th pair, so `lengths` is a plain list

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name) for name in self._raw.info.splits}

    def _generate_examples(self, split: str):
        counts: collections.Counter = collections.Counter()
        pair_tokenizer = PairTokenizer(self._tokenizer, self._lengths)
        source = self._raw.as_data_source(split=split)
        examples = (pair_tokenizer(decode_raw(source[i])) for i in range(len(source)))
        lengths, packed, spans, packed_spans = [], [], [], []
        for pair in _apply_policy(examples, self._policy, counts):
            lengths.append(max(len(pair.chosen_input_ids), len(pair.rejected_input_ids)))
            row = pack_pair(pair.chosen_input_ids, pair.chosen_loss_mask, pair.rejected_input_ids,
                            pair.rejected_loss_mask)
            packed.append(len(row["input_ids"]))
            spans.append(max(scored_span(pair.chosen_loss_mask), scored_span(pair.rejected_loss_mask)))
            packed_spans.append(scored_span(row["loss_mask"], row["predecessor"]))
            yield pair.example_id, pair._asdict()
        self.info.metadata[f"skipped/{split}"] = dict(counts)
        self.info.metadata[f"adjusted/{split}"] = dict(pair_tokenizer.counts)
        self.info.metadata[f"lengths/{split}"] = lengths
        self.info.metadata[f"packed_lengths/{split}"] = packed
        self.info.metadata[f"score_spans/{split}"] = spans
        self.info.metadata[f"packed_score_spans/{split}"] = packed_spans


class PreparedSplit:
    """A tokenized split ready for the loader: random access, per-index lengths, and the build report."""

    def __init__(self, builder: TokenizedPreferences, raw: RawPreferences, split: str):
        self.source = builder.as_data_source(split=split)
        self.lengths = np.asarray(builder.info.metadata[f"lengths/{split}"], np.int32)
        self.packed_lengths = np.asarray(builder.info.metadata[f"packed_lengths/{split}"], np.int32)
        self.score_spans = np.asarray(builder.info.metadata[f"score_spans/{split}"], np.int32)
        self.packed_score_spans = np.asarray(builder.info.metadata[f"packed_score_spans/{split}"], np.int32)
        self.report = {
            "examples": len(self.source),
            "skipped_reading": raw.info.metadata.get(f"skipped/{split}", {}),
            "skipped_tokenizing": builder.info.metadata.get(f"skipped/{split}", {}),
            "adjusted": builder.info.metadata.get(f"adjusted/{split}", {}),
        }

    def __len__(self) -> int:
        return len(self.source)


def prepare(
    splits: dict[str, str],
    tokenizer,
    lengths: Lengths,
    cache_dir: str,
    *,
    format: str | None = None,
    on_bad_example: str = "skip",
    shp_min_score_ratio: float = 2.0,
) -> dict[str, PreparedSplit]:
    """Raw files -> (cached) RawPreferences -> (cached) TokenizedPreferences -> one PreparedSplit per split."""
    os.makedirs(cache_dir, exist_ok=True)
    tfds.disable_progress_bar()
    kwargs = dict(data_dir=cache_dir, file_format="array_record")
    raw = RawPreferences(splits=splits, format=format, on_bad_example=on_bad_example,
                         shp_min_score_ratio=shp_min_score_ratio, **kwargs)
    raw.download_and_prepare()
    tokenized = TokenizedPreferences(raw=raw, tokenizer=tokenizer, lengths=lengths, on_bad_example=on_bad_example,
                                     **kwargs)
    tokenized.download_and_prepare()
    return {split: PreparedSplit(tokenized, raw, split) for split in splits}
