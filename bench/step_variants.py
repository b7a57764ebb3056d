"""Step-time A/B of engine variants on bench/dpo_vs_trl.py's job, in one process, the variants taking turns.

    python bench/step_variants.py [--steps 10] [--variants window,no_window,remat_dots_no_batch] [--mode reward]
                                  [--out F.json]

One batch shaped like the DPO-vs-TRL bench (8 pairs of 48 prompt + 2 × 80 response tokens, packed in the
shared-prompt layout: 8 rows × 208 tokens), the bench's GPT-2-shaped model (float32, random init), and one fresh
engine per variant. Each round runs one train step and one reference step of every variant in turn, so machine
drift hits all of them alike; the medians over the rounds after the first two are reported. Variants:
  window               the defaults, with the bench data's score window (160 positions per row)
  no_window            the unembedding on every position (score_window = 0)
  remat_<policy>       window, with config.model.remat_policy = <policy> (none, dots_no_batch, full)
  unrolled             window, with config.model.scan_layers = False
All variants must report the same first loss (checked), so only speed differs. --mode reward times the
reward-model step (a score head on the same body; no unembedding, so the window variants coincide).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import traverse_util

from dpo_jax.convert.hf import unstack_layers
from dpo_jax.data.layout import get_layout, scored_span
from dpo_jax.data.packing import pack_pair
from dpo_jax.models.config import PRESETS
from dpo_jax.models.decoder import init_params
from dpo_jax.models.reward import as_reward_model, reward_model_config
from dpo_jax.train.engine import build_engine
from dpo_jax.train.model_source import random_model_config
from dpo_jax.train.run import default_run_config

PAIRS, PROMPT, RESPONSE, VOCAB = 8, 48, 80, 8192


def bench_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.r_[np.zeros(PROMPT), np.ones(RESPONSE)].astype(np.int32)
    rows = []
    for _ in range(PAIRS):
        prompt = rng.integers(2, VOCAB, PROMPT)
        rows.append(pack_pair(np.r_[prompt, rng.integers(2, VOCAB, RESPONSE)], mask,
                              np.r_[prompt, rng.integers(2, VOCAB, RESPONSE)], mask))
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in rows[0]}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    batch["example_mask"] = np.ones(PAIRS, np.int32)
    batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = batch["margin"] = np.zeros(PAIRS, np.float32)
    return batch


def engine_for(variant: str, window: int, mode: str = "dpo"):
    c = default_run_config()
    c.train.mode = mode
    m = c.model
    m.update(PRESETS["gpt2-bench"])
    c.train.global_batch_pairs, c.mesh.data, c.data.layout = PAIRS, 1, "shared_prompt"
    c.optimizer.name, c.optimizer.warmup_steps = "adamw", 0
    if variant.startswith("remat_"):
        m.remat_policy = variant[len("remat_"):]
    elif variant == "unrolled":
        m.scan_layers = False
    elif variant not in ("window", "no_window"):
        raise ValueError(f"unknown variant {variant!r}")
    model = random_model_config(copy.deepcopy(m), VOCAB)
    scanned = dataclasses.replace(model, scan_layers=True)

    if mode == "reward":
        model = reward_model_config(model, 0)

    def same_weights():  # every variant starts from the scanned model's initial weights
        params = init_params(scanned, jax.random.key(0))
        if mode == "reward":
            params = as_reward_model(scanned, params, 0, jax.random.key(1))[1]
        if model.scan_layers:
            return params
        flat = traverse_util.flatten_dict(params, sep="/")
        return traverse_util.unflatten_dict(unstack_layers(flat, model.num_layers), sep="/")

    return build_engine(c, model, same_weights, score_window=0 if variant == "no_window" else window,
                        devices=jax.devices()[:1], layout=get_layout(c.data.layout))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="window,no_window")
    p.add_argument("--mode", default="dpo", choices=("dpo", "reward"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    batch = bench_batch()
    window = -(-max(scored_span(m, q) for m, q in zip(batch["loss_mask"], batch["predecessor"])) // 16) * 16
    variants = args.variants.split(",")
    engines = {v: engine_for(v, window, args.mode) for v in variants}
    batches = {v: e.shard_batch(batch) for v, e in engines.items()}
    states = {v: e.state for v, e in engines.items()}
    times = {v: {"step": [], "reference": []} for v in variants}
    first_loss = {}
    for i in range(args.steps + 2):
        for v, e in engines.items():
            t = time.perf_counter()
            states[v], metrics = e.train_step(states[v], batches[v])
            jax.block_until_ready(metrics)
            times[v]["step"].append(time.perf_counter() - t)
            if i == 0:
                first_loss[v] = float(metrics["loss"].total / metrics["loss"].count)
            t = time.perf_counter()
            if args.mode == "dpo":
                jax.block_until_ready(e.reference_step(states[v].params, {k: batches[v][k] for k in
                                                                          e.config.layout.row_keys}))
            times[v]["reference"].append(time.perf_counter() - t)
    if max(first_loss.values()) - min(first_loss.values()) > 1e-5:
        raise RuntimeError(f"the variants disagree on the first loss: {first_loss}")
    results = {v: {"score_window": engines[v].config.score_window,
                   "step_s": statistics.median(t["step"][2:]), "reference_s": statistics.median(t["reference"][2:]),
                   "first_loss": first_loss[v]} for v, t in times.items()}
    for v, r in results.items():
        print(f"{v:22s} window {r['score_window']:4d} | train step {r['step_s']:.3f} s | reference batch "
              f"{r['reference_s']:.3f} s | first loss {r['first_loss']:.6f}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", "bench/step_variants.py", *sys.argv[1:]]),
                       "rows_x_tokens": list(batch["input_ids"].shape), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
