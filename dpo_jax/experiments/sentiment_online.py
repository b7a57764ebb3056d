"""The sentiment experiment's methods whose reference or pairs move during training (stage 6): online DPO and TR-DPO.

Online DPO (`method("online_dpo", ...)`, family "Online DPO") samples `online.samples_per_prompt` completions for
each of `online.prompts` train prefixes a step from the current policy (the pairs' and PPO's prefixes, at
temperature 1 and the evaluation's budget of new tokens), labels them with VADER — the ground truth that labels
the offline pairs and PPO-GT's rollouts — and takes a DPO step on the best vs the worst (rlhf/online_dpo.py),
against π_SFT kept on device. Every sample is a ground-truth label in the equal-terms table; at the defaults, 8
prompts x 2 samples x 80 updates = 1,280, the offline pairs' and PPO-GT's count.

TR-DPO (a DPO method with `dpo.ref_sync_every`, family "TR-DPO") trains on the offline pairs with a resident
reference moved toward the policy (train/reference_source.SyncedReference), so no precomputed table covers it.
The frontier's KL stays the divergence from π_SFT for both.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax.data.prompts import PromptLoader
from dpo_jax.experiments.sentiment_budget import Usage
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.rlhf.online_dpo import OnlineRollouts, row_decoder
from dpo_jax.train.reference_source import PerBatchReference, SyncedReference


def is_online(m: ml_collections.ConfigDict) -> bool:
    return m.mode == "online_dpo"


def moves_reference(m: ml_collections.ConfigDict) -> bool:
    return bool(m.dpo.get("ref_sync_every", 0))


def batch_pairs(st: Any, m: ml_collections.ConfigDict) -> int:
    """Pairs a step: online DPO's prompts a step (each makes at most one pair), else train.batch_pairs."""
    return st.c.online.prompts if is_online(m) else st.c.train.batch_pairs


def rollout(st: Any, m: ml_collections.ConfigDict, engine: Any, initial: Any, seed: int, usage: Usage
            ) -> tuple[Callable[[dict, Any], dict] | None, Iterator[dict] | None]:
    """(the Trainer's rollout hook, its batches) for a method that samples its pairs or moves its reference;
    (None, None) for the others (the precomputed table and the pair loader). `initial`: π_SFT's train state on
    device; the reference is a copy of its params (the step donates the state, TR-DPO moves the copy), moved for
    an online method with `ref_sync_every` too, as `dpo-jax train` moves it."""
    if not (is_online(m) or moves_reference(m)):
        return None, None
    reference = PerBatchReference(engine, jax.tree.map(jnp.copy, initial.params))
    if moves_reference(m):  # TR-DPO, offline or online
        reference = SyncedReference(reference, m.dpo.ref_sync_every, m.dpo.get("ref_sync_alpha", 1.0))
    if not is_online(m):
        return (lambda local, state: reference.attach(local, "train", state)), st.pair_loader(seed)
    o, p = st.c.online, st.c.pairs
    prompts, mask = st.prefixes(st.train_ids, p.prefixes, st.c.seed + 1)  # the pairs' (and PPO's) prefixes
    label = usage.count_scores(lambda rows, row_mask, texts: st.reward(texts), ground_truth=True)
    sampling = SamplingConfig(max_new_tokens=st.c.eval.max_new_tokens, temperature=o.temperature, eos_id=st.eos,
                              pad_id=st.pad)
    hook = OnlineRollouts(engine, lambda i: prompts[i][mask[i] == 1],
                          reference, lambda rows, row_mask, texts, width: label(rows, row_mask, texts),
                          row_decoder(st.tokenizer), sampling, o.samples_per_prompt, p.max_prefix, 0.0,
                          seed=st.c.seed + 1000 * seed)
    return hook, PromptLoader(prompts, mask, o.prompts, st.c.seed + 1000 * seed)


def check(c: ml_collections.ConfigDict) -> None:
    """The online section against the budget, before anything runs; errors name the key."""
    o = c.online
    if o.prompts < 1 or o.samples_per_prompt < 2:
        raise ValueError(f"config.online.prompts = {o.prompts} must be >= 1 and config.online.samples_per_prompt = "
                         f"{o.samples_per_prompt} >= 2 (a pair is the best and the worst of a prompt's samples)")
    if not np.isfinite(o.temperature) or o.temperature <= 0:
        raise ValueError(f"config.online.temperature = {o.temperature} must be > 0")
