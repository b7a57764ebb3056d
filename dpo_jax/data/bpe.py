"""Train a byte-level BPE tokenizer locally and save it as an HF tokenizer directory (no hub download)."""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "bos_token": "<|bos|>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, directory: str, *, add_bos: bool = False,
                        chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with <|endoftext|> (EOS), <|pad|> and <|bos|> specials, saved to `directory`
    so `transformers.AutoTokenizer.from_pretrained(directory)` loads it. `add_bos` makes encoding prepend BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        from tokenizers import processors

        bos = SPECIAL["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    if chat_template:
        fast.chat_template = chat_template
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return fast
