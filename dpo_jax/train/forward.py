"""The forward passes a step runs on a preference batch in any layout: the policy's log-probs of both responses of
every pair (`pair_logprobs`) and a reward model's score of each (`pair_rewards`). Everything after these is
layout-independent.

The batch is global arrays in a layout (data/layout.py: a row per response, or packed rows of several pairs); the
layout turns rows into the two responses of every pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax.logprobs import SequenceLogProbs, sequence_logprobs
from dpo_jax.models.decoder import Decoder, unembedding
from dpo_jax.models.reward import last_token, scoreable, token_scores, value_at

if TYPE_CHECKING:
    from dpo_jax.train.step_config import StepConfig


def dropout_rngs(rng: jax.Array | None) -> dict[str, jax.Array] | None:
    """The `rngs` of a training forward pass: a dropout key turns on the LoRA adapters' dropout."""
    return None if rng is None else {"dropout": rng}


def policy_logprobs(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                    ) -> SequenceLogProbs:
    """Forward over all rows, then chunked float32 log-probs of the scored tokens."""
    hidden = Decoder(c.model).apply({"params": params}, batch["input_ids"], **c.layout.decoder_inputs(batch),
                                    rngs=dropout_rngs(rng))
    kernel, bias = unembedding(params, c.model)
    return sequence_logprobs(hidden, kernel, batch["input_ids"], batch["loss_mask"], bias=bias,
                             chunk_size=c.chunk_size, predecessor=c.layout.predecessor(batch),
                             **score_window(batch, c))


def score_window(batch: dict[str, jax.Array], c: StepConfig) -> dict[str, Any]:
    """Where the unembedding runs (sequence_logprobs' `window` or `positions`), {} for every position."""
    rows, t = batch["input_ids"].shape
    if c.layout.rows_per_pair == 0 and c.layout.max_pairs_per_row > 1:  # several pairs' scored tokens, gathered
        if c.score_groups and rows % c.score_groups:
            raise ValueError(f"{rows} packed rows do not split into {c.score_groups} score groups")
        g = rows // c.score_groups if c.score_groups else 1
        if not c.score_window or c.score_window >= g * t:
            return {}
        scored = c.layout.scored(batch).reshape(rows // g, g * t)
        first = jnp.argsort(jnp.logical_not(scored), axis=1, stable=True)[:, :c.score_window].astype(jnp.int32)
        return {"positions": jnp.where(jnp.take_along_axis(scored, first, axis=1), first, -1),
                "rows_per_gather": g}
    if not c.score_window or c.score_window >= t:
        return {}
    return {"window": (jnp.argmax(c.layout.scored(batch), axis=1).astype(jnp.int32), c.score_window)}


class PairLogProbs(NamedTuple):
    """Per pair: log π(y|x) sums and scored-token counts [B], masked token log-probs and scored masks [B, T]
    (counts are the masks' sums: one rule for which tokens are scored)."""

    chosen_sums: jax.Array
    rejected_sums: jax.Array
    chosen_counts: jax.Array
    rejected_counts: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array


def response_masks(batch: dict[str, jax.Array], c: StepConfig) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scored-token masks [B, T], float32, in pair order."""
    return c.layout.responses(c.layout.scored(batch).astype(jnp.float32), batch, c.num_blocks)


def pair_logprobs(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                  ) -> PairLogProbs:
    """The policy's log-probs of both responses of every pair, whatever the batch layout."""
    lp = policy_logprobs(params, batch, c, rng)
    mask_c, mask_r = response_masks(batch, c)
    tc, tr = c.layout.responses(lp.token_logps, batch, c.num_blocks)
    return PairLogProbs(jnp.sum(tc, -1), jnp.sum(tr, -1), jnp.sum(mask_c, -1), jnp.sum(mask_r, -1), tc, tr,
                        mask_c, mask_r)


def pair_rewards(params: dict, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """(r_chosen, r_rejected) [B] float32 of a reward model (score head, models/reward.py) on a preference batch in
    any layout (shared prompt: one packed row gives both scores). `rng`: a training step's dropout key."""
    hidden = Decoder(c.model).apply({"params": params}, batch["input_ids"], **c.layout.decoder_inputs(batch),
                                    rngs=dropout_rngs(rng))
    scores = token_scores(params, c.model, hidden)
    valid = scoreable(batch["input_ids"], batch["attention_mask"], c.model)
    (sc, vc), (sr, vr) = c.layout.sequences(scores, valid, batch, c.num_blocks)
    return value_at(sc, last_token(vc)), value_at(sr, last_token(vr))
