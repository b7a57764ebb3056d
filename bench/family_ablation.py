"""Where a Llama-shaped DPO step loses to a GPT-2-shaped one: one switch at a time, the variants taking turns.

    python bench/family_ablation.py [--steps 8] [--out docs/bench/family_ablation.json]

The bench's batch (bench/step_variants.py: 8 pairs of 48 + 2 × 80 tokens, shared-prompt rows of 208, score window
160) and its 6 × 512 shape, float32, one CPU device. Variants: `gpt2` and `llama` (the families' switches), and
`llama` with one of its switches set to GPT-2's — `+layernorm` (LayerNorm instead of RMSNorm), `+learned_positions`
(instead of rotary), `+gelu_mlp` (a 2-matrix GELU MLP instead of the 3-matrix SwiGLU at the same width: fewer FLOPs),
`+biases`, `+tied` (tied unembedding). Each reports the median train-step time over the rounds after the first two,
the model FLOPs of the step (dpo_jax/flops.py, the count MFU uses) and their rate, and the compiled step's XLA
fusion count and cost-analysis FLOPs — the HLO-level view of what each switch adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

import jax

from dpo_jax.data.layout import get_layout
from dpo_jax.flops import train_step_flops
from dpo_jax.models.config import FAMILY_SWITCHES, PRESETS
from dpo_jax.models.decoder import init_params
from dpo_jax.train.engine import build_engine
from dpo_jax.train.model_source import random_model_config
from dpo_jax.train.run import default_run_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_variants import PAIRS, VOCAB, bench_batch  # noqa: E402

GPT2 = FAMILY_SWITCHES["gpt2"]
VARIANTS = {
    "gpt2": dict(GPT2),
    "llama": {},
    "llama+layernorm": dict(norm_type=GPT2["norm_type"], norm_eps=GPT2["norm_eps"]),
    "llama+learned_positions": dict(position_embedding=GPT2["position_embedding"]),
    "llama+gelu_mlp": dict(mlp_type=GPT2["mlp_type"], activation=GPT2["activation"]),
    "llama+biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "llama+tied": dict(tie_word_embeddings=True),
}
WINDOW = 160


def engine_for(switches: dict):
    c = default_run_config()
    c.model.update(PRESETS["llama-bench"])
    c.train.global_batch_pairs, c.mesh.data, c.data.layout = PAIRS, 1, "shared_prompt"
    c.optimizer.name, c.optimizer.warmup_steps = "adamw", 0
    model = dataclasses.replace(random_model_config(c.model, VOCAB), **switches)
    return build_engine(c, model, lambda: init_params(model, jax.random.key(0)), score_window=WINDOW,
                        devices=jax.devices()[:1], layout=get_layout("shared_prompt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="")
    args = p.parse_args()
    batch = bench_batch()
    names = args.variants.split(",")
    engines = {v: engine_for(VARIANTS[v]) for v in names}
    batches = {v: e.shard_batch(batch) for v, e in engines.items()}
    states = {v: e.state for v, e in engines.items()}
    hlo = {}
    for v, e in engines.items():
        compiled = e.train_step.lower(states[v], batches[v]).compile()
        text = compiled.as_text()
        hlo[v] = {"fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M)),
                  "cost_analysis_flops": float(compiled.cost_analysis().get("flops", 0.0))}
    times = {v: [] for v in names}
    for _ in range(args.steps + 2):
        for v, e in engines.items():
            t = time.perf_counter()
            states[v], metrics = e.train_step(states[v], batches[v])
            jax.block_until_ready(metrics)
            times[v].append(time.perf_counter() - t)
    rows, t = batch["input_ids"].shape
    results = {}
    for v in names:
        step = statistics.median(times[v][2:])
        flops = train_step_flops(engines[v].config.model, rows, t, WINDOW)
        results[v] = {"step_s": step, "model_gflop": flops / 1e9, "gflop_per_s": flops / step / 1e9, **hlo[v]}
        print(f"{v:24s} step {step:.3f} s | model {flops / 1e9:6.1f} GFLOP -> {flops / step / 1e9:6.1f} GFLOP/s | "
              f"{hlo[v]['fusions']:4d} fusions | XLA cost {hlo[v]['cost_analysis_flops'] / 1e9:6.1f} GFLOP",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", "bench/family_ablation.py", *sys.argv[1:]]),
                       "rows_x_tokens": [rows, t], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
