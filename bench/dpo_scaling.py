"""How the DPO train step's cost grows with sequence length and batch size; compile time; fraction of peak.

    python bench/dpo_scaling.py [--out docs/bench/dpo_scaling.json] [--model gpt2-6x512] [--steps 2]

The model is bench/dpo_vs_trl.py's (GPT-2-shaped, 6 layers, width 512, 8 heads, vocab 8192) unless --model says
otherwise, float32 on the default device, built by the production engine (`build_engine`, precomputed reference,
the two-rows-per-pair layout so that T is each sequence's length).
Two sweeps, each point a fresh engine:
  - sequence length 128 -> 2048 at a constant 4,096 tokens per step (pairs = 2048 / T), so growth beyond linear
    is the attention's T^2 share;
  - batch 2 -> 32 pairs at T = 128.
For each point: compile seconds, the compiled step's memory (arguments + temporaries + outputs - aliased, from
`memory_analysis()`), median step seconds over --steps timed steps after one warm-up, tokens/s, model FLOPs
(MaxText accounting, `dpo_jax.flops`) and XLA's own FLOP count, and the fraction of the measured matmul peak
(bench/matmul_peak.py) that the model FLOPs reach.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from dpo_jax.flops import train_step_flops
from dpo_jax.models.decoder import init_params
from dpo_jax.train.engine import build_engine
from dpo_jax.train.model_source import random_model_config
from dpo_jax.train.run import default_run_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matmul_peak import measure_matmul_peak  # noqa: E402

MODELS = {  # name: (family, hidden, layers, heads, intermediate, vocab)
    "gpt2-6x512": ("gpt2", 512, 6, 8, 2048, 8192),  # PRESETS["gpt2-bench"]
    "llama-1b": ("llama", 2048, 16, 32, 8192, 128256),  # Llama-3.2-1B's shape (MHA here: 32 KV heads)
    "tiny": ("gpt2", 64, 2, 4, 256, 512),  # for a quick check that the scripts run
}


def synthetic_batch(pairs: int, seq_len: int, vocab: int, prompt_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[:, prompt_len:] = 1.0
    return dict(input_ids=rng.integers(2, vocab, (rows, seq_len)).astype(np.int32), loss_mask=loss_mask,
                attention_mask=np.ones((rows, seq_len), np.int32), example_mask=np.ones(pairs, np.float32),
                ref_chosen_logps=np.zeros(pairs, np.float32), ref_rejected_logps=np.zeros(pairs, np.float32))


def measure_point(model_name: str, pairs: int, seq_len: int, steps: int, scan_layers: bool = True,
                  **model_overrides) -> dict:
    """One fresh engine at (pairs, seq_len); model_overrides set config.model fields (dtype, remat_policy, ...)."""
    family, hidden, layers, heads, inter, vocab = MODELS[model_name]
    c = default_run_config()
    m = c.model
    m.family, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = family, hidden, layers, heads, inter
    m.max_position_embeddings, m.scan_layers = max(seq_len, 128), scan_layers
    for key, value in model_overrides.items():
        m[key] = value
    c.train.global_batch_pairs, c.mesh.data = pairs, 1
    c.data.layout = "pairs"  # a row per response: T is the sequence length the sweep names
    c.optimizer.name, c.optimizer.warmup_steps = "adamw", 0
    model = random_model_config(m, vocab)
    engine = build_engine(c, model, lambda: init_params(model, jax.random.key(0)), devices=jax.devices()[:1])
    batch = engine.shard_batch(synthetic_batch(pairs, seq_len, vocab, prompt_len=3 * seq_len // 8))
    t = time.perf_counter()
    compiled = engine.train_step.lower(engine.state, batch).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state, times = engine.state, []
    for i in range(steps + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    flops = train_step_flops(model, 2 * pairs, seq_len)
    return {"model": model_name, "pairs": pairs, "seq_len": seq_len, "tokens_per_step": 2 * pairs * seq_len,
            "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": 2 * pairs * seq_len / step_s, "model_tflops_per_step": flops / 1e12,
            "xla_tflops_per_step": float(cost.get("flops", 0.0)) / 1e12, "achieved_gflops": flops / step_s / 1e9,
            "memory_mib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes) / 2**20,
            "temp_mib": mem.temp_size_in_bytes / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-6x512", choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-lens", default="128,256,512,1024,2048")
    p.add_argument("--batch-pairs", default="2,4,8,16,32")
    p.add_argument("--layouts", action="store_true",
                   help="also compare layer layouts and remat policies at 8 pairs x 128 (the optimisation record)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    peak = measure_matmul_peak()
    print(f"measured matmul peak: {peak['peak_gflops']:.1f} GFLOP/s on {peak['device']}", flush=True)
    points = []

    def run(sweep, pairs, seq_len, **kw):
        r = {"sweep": sweep, **measure_point(args.model, pairs, seq_len, args.steps, **kw), **kw}
        r["fraction_of_peak"] = r["achieved_gflops"] / peak["peak_gflops"]
        points.append(r)
        extra = f" | scan {kw['scan_layers']}, remat {kw['remat_policy']}" if kw else ""
        print(f"{sweep:8s} pairs {pairs:3d} T {seq_len:5d} | compile {r['compile_s']:5.1f} s | step "
              f"{r['step_s']:7.3f} s | {r['tokens_per_s']:8,.0f} tok/s | {r['achieved_gflops']:6.1f} GFLOP/s = "
              f"{100 * r['fraction_of_peak']:4.1f}% of peak | memory {r['memory_mib']:7,.0f} MiB{extra}", flush=True)

    for t in map(int, args.seq_lens.split(",")):
        run("seq_len", max(2048 // t, 1), t)
    for b in map(int, args.batch_pairs.split(",")):
        run("batch", b, 128)
    if args.layouts:
        for scan, remat in ((False, "none"), (True, "none"), (True, "dots_no_batch"), (True, "dots")):
            run("layout", 8, 128, scan_layers=scan, remat_policy=remat)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", "bench/dpo_scaling.py", *sys.argv[1:]]), "model": args.model,
                       "matmul_peak": peak, "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
