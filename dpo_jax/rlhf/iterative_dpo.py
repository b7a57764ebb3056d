"""Iterative DPO: R rounds of (sample a pair set from the current policy on the prompt set, label it, train offline
DPO on it), the reference fixed at the initial policy or moved to the previous round's policy.

`dpo-jax train` with `iterative.rounds = R > 0` (commands/train.py sends it here). Round r, in RUN_DIR/round_r/:
the policy (round 0: config.model; then round r−1's) samples `online.samples_per_prompt` completions for each of
`iterative.prompts_per_round` prompts of the train split (a sample drawn with (seed, r)), scored as online DPO
scores them (rlhf/online_dpo.py: a reward model, a function, or a judge for k = 2); best vs worst per prompt (ties
and identical texts dropped, counted) go to pairs.jsonl in the generic format; an offline DPO run on them
(`run/`: its reference log-probs precomputed and cached, like any run's) trains the round's policy, saved to
`policy/` as a dpo_jax checkpoint. A finished round is skipped on a re-run, an interrupted one resumes (its pairs
are a pure function of the round's policy and seed, its run resumes from its directory). The tokenizer is pinned
in RUN_DIR/tokenizer, so every round tokenizes alike whatever its data.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dpo_jax import sharding
from dpo_jax.convert import native
from dpo_jax.data.prompts import encode_prompts, read_prompts
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.placement import place_on_mesh
from dpo_jax.rlhf.best_of_n import sample_n
from dpo_jax.rlhf.online_dpo import check_reward, make_score, pairs_from_scores, row_decoder, score_samples
from dpo_jax.train import run as train_run
from dpo_jax.train.export import restore_params
from dpo_jax.train.model_source import model_loader, model_with_head, tokenizer_dir

REFERENCES = ("initial", "previous")


def check(c: ml_collections.ConfigDict, judge: Any = None) -> None:
    i = c.iterative
    if i.rounds < 1 or i.prompts_per_round < 1 or i.steps_per_round < 0:
        raise ValueError(f"config.iterative: rounds = {i.rounds} and prompts_per_round = {i.prompts_per_round} must "
                         f"be >= 1, steps_per_round = {i.steps_per_round} >= 0 (0: one epoch of the round's pairs)")
    if i.reference not in REFERENCES:
        raise ValueError(f"config.iterative.reference = {i.reference!r}: one of {', '.join(REFERENCES)}")
    if c.train.mode != "dpo":
        raise ValueError(f"config.iterative.rounds > 0 trains offline DPO rounds: config.train.mode must be 'dpo', "
                         f"got {c.train.mode!r}")
    check_reward(c.online, judge)
    if c.dpo.ref_sync_every:
        raise ValueError("config.iterative moves the reference between rounds (iterative.reference = 'previous'); "
                         "config.dpo.ref_sync_every must be 0")


def _section(source: str, path: str, like: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**like.to_dict(), "source": source, "path": path})


def sample_pairs(c: ml_collections.ConfigDict, policy: ml_collections.ConfigDict, tokenizer: Any, round_: int,
                 prompts: list[Any], score: Callable[..., np.ndarray], mesh: Any, path: str) -> dict[str, int]:
    """Round `round_`'s pair set from `policy` (a model section, placed on `mesh`) on a draw from `prompts` (the
    train split's), written to `path`; returns its counts."""
    o, i = c.online, c.iterative
    rng = np.random.default_rng([c.train.seed, round_])
    picked = np.sort(rng.choice(len(prompts), min(i.prompts_per_round, len(prompts)), replace=False))
    prompts = [prompts[j] for j in picked]
    pad = tokenizer.pad_token_id or 0
    ids, mask = encode_prompts(prompts, tokenizer, c.data.max_prompt_length, pad)
    model, load = model_with_head(policy, len(tokenizer), "lm", "iterative policy")
    params, _ = place_on_mesh(model, load(), mesh, c.mesh.rules)
    sampling = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                              eos_id=tokenizer.eos_token_id, pad_id=pad)
    k = o.samples_per_prompt
    samples = sample_n(params, model, ids, mask, k, jax.random.fold_in(jax.random.key(c.train.seed + 17), round_),
                       sampling)
    tokens, generated = np.asarray(samples.tokens), np.asarray(samples.mask)
    decode = row_decoder(tokenizer)
    scores, _ = score_samples(ids, mask, tokens, generated, score, decode, tokenizer.eos_token_id,
                              o.missing_eos_penalty)
    texts = decode(tokens.reshape(len(ids) * k, -1), generated.reshape(len(ids) * k, -1))  # the completions alone
    best, worst, keep = pairs_from_scores(scores)
    counts = {"prompts": len(prompts), "pairs": 0, "ties": int((~keep).sum()), "identical": 0,
              "mean_score": float(scores.mean())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for j, prompt in enumerate(prompts):
            chosen, rejected = texts[j * k + best[j]], texts[j * k + worst[j]]
            if not keep[j]:
                continue
            if chosen == rejected:
                counts["identical"] += 1
                continue
            if not isinstance(prompt, str):  # a conversation: the responses as assistant turns
                prompt = list(prompt)
                chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")
            counts["pairs"] += 1
    if not counts["pairs"]:
        raise ValueError(f"iterative DPO round {round_}: no pair — every prompt's samples scored alike "
                         f"({counts['ties']}) or decoded alike ({counts['identical']}); raise "
                         "config.online.samples_per_prompt or the temperature")
    os.replace(path + ".tmp", path)
    return counts


def train_iterative(c: ml_collections.ConfigDict, judge: Any = None) -> dict[str, Any]:
    check(c, judge)
    run_dir = os.path.abspath(c.train.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    tokenizer = load_tokenizer(c.data, tokenizer_dir(c.model))
    pinned = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(pinned):
        tokenizer.save_pretrained(pinned)
    initial = c.model
    if c.model.source == "random":  # the initial policy as a checkpoint: the rounds and the reference load it
        initial = _section("checkpoint", os.path.join(run_dir, "initial_policy"), c.model)
        if not os.path.isdir(initial.path):
            model, load = model_loader(c.model, len(tokenizer))
            native.save_model(initial.path, model, jax.device_get(load()))
    mesh = sharding.make_mesh(c.mesh)
    score = make_score(c, tokenizer, mesh, judge)
    policy, last, prompts = initial, {}, None  # prompts: read once, when a round first samples
    for r in range(c.iterative.rounds):
        round_dir = os.path.join(run_dir, f"round_{r}")
        saved = os.path.join(round_dir, "policy")
        if os.path.isdir(saved):
            print(f"[iterative] round {r}: done ({saved})", flush=True)
            policy = _section("checkpoint", saved, c.model)
            continue
        pairs = os.path.join(round_dir, "pairs.jsonl")
        if not os.path.isfile(pairs):
            prompts = prompts if prompts is not None else read_prompts(c.data.train_path, c.data.format)
            counts = sample_pairs(c, policy, tokenizer, r, prompts, score, mesh, pairs)
            print(f"[iterative] round {r}: {counts['pairs']} pairs from {counts['prompts']} prompts (mean score "
                  f"{counts['mean_score']:+.4f}; {counts['ties']} all-equal, {counts['identical']} identical texts "
                  f"dropped) -> {pairs}", flush=True)
        rc = c.copy_and_resolve_references()
        rc.iterative.rounds = 0
        rc.model = _section(policy.source, policy.path, c.model)
        # "previous": the round's own initial policy (the default reference); "initial": round 0's, loaded
        fixed = r and c.iterative.reference == "initial"
        rc.reference.source, rc.reference.path = (initial.source, initial.path) if fixed else ("", "")
        rc.data.train_path, rc.data.format, rc.data.tokenizer = pairs, "generic", pinned
        rc.train.run_dir = os.path.join(round_dir, "run")
        if not c.iterative.steps_per_round:
            with open(pairs) as f:
                rc.train.steps = -(-sum(1 for _ in f) // c.train.global_batch_pairs)
        else:
            rc.train.steps = c.iterative.steps_per_round
        rc.train.save_every = min(rc.train.save_every or rc.train.steps, rc.train.steps)
        last = train_run.train(rc)
        _, model, params, _ = restore_params(rc.train.run_dir)
        native.save_model(saved, model, jax.device_get(params))  # host arrays: loaded onto any mesh
        policy = _section("checkpoint", saved, c.model)
        print(f"[iterative] round {r}: trained {rc.train.steps} steps -> {saved}", flush=True)
    return last
