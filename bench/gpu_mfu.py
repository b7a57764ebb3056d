"""MFU of the DPO train step on an accelerator: bfloat16 compute, float32 master weights, a ~1B Llama shape.

    python bench/gpu_mfu.py [--pairs 8] [--seq-len 1024] [--remat none,dots,full] [--out docs/bench/gpu_mfu.json]

For each remat policy: compile seconds, compiled memory, median step seconds, tokens/s and MFU against the
device's dense bf16 peak (`dpo_jax.flops.peak_tflops`, or --peak-tflops), plus the measured bf16 matmul peak of
this device for comparison. `--model tiny` runs the same code in seconds on a CPU (a check that the script works).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from dpo_jax.flops import peak_tflops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_scaling import MODELS, measure_point  # noqa: E402
from matmul_peak import matmul_gflops  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="none,dots_no_batch,full")
    p.add_argument("--attention", default="", help='"" (XLA picks), "xla" or "cudnn"')
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the spec-sheet peak")
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    n = 8192 if device.platform != "cpu" else 1024
    measured = matmul_gflops(n, n, n, dtype=args.dtype) / 1e3
    print(f"{device.device_kind}: spec peak {peak or 'unknown'} TFLOP/s, measured {args.dtype} matmul "
          f"{measured:.1f} TFLOP/s", flush=True)
    points = []
    for policy in args.remat.split(","):
        try:
            r = measure_point(args.model, args.pairs, args.seq_len, args.steps, dtype=args.dtype,
                              remat_policy=policy, attention_impl=args.attention)
        except Exception as e:  # e.g. out of memory without remat: record it and go on
            print(f"remat {policy}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            points.append({"remat_policy": policy, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        r["remat_policy"] = policy
        r["mfu"] = r["achieved_gflops"] / 1e3 / peak if peak else None
        r["fraction_of_measured_matmul"] = r["achieved_gflops"] / 1e3 / measured
        points.append(r)
        print(f"remat {policy:14s} | compile {r['compile_s']:5.1f} s | step {r['step_s']:.3f} s | "
              f"{r['tokens_per_s']:,.0f} tok/s | {r['achieved_gflops'] / 1e3:.1f} TFLOP/s | MFU "
              f"{100 * r['mfu']:.1f}% | memory {r['memory_mib'] / 1024:.1f} GiB" if peak else
              f"remat {policy}: step {r['step_s']:.3f} s, {r['achieved_gflops']:.1f} GFLOP/s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", "bench/gpu_mfu.py", *sys.argv[1:]]),
                       "device": device.device_kind, "spec_peak_tflops": peak, "measured_matmul_tflops": measured,
                       "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
