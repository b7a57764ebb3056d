"""Where a run's tokenizer comes from: a local HF tokenizer directory, a byte-level BPE trained on the train split
(`bpe:N`, cached), or the model's own directory."""

from __future__ import annotations

import os
from typing import Any, Mapping


def load_tokenizer(data: Mapping[str, Any], model_dir: str = ""):
    """data: a `data` config section (`tokenizer`; for `bpe:N` also `train_path`, `format`, `cache_dir`).
    data.tokenizer empty: the tokenizer in `model_dir` (an HF model directory)."""
    from transformers import AutoTokenizer

    spec = data.get("tokenizer", "") or model_dir
    if not spec:
        raise ValueError("config.data.tokenizer is empty and the model has no tokenizer directory")
    if not spec.startswith("bpe:"):
        return AutoTokenizer.from_pretrained(spec)
    from dpo_jax.data.bpe import train_bpe_tokenizer
    from dpo_jax.data.formats import read_examples
    from dpo_jax.data.pipeline import default_cache_dir
    from dpo_jax.data.storage import files_fingerprint
    from dpo_jax.fingerprint import fingerprint

    vocab = int(spec.split(":", 1)[1])
    train_path, data_format = data.get("train_path", ""), data.get("format", "auto")
    if not train_path:
        raise ValueError(f"config.data.tokenizer = {spec!r} trains a BPE on config.data.train_path, which is empty")
    directory = os.path.join(data.get("cache_dir", "") or default_cache_dir(), "tokenizers",
                             fingerprint([files_fingerprint(train_path), vocab]))
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        def texts():
            for ex in read_examples(train_path, None if data_format == "auto" else data_format):
                if hasattr(ex, "prompt"):
                    for t in (ex.prompt, ex.chosen, ex.rejected):
                        yield t if isinstance(t, str) else " ".join(m["content"] for m in t)
        train_bpe_tokenizer(texts(), vocab, directory)
    return AutoTokenizer.from_pretrained(directory)
