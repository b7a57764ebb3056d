"""What LoRA saves: the compiled memory of a ~1B DPO step, full fine-tuning vs rank-16 adapters, and the step time
on the CPU bench model.

    python bench/lora_cost.py [--out docs/bench/lora_cost.json] [--steps 8] [--skip-memory] [--skip-speed]

Memory (nothing is allocated: the train step is lowered on abstract arrays and compiled for one device, then read
with `memory_analysis()`): Llama-3.2-1B's shape (16 layers, width 2048, 32 heads / 8 KV heads, SwiGLU 8192,
vocabulary 128,256, tied embeddings: 1.24 B parameters), one step of 4 pairs at 1,024 tokens a row (two rows per
pair), AdamW, scanned layers, full remat. Variants:
  full        every weight trains (float32 weights and AdamW moments), the reference precomputed (a table: no
              reference weights on device during training);
  lora16      rank 16 on q, k, v, o, gate, up, down (alpha 32), float32 base, dpo.reference = base (the
              reference forward inside the step, adapters off: no copy);
  lora16_bf16 the same with the frozen base held and computed in bfloat16 (adapters float32).
For each: parameter, optimizer-state and trainable bytes from the abstract state, and the compiled step's argument,
temporary, output and aliased bytes; peak = arguments + temporaries + outputs − aliased (donated state).

Speed: the Llama-shaped bench model (PRESETS["llama-bench"]: 6 × 512, SwiGLU 2048, vocabulary 8192, float32) on
bench/step_variants.py's batch (8 pairs of 48 + 2 × 80 tokens, shared-prompt rows), variants taking turns, the
median step over the rounds after the first two: full (precomputed reference), lora16 with the precomputed
reference, lora16 with the base reference (one more forward per step, no precompute pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from dpo_jax import sharding
from dpo_jax.data.layout import get_layout
from dpo_jax.models import lora
from dpo_jax.models.config import PRESETS, shaped_config
from dpo_jax.models.decoder import init_params, logical_axes
from dpo_jax.train.engine import build_engine, step_config
from dpo_jax.train.model_source import random_model_config
from dpo_jax.train.run import default_run_config
from dpo_jax.train.state import TrainState, make_optimizer
from dpo_jax.train.step import make_steps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_variants import PAIRS, VOCAB, bench_batch  # noqa: E402

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, intermediate_size=8192)


def _lora(model, dtype: str | None = None):
    out = model.replace(lora_rank=16, lora_alpha=32.0, lora_targets=TARGETS)
    return out if dtype is None else out.replace(dtype=dtype, param_dtype=dtype)


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_memory(model, reference: str, pairs: int = 4, seq_len: int = 1024) -> dict:
    """The train step lowered on abstract state and batch (the production `make_steps`), compiled, measured."""
    c = default_run_config()
    c.train.global_batch_pairs, c.mesh.data, c.data.layout, c.dpo.reference = pairs, 1, "pairs", reference
    c.optimizer.name, c.optimizer.warmup_steps = "adamw", 0
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    rules, sc = c.mesh.rules, step_config(c, model)
    optimizer, schedule = make_optimizer(c.optimizer)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(
        lora.trainable(p, model)[1])), params)
    p_shardings = sharding.param_shardings(logical_axes(model), params, mesh, rules)
    s_shardings = sharding.state_shardings(state, p_shardings, params, mesh)
    train_step, _ = make_steps(sc, optimizer, schedule, mesh, rules, s_shardings)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, s_shardings)
    rows = 2 * pairs
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len) if n == 2 else (pairs,), jnp.int32 if n == 2 else jnp.float32,
                                     sharding=sharding.batch_sharding(mesh, rules, n))
             for k, n in sc.batch_keys().items()}
    t = time.perf_counter()
    mem = train_step.lower(abstract_state, batch).compile().memory_analysis()
    trained = lora.trainable(params, model)[1]
    return {"parameters": sum(x.size for x in jax.tree.leaves(params)), "params_bytes": _bytes(params),
            "trainable_params": sum(x.size for x in jax.tree.leaves(trained)),
            "optimizer_state_bytes": _bytes(state.opt_state),
            "trainable_state_bytes": _bytes(trained) + _bytes(state.opt_state),
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "peak_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes, "compile_s": time.perf_counter() - t}


def step_times(steps: int) -> dict:
    """The bench model's step, full fine-tuning vs LoRA, taking turns."""
    c = default_run_config()
    c.model.update(PRESETS["llama-bench"])
    c.train.global_batch_pairs, c.mesh.data, c.data.layout = PAIRS, 1, "shared_prompt"
    c.optimizer.name, c.optimizer.warmup_steps = "adamw", 0
    base = random_model_config(c.model, VOCAB)
    variants = {"full": (base, "precompute"), "lora16_precomputed": (_lora(base), "precompute"),
                "lora16_base_reference": (_lora(base), "base")}
    engines, batches, states = {}, {}, {}
    for name, (model, reference) in variants.items():
        c.dpo.reference = reference
        engines[name] = build_engine(c, model, lambda m=model: init_params(m, jax.random.key(0)),
                                     devices=jax.devices()[:1], layout=get_layout("shared_prompt"), score_window=160)
        batches[name] = engines[name].shard_batch(bench_batch())
        states[name] = engines[name].state
    times = {name: [] for name in variants}
    for _ in range(steps + 2):
        for name, e in engines.items():
            t = time.perf_counter()
            states[name], metrics = e.train_step(states[name], batches[name])
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
    return {name: {"step_s": statistics.median(ts[2:]), "times": ts} for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    out: dict = {"command": " ".join(["python", "bench/lora_cost.py", *sys.argv[1:]])}
    if not args.skip_memory:
        full = shaped_config("llama", **LLAMA_1B, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                             scan_layers=True, remat_policy="full", max_position_embeddings=1024)
        out["memory"] = {}
        for name, (model, reference) in {"full": (full, "precompute"), "lora16": (_lora(full), "base"),
                                         "lora16_bf16": (_lora(full, "bfloat16"), "base")}.items():
            r = out["memory"][name] = compiled_memory(model, reference)
            gib = {k: v / 2**30 for k, v in r.items() if k.endswith("_bytes")}
            print(f"{name:12s} params {r['parameters'] / 1e9:.2f} B ({gib['params_bytes']:.2f} GiB), trainable "
                  f"{r['trainable_params'] / 1e6:7.1f} M | trainable + optimizer {gib['trainable_state_bytes']:6.3f} "
                  f"GiB | arguments {gib['argument_bytes']:6.2f} temporaries {gib['temp_bytes']:6.2f} peak "
                  f"{gib['peak_bytes']:6.2f} GiB | compile {r['compile_s']:.0f} s", flush=True)
        m = out["memory"]
        out["memory_ratios"] = {f"{n}_trainable_state_vs_full": m[n]["trainable_state_bytes"]
                                / m["full"]["trainable_state_bytes"] for n in ("lora16", "lora16_bf16")}
        out["memory_ratios"] |= {f"{n}_peak_vs_full": m[n]["peak_bytes"] / m["full"]["peak_bytes"]
                                 for n in ("lora16", "lora16_bf16")}
        print(json.dumps(out["memory_ratios"], indent=1), flush=True)
    if not args.skip_speed:
        out["speed"] = step_times(args.steps)
        for name, r in out["speed"].items():
            print(f"{name:24s} step {r['step_s']:.3f} s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
