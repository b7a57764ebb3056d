"""The sampling half of a win-rate evaluation: completions for the same prompts at every temperature of a sweep.

All temperatures of a sweep go through one compiled `generate` (temperatures are traced, per row) in fixed-size
chunks. Prompt i uses the key fold_in(rng, i) at every temperature (common random numbers: the curves differ by
temperature, not by luck), so a prompt's completion does not depend on its chunk or on the other prompts;
temperature 0 is greedy.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.evaluation.judges import Judge
from dpo_jax.evaluation.winrate import length_fields, win_rate
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.generate import SamplingConfig, ended_with_eos, generate_chunks


def check_temperatures(temperatures: Sequence[float], key: str = "temperatures") -> tuple[float, ...]:
    """The sweep as floats; a negative or non-finite temperature is an error naming `key`, before any sampling."""
    out = tuple(float(t) for t in temperatures)
    bad = [t for t in out if not np.isfinite(t) or t < 0]
    if bad or not out:
        raise ValueError(f"config.{key} = {tuple(temperatures)}: temperatures must be finite and >= 0 (0 = greedy), "
                         "at least one")
    return out


def sample_sweep(params: Any, model: ModelConfig, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                 temperatures: Sequence[float], sampling: SamplingConfig, rng: jax.Array, batch_rows: int = 1024
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens, mask) [P, max_new_tokens]] per temperature, for left-padded prompts [P, T]."""
    temps = check_temperatures(temperatures)
    p = len(prompt_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(p))
    prompt_of = np.arange(p * len(temps)) % p
    out = generate_chunks(params, model, np.asarray(prompt_ids)[prompt_of], np.asarray(prompt_mask)[prompt_of],
                          keys[prompt_of], sampling, np.repeat(np.asarray(temps, np.float32), p), batch_rows)
    return [(out.tokens[i * p:(i + 1) * p], out.mask[i * p:(i + 1) * p]) for i in range(len(temps))]


def win_rates(judge: Judge, method: str, temperatures: Sequence[float], prompts: Sequence[str],
              completions: Sequence[Sequence[str]], baselines: Sequence[Sequence[str]] | Sequence[str],
              lengths: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One win-rate row per temperature — completions[i] (at temperatures[i]) against baselines[i], a list per
    temperature (another policy at the same temperature) or one list for all (a dataset's reference) — with the
    judge's failures and position bias; and a record per judgment (for completions.jsonl). lengths[i]: (the
    completions' tokens, whether each ended with EOS, the baselines' tokens) — adds the length columns."""
    fixed = len(baselines) == len(prompts) and all(isinstance(b, str) for b in baselines)
    rows, records = [], []
    for i, t in enumerate(temperatures):
        base = baselines if fixed else baselines[i]
        judged = judge.judge(prompts, completions[i], base)
        extra = {} if lengths is None else length_fields(judged.outcomes, *lengths[i])
        rows.append({"method": method, "temperature": float(t), **win_rate(judged.outcomes), **judged.summary,
                     **extra})
        records += [{"method": method, "temperature": float(t), "prompt_index": j, "prompt": p, "completion": x,
                     "baseline": b,
                     "outcome": None if np.isnan(o) else float(o), **r,
                     **({} if lengths is None else {"length": int(lengths[i][0][j]), "eos": bool(lengths[i][1][j]),
                                                    "baseline_length": int(lengths[i][2][j])})}
                    for j, (p, x, b, o, r) in enumerate(zip(prompts, completions[i], base, judged.outcomes,
                                                            judged.records))]
    return rows, records


def token_lengths(tokens: np.ndarray, mask: np.ndarray, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sampled completions' lengths in tokens and whether each ended with EOS (before the budget ran out)."""
    return (np.asarray(mask) == 1).sum(1), ended_with_eos(tokens, mask, eos_id)


def decode_completions(tokenizer: Any) -> Callable[[np.ndarray, np.ndarray], list[str]]:
    """(tokens, mask) -> completion texts, special tokens skipped."""
    return lambda tokens, mask: tokenizer.batch_decode([t[m == 1] for t, m in zip(tokens, mask)],
                                                       skip_special_tokens=True)
