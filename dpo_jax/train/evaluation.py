"""Evaluation during and after training: the step's metrics over a whole split, and sampled completions."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dpo_jax import summaries
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.generate import SamplingConfig, generate
from dpo_jax.train.engine import Engine


def evaluate_split(engine: Engine, params: Any, loader: PreferenceLoader, reference, split: str = "eval"
                   ) -> dict[str, float]:
    """The eval step's metrics summed over one unshuffled pass of `loader` (padding examples never count)."""
    total = None
    for local in loader.one_pass():
        m = engine.eval_step(params, engine.shard_batch(reference.attach(local, split)))
        total = m if total is None else summaries.merge(total, m)
    return summaries.finalize(total)


def sample_prompts(eval_loader: PreferenceLoader | None, k: int, pad_id: int, indices: Any = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of eval examples `indices` (default: the first k), left-padded: (ids, mask) [k, longest prompt]."""
    if eval_loader is None:
        raise ValueError("config.train.eval_samples > 0 needs an eval split (config.data.eval_path)")
    if indices is None:
        indices = range(min(k, len(eval_loader.source)))
    rows = [eval_loader.source[int(i)] for i in indices]
    prompts = [np.asarray(r["chosen_input_ids"])[np.asarray(r["chosen_loss_mask"]) == 0] for r in rows]
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def seeded_sample(n: int, k: int, seed: int) -> np.ndarray:
    """k of n example indices drawn with `seed` (all n when k >= n), in file order."""
    return np.arange(n) if k >= n else np.sort(np.random.default_rng([seed, 2]).choice(n, k, replace=False))


def sample_completions(params: Any, model: ModelConfig, prompts: tuple[np.ndarray, np.ndarray], tokenizer,
                       sampling: SamplingConfig, seed: int) -> list[dict[str, str]]:
    """[{'prompt', 'completion'}] decoded, one per prompt."""
    ids, mask = prompts
    out = generate(params, model, ids, mask, jax.random.key(seed), sampling)
    tokens, gen_mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [{"prompt": tokenizer.decode(ids[i][mask[i] == 1]),
             "completion": tokenizer.decode(tokens[i][gen_mask[i] == 1], skip_special_tokens=True)}
            for i in range(len(ids))]
