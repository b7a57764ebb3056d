"""DPO throughput, dpo_jax vs Tunix's DPOTrainer (Google's JAX post-training library), on one machine.

    python bench/dpo_vs_tunix.py [--lengths fixed|ragged] [--batch-tokens N] [--steps 16] [--repeats 2]
        [--systems ours,tunix] [--work-dir DIR] [--out FILE.json]

Both systems train a Llama-shaped model of the TRL bench's size (6 layers, width 512, 8 heads, SwiGLU 2048, vocab
8192, random init, float32 on the CPU, one device) with the sigmoid DPO loss on the same synthetic pairs and
tokenizer as bench/dpo_vs_trl.py (fixed 48 + 80 tokens, or its HH-shaped ragged lengths), 8 pairs a step, AdamW
lr 1e-6 linear decay, clip 1.0, a checkpoint at the end; fresh processes, interleaved, ratios per repeat.

Ours: `dpo-jax train` with its defaults (packed rows, precomputed reference); `--batch-tokens N` adds token-budget
batches (one epoch of the same pairs; steps then compared per pair). Tunix 0.1.7 (bench/tunix_worker.py): its
Llama3, a frozen copy as the reference (forward inside every step, as Tunix does), pre-tokenized batches padded to
the data's longest prompt and response (static shapes). Tunix runs in its own virtualenv under the work directory
(google-tunix and this environment's jax version), never a dependency of dpo_jax. Step times: ours from its metric
lines; Tunix's from the intervals at which its loop takes batches (its loop runs at most two steps ahead, so in
steady state the interval is the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dpo_vs_trl as trl_bench  # noqa: E402  (the shared inputs and the launcher)

TUNIX_VERSION = "0.1.7"
SYSTEMS = ("ours", "tunix")


def main() -> None:
    import jax

    from dpo_jax.models.config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", default="fixed", choices=("fixed", "ragged"))
    p.add_argument("--batch-tokens", type=int, default=0, help="ours: config.train.global_batch_tokens")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--work-dir", default=os.path.join(os.path.dirname(trl_bench.default_work_dir()), "dpo_vs_tunix"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.layout, args.seq_len, args.scan_layers, args.mode = "packed", 0, True, "dpo"

    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    python = trl_bench.venv_python(os.path.join(work_dir, "tunix-venv"),
                                   [f"google-tunix=={TUNIX_VERSION}", f"jax=={jax.__version__}"])
    s = trl_bench.settings(args, work_dir)
    llama = {f.name: f.default for f in dataclasses.fields(ModelConfig)}  # the Llama defaults our exporter writes
    s["model"] = {**trl_bench.MODEL, "family": "llama", "num_kv_heads": trl_bench.MODEL["num_heads"],
                  "rope_theta": llama["rope_theta"], "norm_eps": llama["norm_eps"]}
    shutil.rmtree(s["tokenizer_dir"], ignore_errors=True)
    trl_bench.write_tokenizer(s["tokenizer_dir"], trl_bench.MODEL["vocab_size"])
    trl_bench.write_checkpoint(s["model_dir"], args.seed, s["tokenizer_dir"], family="llama")
    trl_bench.write_pairs(s["data_path"], args.steps * args.pairs, trl_bench.MODEL["vocab_size"], args.seed,
                          args.lengths)
    env = {**os.environ, "TMPDIR": work_dir, "HF_HOME": os.path.join(work_dir, "hf"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)
    runs = []
    for rep in range(args.repeats):
        for system in [x for x in SYSTEMS if x in args.systems.split(",")]:
            script = os.path.join(HERE, "dpo_vs_trl.py" if system == "ours" else "tunix_worker.py")
            r = trl_bench.launch(sys.executable if system == "ours" else python, script, s, env)
            r["repeat"] = rep
            runs.append(r)
            print(f"repeat {rep} {system:6s} end-to-end {r['end_to_end_s']:7.1f} s | reference "
                  f"{r['reference_s']:5.1f} s | steady step {trl_bench.steady(r['step_s']):.3f} s "
                  f"({r['pairs_per_step']:.2f} pairs) | first step {r['step_s'][0]:.2f} s | peak RSS "
                  f"{r['peak_rss_mib']:,.0f} MiB", flush=True)
        trl_bench.clean_work_dir(work_dir)
    ratios = []
    for rep in range(args.repeats):
        group = {r["system"]: r for r in runs if r["repeat"] == rep}
        if set(SYSTEMS) <= set(group):
            ours, tunix = group["ours"], group["tunix"]
            per_pair = lambda r: trl_bench.steady(r["step_s"]) / r["pairs_per_step"]  # noqa: E731
            ratios.append({"repeat": rep, "end_to_end": tunix["end_to_end_s"] / ours["end_to_end_s"],
                           "steady_step_per_pair": per_pair(tunix) / per_pair(ours)})
    medians = {k: statistics.median(r[k] for r in ratios) for k in ("end_to_end", "steady_step_per_pair")} \
        if ratios else {}
    for row in ratios:
        print(f"repeat {row['repeat']}: end to end {row['end_to_end']:.2f}x, steady step per pair "
              f"{row['steady_step_per_pair']:.2f}x")
    print("median ratios:", json.dumps({k: round(v, 3) for k, v in medians.items()}))
    trl_bench.write_result(args.out, s, summary={"ratios": ratios, "median_ratios": medians}, runs=runs)


if __name__ == "__main__":
    main()
