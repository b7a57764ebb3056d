"""`dpo-jax best-of-n --config configs/tiny.py:best_of_n`: Best-of-N from a policy ranked by a reward model.

Samples `n` completions per prompt once, scores prompt + completion with the reward model (the jitted, sharded
scoring pass), and writes to `out_dir`: best_of_n.jsonl (for every prompt and every N' in `ns`, the picked
completion and its score), samples.jsonl (every sample with its score) and rewards.csv / rewards.md (per N': the
analytic KL log N' − (N'−1)/N' and the mean score of the picks). Policy and reward model share the tokenizer.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections

from dpo_jax import sharding
from dpo_jax.data.prompts import encode_prompts, read_prompts
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.placement import place_on_mesh
from dpo_jax.rlhf import best_of_n as bon
from dpo_jax.train.model_source import (default_model_config, load_reward_scorer, model_with_head, pad_id,
                                        tokenizer_dir)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.policy = default_model_config()  # the sampling policy (π_SFT in the paper)
    c.reward_model = default_model_config()  # a *ForSequenceClassification HF dir or a dpo_jax reward checkpoint
    c.tokenizer = ""  # a local HF tokenizer dir; empty: the policy's directory
    c.prompts = ml_collections.ConfigDict(dict(path="", format="auto", limit=0, max_prompt_length=256))
    c.n = 16  # samples per prompt (one pass)
    c.ns = (1, 2, 4, 8, 16)  # the N' <= n reported, each from the first N' samples
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0))
    c.batch_rows = 256  # rows per generate / scoring call (a multiple of the mesh's data-parallel size)
    c.seed = 0
    c.out_dir = "runs/best_of_n"
    c.mesh = sharding.default_mesh_config()
    return c


def main(c: ml_collections.ConfigDict) -> None:
    if not c.prompts.path:
        raise ValueError("config.prompts.path is empty")
    ns = sorted(set(int(n) for n in c.ns))
    if not ns or ns[0] < 1 or ns[-1] > c.n:
        raise ValueError(f"config.ns = {tuple(c.ns)} must be N' in [1, config.n = {c.n}]")
    tokenizer = load_tokenizer({"tokenizer": c.tokenizer}, tokenizer_dir(c.policy))
    mesh = sharding.make_mesh(c.mesh)
    policy, load_policy = model_with_head(c.policy, len(tokenizer), "lm", "policy")
    policy_params, _ = place_on_mesh(policy, load_policy(), mesh, c.mesh.rules)
    scorer = load_reward_scorer(c.reward_model, len(tokenizer), mesh, c.mesh.rules, "reward_model")
    pad = pad_id(tokenizer)
    prompts = read_prompts(c.prompts.path, c.prompts.format, c.prompts.limit)
    ids, mask = encode_prompts(prompts, tokenizer, c.prompts.max_prompt_length, pad)
    s = c.sampling
    sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                              top_p=s.top_p, eos_id=tokenizer.eos_token_id, pad_id=pad)
    samples = bon.sample_n(policy_params, policy, ids, mask, c.n, jax.random.key(c.seed), sampling, c.batch_rows)
    rows, row_mask = bon.completion_rows(ids, mask, samples)
    scores = scorer.rows(rows, row_mask, c.batch_rows).reshape(len(prompts), c.n)
    completions = [[tokenizer.decode(samples.tokens[i, j][samples.mask[i, j] == 1], skip_special_tokens=True)
                    for j in range(c.n)] for i in range(len(prompts))]
    if jax.process_index() != 0:
        return
    os.makedirs(c.out_dir, exist_ok=True)
    with open(os.path.join(c.out_dir, "samples.jsonl"), "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, "completions": completions[i], "scores": scores[i].tolist()}) + "\n")
    with open(os.path.join(c.out_dir, "best_of_n.jsonl"), "w") as f:
        for n in ns:
            for i, j in enumerate(bon.best_indices(scores, n)):
                f.write(json.dumps({"n": n, "prompt": prompts[i], "completion": completions[i][j],
                                    "score": float(scores[i, j]), "sample": int(j)}) + "\n")
    table = bon.sweep(scores, ns)
    with open(os.path.join(c.out_dir, "rewards.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["n", "kl", "score"])
        w.writeheader()
        w.writerows(table)
    lines = [f"# Best-of-N: {len(prompts)} prompts, {c.n} samples each", "", "| N | KL (analytic) | mean score |",
             "|---|---|---|"] + [f"| {r['n']} | {r['kl']:.3f} | {r['score']:+.4f} |" for r in table]
    with open(os.path.join(c.out_dir, "rewards.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]), flush=True)
    print(f"best-of-n: wrote {c.out_dir}/best_of_n.jsonl, samples.jsonl, rewards.csv, rewards.md", flush=True)
