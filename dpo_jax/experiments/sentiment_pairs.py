"""The sentiment experiment's preference pairs (stage 4): every pair of a prefix's π_SFT samples ordered by their
VADER reward (ties dropped), kept in token space so nothing is re-tokenized, and the stage's cache file."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np


def ranked_pairs(prompts: np.ndarray, mask: np.ndarray, tokens: np.ndarray, gen_mask: np.ndarray,
                 rewards: np.ndarray, texts: list[str], decode: Callable[[list[int]], str]
                 ) -> tuple[list[dict[str, Any]], list[dict]]:
    """(pair rows, readable records) from [P, max_prefix] left-padded prompts and their K samples each
    (tokens, gen_mask [P, K, L]; rewards [P, K]; texts [P·K], prompt + completion)."""
    k = rewards.shape[1]
    source, records = [], []
    for i in range(len(prompts)):
        prefix = list(prompts[i][mask[i] == 1])
        for a in range(k):
            for b in range(a + 1, k):
                if rewards[i, a] == rewards[i, b]:
                    continue
                w, l_ = (a, b) if rewards[i, a] > rewards[i, b] else (b, a)
                row = {"example_id": len(source)}
                for side, j in (("chosen", w), ("rejected", l_)):
                    resp = list(tokens[i, j][gen_mask[i, j] == 1])
                    row[f"{side}_input_ids"] = np.asarray(prefix + resp, np.int32)
                    row[f"{side}_loss_mask"] = np.asarray([0] * len(prefix) + [1] * len(resp), np.int32)
                source.append(row)
                records.append({"prompt": decode(prefix), "chosen": texts[i * k + w], "rejected": texts[i * k + l_],
                                "reward_chosen": float(rewards[i, w]), "reward_rejected": float(rewards[i, l_])})
    return source, records


def save_pairs(path: str, source: Sequence[dict[str, Any]], records: list[dict], samples_scored: int) -> None:
    """The pairs stage's cache: every pair's token rows (concatenated per field, with lengths), the readable
    records, and how many VADER-labelled samples they came from."""
    arrays: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        for field in ("input_ids", "loss_mask"):
            rows = [r[f"{side}_{field}"] for r in source]
            arrays[f"{side}_{field}"] = np.concatenate(rows)
            arrays[f"{side}_lengths"] = np.asarray([len(x) for x in rows])
    arrays["records"] = np.asarray(json.dumps(records))
    arrays["samples_scored"] = np.asarray(samples_scored)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_pairs(path: str) -> tuple[list[dict[str, Any]], list[dict], int]:
    """(pair rows, records, samples scored) from `save_pairs`' file."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    source: list[dict[str, Any]] = [{"example_id": i} for i in range(len(data["chosen_lengths"]))]
    for side in ("chosen", "rejected"):
        offsets = np.concatenate([[0], np.cumsum(data[f"{side}_lengths"])])
        for field in ("input_ids", "loss_mask"):
            for i, row in enumerate(source):
                row[f"{side}_{field}"] = data[f"{side}_{field}"][offsets[i]:offsets[i + 1]]
    return source, json.loads(str(data["records"])), int(data["samples_scored"])
