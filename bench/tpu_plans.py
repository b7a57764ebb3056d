"""docs/PERFORMANCE.md "Planned on TPU": real `dpo-jax plan` runs (compile-time estimates, no TPU) over presets,
full fine-tuning and LoRA DPO, sequence lengths and topologies.

    pip install -e ".[tpu]"
    python bench/tpu_plans.py [--rows NAME,NAME] [--out docs/bench/tpu_plans.json] [--table]

Each row is `dpo-jax plan --config configs/dpo_hh.py[:lora] --config.model.preset=P --config.data.layout=pairs
--config.data.max_length=T ... --topology X [--fit]` (64 pairs a step: the paper's batch, two rows of T tokens per
pair; bf16 compute; the reference precomputed, or with LoRA the base with adapters off). Results are appended to
--out as they finish (a row already there is skipped), so the matrix can be run a few rows at a time (or by two
processes at once: each reloads the file before writing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _packed_row(tokens: int, impl: str) -> tuple:
    """Llama-3-8B on a v5p-64, one packed row of `tokens` per data-parallel shard (32 shards), attention by our
    kernel or by XLA."""
    return ("llama3-8b", False, tokens, "v5p-64", 1, False,
            ["--config.data.layout=packed", f"--config.data.seq_buckets=({tokens},)",
             f"--config.train.global_batch_tokens={32 * tokens}",
             f"--config.model.attention_impl={'pallas' if impl == 'kernel' else 'xla'}"])


# name: (preset, lora, tokens per sequence, topology, slices, fit, extra overrides)
ROWS = {
    "llama3-8b-2k-v5p64-fit": ("llama3-8b", False, 2048, "v5p-64", 1, True, []),
    "llama3-8b-2k-v5e256-fit": ("llama3-8b", False, 2048, "v5e-256", 1, True, []),
    "llama3-8b-2k-v5e16": ("llama3-8b", False, 2048, "v5e-16", 1, False, []),
    "llama3-8b-2k-v5p64": ("llama3-8b", False, 2048, "v5p-64", 1, False, []),
    "llama3-8b-8k-v5p64": ("llama3-8b", False, 8192, "v5p-64", 1, False, ["--config.train.micro_batches=2"]),
    "llama3-8b-2k-2xv5p64": ("llama3-8b", False, 2048, "v5p-64", 2, False,
                             ["--config.mesh.dcn_data=2", "--config.train.micro_batches=1"]),
    "llama3-70b-lora-2k-v5p128": ("llama3-70b", True, 2048, "v5p-128", 1, False, []),
    "llama3.2-1b-2k-v6e8": ("llama3.2-1b", False, 2048, "v6e-8", 1, False, []),
    "qwen3-8b-lora-2k-v5e16": ("qwen3-8b", True, 2048, "v5e-16", 1, False, []),
    "mistral-7b-lora-8k-v6e8": ("mistral-7b", True, 8192, "v6e-8", 1, False, ["--config.train.micro_batches=8"]),
    "qwen3-0.6b-1k-v5p8": ("qwen3-0.6b", False, 1024, "v5p-8", 1, False, []),
    "gptj-6b-2k-v5e16": ("gptj-6b", False, 2048, "v5e-16", 1, False, []),
    "pythia-2.8b-2k-v5e16": ("pythia-2.8b", False, 2048, "v5e-16", 1, False, []),
    "llama3-8b-lora-2k-v5e16": ("llama3-8b", True, 2048, "v5e-16", 1, False, []),
    "gptj-6b-lora-2k-v5e16": ("gptj-6b", True, 2048, "v5e-16", 1, False, []),
    "llama3.2-1b-lora-8k-v6e8": ("llama3.2-1b", True, 8192, "v6e-8", 1, False, []),
    # the kernel's effect at long context: one packed row of 8k or 32k tokens per data-parallel shard
    **{f"llama3-8b-{tokens // 1024}k-packed-v5p64-{impl}": _packed_row(tokens, impl)
       for tokens in (8192, 32768) for impl in ("kernel", "xla")},
}


# PPO (configs/ppo_tldr.py: the paper's TL;DR baseline, 64 prompts of up to 512 tokens, 53 new tokens, 4 epochs):
# name: (policy and reward-model preset, topology, extra overrides)
PPO_ROWS = {
    "gptj-6b-ppo-tldr-v5p64": ("gptj-6b", "v5p-64", []),
    "llama3-8b-lora-ppo-tldr-v5e16": ("llama3-8b", "v5e-16", ["--config.policy.lora.rank=16",
                                                             "--config.policy.param_dtype=bfloat16"]),
}


def ppo_command(row: str, out: str) -> list[str]:
    preset, topology, extra = PPO_ROWS[row]
    return [sys.executable, "-m", "dpo_jax.main", "plan", "--config", "configs/ppo_tldr.py",
            f"--config.policy.preset={preset}", "--config.policy.source=random",
            f"--config.reward.model.preset={preset}", "--config.reward.model.source=random", *extra,
            "--topology", topology, "--out", out]


def command(row: str, out: str) -> list[str]:
    if row in PPO_ROWS:
        return ppo_command(row, out)
    preset, lora, tokens, topology, slices, fit, extra = ROWS[row]
    args = [sys.executable, "-m", "dpo_jax.main", "plan", "--config", "configs/dpo_hh.py" + (":lora" if lora else ""),
            f"--config.model.preset={preset}", "--config.data.layout=pairs", f"--config.data.max_length={tokens}",
            f"--config.data.max_prompt_length={tokens // 2}", "--config.train.micro_batches=1",
            "--config.data.eval_path=", "--config.train.eval_samples=0", *extra, "--topology", topology,
            "--num_slices", str(slices), "--out", out]
    return args + (["--fit"] if fit else [])


def floor_at_model_flops(plan: dict) -> dict:
    """A row planned before the roofline's compute term was floored at flops.py's FLOPs (commit 03a4815): its
    step time was max(compiler FLOPs / peak, bytes / bandwidth), so max(that, model FLOPs / peak) is exactly what the
    current plan gives; tokens/s and MFU follow. Idempotent on newer rows."""
    peak = plan["run"]["devices"] * plan["run"]["peak_tflops_per_device"] * 1e12
    for program in plan["programs"].values():
        seconds = program["estimated_step_seconds"]
        if not seconds:
            continue
        floored = max(seconds, program["model_flops"] / peak)
        program["tokens_per_second"] *= seconds / floored
        program["estimated_step_seconds"] = floored
        program["estimated_mfu"] = program["model_flops"] / (floored * peak)
    return plan


def _estimated(program: dict, collectives: bool = True) -> bool:
    """Estimated the current way: past the compiler's loops with windowed matmul loops off (commit 0af9fde), with
    the collective term unless `collectives` is False (an older row shows memory and fits only until planned
    again)."""
    return bool(program.get("estimate_method") and program["estimated_step_seconds"]
                and (not collectives or "estimated_collective_seconds" in program))


def _dagger(program: dict) -> str:
    return "" if _estimated(program) else "†"


def table(results: dict) -> str:
    """The docs table: one line per planned row."""
    lines = ["| row | topology | fits | GiB/chip (of HBM) | step s* | ICI s* | tokens/s* | MFU* | "
             "FLOPs compiler / ours | `--fit` | plan took |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, plan in results.items():
        if row in PPO_ROWS:
            continue
        train = floor_at_model_flops(plan)["programs"]["train_step"]
        fit = " ".join(o.replace("--config.", "") for o in plan["fit"]["overrides"]) if plan.get("fit") else ""
        slices = f" × {plan['num_slices']}" if plan["num_slices"] > 1 else ""
        ratio = train["estimated_flops"] / train["model_flops"] if train["model_flops"] else 0.0
        if _estimated(train):
            ici = train["estimated_collective_seconds"]  # negative: an extrapolation that failed (PERFORMANCE.md)
            timing = (f"{train['estimated_step_seconds']:.2f} | {f'{ici:.2f}' if ici >= 0 else '?'} | "
                      f"{train['tokens_per_second']:,.0f} | {100 * train['estimated_mfu']:.0f} % | {ratio:.2f}")
        elif _estimated(train, collectives=False):  # planned before the collective term: compute and HBM only
            timing = (f"{train['estimated_step_seconds']:.2f}† | – | {train['tokens_per_second']:,.0f}† | "
                      f"{100 * train['estimated_mfu']:.0f} %† | {ratio:.2f}")
        else:  # not estimated (does not fit), or planned before the current estimate: memory and fits only
            timing = "– | – | – | – | –"
        lines.append(
            f"| {row} | {plan['topology']}{slices} ({plan['run']['devices']} chips) | "
            f"{'yes' if plan['fits'] else '**no**'} | "
            f"{train['total_bytes'] / 2**30:.1f} ({train['hbm_bytes'] / 2**30:.0f}) "
            f"| {timing} | {fit} | {plan['wall_seconds'] / 60:.0f} min |")
    return "\n".join(lines)


def ppo_table(results: dict) -> str:
    """The PPO rows: each program of an iteration, then the iteration."""
    lines = ["| row | topology | fits | program | GiB/chip (of HBM) | s* | ICI s* | MFU* | FLOPs compiler / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, plan in results.items():
        if row not in PPO_ROWS:
            continue
        if not all(_estimated(p, collectives=False) for p in plan["programs"].values()):
            continue  # planned before the current estimate
        for name, p in plan["programs"].items():
            ratio = p["estimated_flops"] / p["model_flops"] if p["model_flops"] else 0.0
            ici = f"{p['estimated_collective_seconds']:.2f}" if _estimated(p) else "–"
            lines.append(f"| {row} | {plan['topology']} ({plan['run']['devices']} chips) | "
                         f"{'yes' if p['fits'] else '**no**'} | {name} | {p['total_bytes'] / 2**30:.1f} "
                         f"({p['hbm_bytes'] / 2**30:.0f}) | {p['estimated_step_seconds']:.2f}{_dagger(p)} | {ici} | "
                         f"{100 * p['estimated_mfu']:.0f} % | {ratio:.2f} |")
        dagger = "" if all(_estimated(p) for p in plan["programs"].values()) else "†"
        lines.append(f"| {row} | | | **iteration** | | {plan['run']['estimated_iteration_seconds']:.2f}{dagger} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join([*ROWS, *PPO_ROWS]))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "tpu_plans.json"))
    parser.add_argument("--table", action="store_true", help="print the docs table of --out and stop")
    args = parser.parse_args()
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    if args.table:
        print(table(results) + "\n\n" + ppo_table(results))
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for row in args.rows.split(","):
        if row in results:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            plan_file = os.path.join(tmp, "plan.json")
            cmd = command(row, plan_file)
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if not os.path.exists(plan_file):
                print(f"{row}: failed ({done.returncode})\n{done.stderr[-2000:]}", flush=True)
                continue
            plan = json.load(open(plan_file))
        plan["command"] = " ".join(command(row, "plan.json")[2:])
        plan["wall_seconds"] = seconds
        results = json.load(open(args.out)) if os.path.exists(args.out) else {}  # another run may have added rows
        results[row] = plan
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        if row in PPO_ROWS:
            print(f"{row}: fits {plan['fits']}, iteration {plan['run']['estimated_iteration_seconds']:.2f} s*, "
                  f"{seconds:.0f} s", flush=True)
            continue
        train = plan["programs"]["train_step"]
        print(f"{row}: fits {plan['fits']}, {train['total_bytes'] / 2**30:.1f} GiB/chip, "
              f"{train['estimated_step_seconds']:.2f} s/step*, MFU* {100 * train['estimated_mfu']:.0f} %, "
              f"fit {plan['fit'] and plan['fit']['overrides']}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
