"""Best-of-N: sample N completions per prompt once, rank them with a reward model, and read every N' <= N off the
same samples by taking the first N' of each prompt.

Sample j of prompt i is drawn with its own key fold_in(fold_in(rng, i), j), so it does not depend on N, on the batch
it was generated in, or on the other prompts: the first N' samples of an N-sample pass are exactly the samples of
an N'-sample pass, and the sweep costs one sampling pass. The KL of the best-of-N distribution to the sampling
policy is, for distinct samples, log N − (N−1)/N (Stiennon et al. 2020, App. G; Beirami et al. 2024 show it is an
upper bound), which the DPO paper's Figure 2 uses for this baseline.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.generate import SamplingConfig, Samples, generate_chunks


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π) in nats, the analytic value for distinct samples."""
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def sample_keys(rng: jax.Array, num_prompts: int, n: int) -> jax.Array:
    """[num_prompts * n] keys, row i*n + j for sample j of prompt i."""
    per_prompt = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_prompts))
    return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(per_prompt).reshape(-1)


def sample_n(params: Any, model: ModelConfig, prompt_ids: np.ndarray, prompt_mask: np.ndarray, n: int,
             rng: jax.Array, sampling: SamplingConfig, batch_rows: int = 1024) -> Samples:
    """N samples for each left-padded prompt [P, T]: Samples whose fields are [P, N, ...], generated `batch_rows`
    rows at a time (the last chunk padded to the same shape, so one compile serves the pass)."""
    p = len(prompt_ids)
    out = generate_chunks(params, model, np.repeat(np.asarray(prompt_ids), n, 0),
                          np.repeat(np.asarray(prompt_mask), n, 0), sample_keys(rng, p, n), sampling,
                          batch_rows=batch_rows)
    return jax.tree.map(lambda x: x.reshape(p, n, *x.shape[1:]), out)


def best_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """[P] index of the highest-scoring of each prompt's first n samples (scores [P, N])."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"best-of-{n} from {scores.shape[1]} samples per prompt")
    return np.argmax(scores[:, :n], axis=1)


def sweep(scores: np.ndarray, ns: Sequence[int], rewards: np.ndarray | None = None) -> list[dict[str, float]]:
    """One row per N: the analytic KL, the mean reward-model score of the picked samples and, given a second
    reward [P, N] (e.g. the ground truth), its mean on the same picks."""
    rows = []
    for n in ns:
        pick = best_indices(scores, n)
        row = {"n": n, "kl": best_of_n_kl(n), "score": float(np.take_along_axis(scores, pick[:, None], 1).mean())}
        if rewards is not None:
            row["reward"] = float(np.take_along_axis(rewards, pick[:, None], 1).mean())
        rows.append(row)
    return rows


def completion_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, samples: Samples
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [P·N, T + L] of prompt + completion for scoring: left-padded prompt, completion, right padding."""
    p, n, _ = samples.tokens.shape
    ids = np.concatenate([np.repeat(prompt_ids, n, 0), samples.tokens.reshape(p * n, -1)], 1)
    mask = np.concatenate([np.repeat(prompt_mask, n, 0), samples.mask.reshape(p * n, -1)], 1)
    return ids.astype(np.int32), mask.astype(np.int32)
