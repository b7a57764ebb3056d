"""Prompt/response tokenization with the DPO authors' truncation, for any local HF tokenizer.

- The boundary: prompt + response is tokenized as one text (what the model sees), then split where the prompt's own
  tokens end. If the tokenizer merged characters across the boundary, the split moves back to the longest common
  prefix (the merged token counts as response) and `counts["boundary_merge"]` records it.
- BOS is prepended once when the tokenizer adds one to plain text; chat-template renderings bring their own.
  EOS is appended to each response exactly once (not if the response already ends with it).
- Truncation (authors' `tokenize_batch_element`): if prompt + the longer response exceeds `max_length`, the prompt
  is cut to `max_prompt_length` (`keep_end` keeps its BOS and last tokens, `keep_start` its first tokens); if still
  too long, responses are cut to `max_length - max_prompt_length`. `skip` is not the authors': a prompt that would
  have to be cut makes the example a bad one (`prompt_too_long`), for users who would rather drop than cut.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from dpo_jax.data.formats import PreferenceExample, Skip, Text

TRUNCATION_MODES = ("keep_end", "keep_start", "skip")


class TokenizedPair(NamedTuple):
    example_id: int
    chosen_input_ids: np.ndarray  # int32 [prompt + chosen response]
    chosen_loss_mask: np.ndarray  # int32, 1 on response tokens (EOS included)
    rejected_input_ids: np.ndarray
    rejected_loss_mask: np.ndarray
    margin: float = 0.0  # reward-model training: the pair's preference margin (data field `margin`)


@dataclasses.dataclass(frozen=True)
class Lengths:
    max_length: int
    max_prompt_length: int
    truncation_mode: str = "keep_end"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode {self.truncation_mode!r}; valid: {', '.join(TRUNCATION_MODES)}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length "
                             f"({self.max_length})")


class PairTokenizer:
    """Callable: PreferenceExample -> TokenizedPair, or Skip for a bad example. Counts what it adjusted."""

    def __init__(self, tokenizer, lengths: Lengths):
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token; DPO responses must end with EOS")
        bos = tokenizer.bos_token_id
        with_special = tokenizer("a")["input_ids"]
        self.bos_id = bos if bos is not None and with_special[:1] == [bos] else None
        self.counts: collections.Counter = collections.Counter()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, prompt: Text, response: Text) -> tuple[str, str, bool] | None:
        """(prompt text, response text, whether to add BOS); None if a chat template cannot split them."""
        if isinstance(prompt, str) and isinstance(response, str):
            return prompt, response, self.bos_id is not None
        if isinstance(prompt, str) or isinstance(response, str):
            raise ValueError("prompt and responses must both be text or both be messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("conversational data needs a tokenizer with a chat_template")
        p = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if not full.startswith(p):
            return None
        return p, full[len(p):], False

    def _split(self, prompt_text: str, response_text: str) -> tuple[list[int], list[int]]:
        prompt_ids = self._encode(prompt_text)
        full = self._encode(prompt_text + response_text)
        k = len(prompt_ids)
        if full[:k] != prompt_ids:
            self.counts["boundary_merge"] += 1
            k = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), k))
        return full[:k], full[k:]

    def tokenize(self, prompt: Text, responses: Sequence[Text], where: str) -> list[tuple[list[int], list[int]]] | Skip:
        """[(prompt ids, response ids)] per response, truncated together (they share the length budget)."""
        pairs = []
        for response in responses:
            rendered = self._render(prompt, response)
            if rendered is None:
                return Skip("chat_template_prefix_mismatch", where)
            p_text, r_text, add_bos = rendered
            p_ids, r_ids = self._split(p_text, r_text)
            if add_bos:
                p_ids = [self.bos_id] + p_ids
            if not r_ids or r_ids[-1] != self.eos_id:
                r_ids = r_ids + [self.eos_id]
            pairs.append((p_ids, r_ids))

        lim = self.lengths
        longest = max(len(r) for _, r in pairs)
        if max(len(p) for p, _ in pairs) + longest > lim.max_length:
            truncated = []
            for p, r in pairs:
                if len(p) > lim.max_prompt_length:
                    if lim.truncation_mode == "skip":
                        return Skip("prompt_too_long", where)
                    if lim.truncation_mode == "keep_start":
                        p = p[:lim.max_prompt_length]
                    else:
                        keep = 1 if self.bos_id is not None and p[:1] == [self.bos_id] else 0
                        p = p[:keep] + p[len(p) - (lim.max_prompt_length - keep):]
                    self.counts["prompt_truncated"] += 1
                truncated.append((p, r))
            pairs = truncated
        if max(len(p) for p, _ in pairs) + longest > lim.max_length:
            budget = lim.max_length - lim.max_prompt_length
            pairs = [(p, r[:budget]) for p, r in pairs]
            self.counts["response_truncated"] += 1
        return pairs

    def __call__(self, example: PreferenceExample) -> TokenizedPair | Skip:
        where = example.meta.get("source", f"example {example.example_id}")
        out = self.tokenize(example.prompt, [example.chosen, example.rejected], where)
        if isinstance(out, Skip):
            return out
        (pc, rc), (pr, rr) = out
        if pc + rc == pr + rr:
            return Skip("identical_after_tokenization", where)
        return TokenizedPair(example.example_id, *_row(pc, rc), *_row(pr, rr), float(example.meta.get("margin", 0.0)))


def _row(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt + response, np.int32)
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt):] = 1
    return ids, mask
