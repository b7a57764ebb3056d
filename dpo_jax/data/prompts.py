"""Prompts-only data for sampling (Best-of-N, PPO rollouts): JSON lines with a `prompt` field, or the prompts of
any preference format (formats.py). Conversational prompts are rendered with the tokenizer's chat template and a
generation prompt. Prompts are left-truncated (the end is kept) and left-padded, as `generate` wants them."""

from __future__ import annotations

from typing import Any

import numpy as np

from dpo_jax.data.formats import DataError, PreferenceExample, iter_rows, read_examples


def read_prompts(path: str, format: str = "auto", limit: int = 0) -> list[Any]:
    """Prompt texts (str, or message tuples) from `path`: format "prompts" (every row has a string or message-list
    `prompt`), a preference format name, or "auto" (rows with `prompt` but no `chosen` are prompts-only)."""
    rows = iter_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: no rows")
    if format == "prompts" or (format == "auto" and "prompt" in first[1] and "chosen" not in first[1]):
        out = []
        for where, row in [first, *rows]:
            prompt = row.get("prompt")
            if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                raise DataError(f"{where}: field 'prompt' must be a non-empty string or message list")
            out.append(prompt if isinstance(prompt, str) else tuple(prompt))
            if limit and len(out) == limit:
                break
        return out
    out = []
    for ex in read_examples(path, None if format == "auto" else format):
        if isinstance(ex, PreferenceExample):
            out.append(ex.prompt)
            if limit and len(out) == limit:
                break
    return out


def encode_prompts(prompts: list[Any], tokenizer, max_prompt_length: int, pad_id: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (ids, mask) [P, longest prompt], each prompt keeping its last `max_prompt_length` tokens."""
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
                ids = [tokenizer.bos_token_id] + ids
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("conversational prompts need a tokenizer with a chat_template")
            ids = tokenizer.apply_chat_template(list(p), tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        encoded.append(list(ids)[-max_prompt_length:])
    width = max(len(e) for e in encoded)
    out = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros_like(out)
    for i, e in enumerate(encoded):
        out[i, width - len(e):], mask[i, width - len(e):] = e, 1
    return out, mask


class PromptLoader:
    """Deterministic, resumable batches of prompts: batch k of epoch e is the k-th slice of `default_rng([seed,
    e])`'s permutation (the last batch of an epoch wraps around to stay full); `state` (a LoaderState) is saved in
    checkpoints. Host h of P takes the h-th part of every global batch."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, global_batch: int, seed: int = 0, state=None,
                 process_index: int = 0, process_count: int = 1):
        from dpo_jax.data.loader import LoaderState

        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"a global batch of {global_batch} prompts must be >= 1 and divide over "
                             f"{process_count} processes")
        self.ids, self.mask, self.global_batch, self.seed = ids, mask, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.batches_per_epoch = -(-len(ids) // global_batch)
        self.state = state or LoaderState.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from dpo_jax.data.loader import LoaderState

        epoch, step = int(self.state.epoch), int(self.state.step)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        index = perm[(step * self.global_batch + np.arange(self.global_batch)) % len(perm)]
        index = index[self.offset:self.offset + self.local]
        step += 1
        if step == self.batches_per_epoch:
            epoch, step = epoch + 1, 0
        self.state = LoaderState(np.asarray(epoch, np.int64), np.asarray(step, np.int64))
        return {"prompt_ids": self.ids[index], "prompt_mask": self.mask[index], "example_id": index.astype(np.int32)}
