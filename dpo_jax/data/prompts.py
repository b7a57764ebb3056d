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
    if format == "prompts" or (format == "auto" and "chosen" not in first[1]):
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
