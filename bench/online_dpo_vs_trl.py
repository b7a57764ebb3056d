"""Online DPO throughput, dpo_jax vs TRL's OnlineDPOTrainer, in one invocation on one machine.

    python bench/online_dpo_vs_trl.py [--steps 8] [--repeats 2] [--systems ours,trl,trl_cache] [--compile-cache DIR]
        [--work-dir DIR] [--out docs/bench/online_dpo_vs_trl.json]

Both systems run the same online-DPO job: the DPO bench's GPT-2-shaped model (6 layers, width 512, vocab 8192,
random init written once as an HF checkpoint) as policy and π_ref, the PPO bench's reward model (the same body + a
seeded score head, an HF *ForSequenceClassification checkpoint) as the scorer, the DPO bench's 48-token prompts,
8 prompts a step, k = 2 completions each of up to 53 new tokens at temperature 0.9 (TRL's defaults), the sigmoid
loss at β 0.1, AdamW lr 5e-7 constant, clip 1.0, float32 on the CPU, no vLLM, logging every step, a checkpoint at
the end. A step is sampling, scoring, the reference pass and the update; sampling and scoring are timed on their
own (TRL: `_generate`, `_calculate_rewards_from_functions`; ours: the sampler, the scorer, the reference pass), and
the update is the rest of the step. Runs are fresh processes, interleaved (ours, TRL, ours, ...).

TRL runs trl==1.16.0 (OnlineDPOTrainer in trl.experimental.online_dpo) in the DPO bench's virtualenv under the work
directory, twice a repeat: `trl` on OnlineDPOConfig's defaults, which turn gradient checkpointing on and with it the
sampler's KV cache off (every new token recomputes the whole sequence), and `trl_cache` with
gradient_checkpointing=False (the KV cache on: TRL's fastest setting on this machine, the fairer peer). Ours runs
`dpo-jax train` with train.mode = "online_dpo" on the defaults but for the job's settings (the first run prints the
config keys that differ), with an empty compile cache per run (cold) unless --compile-cache shares one (repeat 0 fills
it).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dpo_vs_trl as common  # noqa: E402  (the shared inputs and the TRL virtualenv)
import ppo_vs_trl  # noqa: E402  (the reward model)

PROMPTS_PER_STEP, RESPONSE_TOKENS, TEMPERATURE = 8, 53, 0.9


def run_ours(s: dict) -> dict:
    t_start = time.perf_counter()
    import jax

    from dpo_jax import compile_cache
    from dpo_jax.rlhf import online_dpo
    from dpo_jax.train import reference_source
    from dpo_jax.train import run as train_run

    t_imported = time.perf_counter()
    phases: dict[str, list[float]] = {"sampling_s": [], "scoring_s": [], "reference_s": []}

    def timed(owner, name: str, key: str, block: bool = False) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = original(*a, **k)
            if block:
                jax.block_until_ready(out)
            phases[key].append(time.perf_counter() - t)
            return out
        setattr(owner, name, wrapper)

    timed(online_dpo, "sample_n", "sampling_s", block=True)
    timed(online_dpo, "score_samples", "scoring_s")  # the scorer's pass and the host's pair bookkeeping
    timed(reference_source.PerBatchReference, "attach", "reference_s")  # returns host arrays: already waited for
    run_dir = tempfile.mkdtemp(prefix="ours_run_", dir=s["work_dir"])
    c = train_run.default_run_config()
    m, d, t, o = c.model, c.data, c.train, c.optimizer
    m.source, m.path = "hf", s["model_dir"]
    d.train_path, d.tokenizer, d.cache_dir = s["data_path"], s["tokenizer_dir"], os.path.join(run_dir, "cache")
    d.max_length, d.max_prompt_length, d.layout = 128, 48, "pairs"
    c.train.mode, c.dpo.reference, c.dpo.loss_type, c.dpo.beta = "online_dpo", "per_batch", "sigmoid", s["beta"]
    c.online.samples_per_prompt, c.online.max_new_tokens, c.online.temperature = 2, s["response_tokens"], \
        s["temperature"]
    c.online.reward_kind, c.online.reward_model.source, c.online.reward_model.path = "model", "hf", s["rm_dir"]
    t.global_batch_pairs, t.steps, t.seed = s["prompts"], s["steps"], s["seed"]
    t.log_every, t.save_every, t.eval_every, t.eval_samples = 1, s["steps"], 0, 0
    t.run_dir, t.tensorboard = run_dir, False
    o.name, o.learning_rate, o.warmup_steps, o.schedule = "adamw", s["learning_rate"], 0, "constant"
    o.weight_decay, o.clip_grad_norm = 0.0, s["clip_grad_norm"]
    compile_cache.configure(d.cache_dir)  # as `dpo-jax train` does: here empty, unless shared
    differs = common.config_changes(c, train_run.default_run_config())
    t0 = time.perf_counter()
    online_dpo.train_online(c)
    t_end = time.perf_counter()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"split": "train"' in line]
    logged = {k: [r[k] for r in records] for k in ("objective/scores", "objective/kl", "rewards/accuracies", "loss")
              if records and k in records[0]}
    return {"system": "ours", "end_to_end_s": t_end - t0, "import_s": t_imported - t_start,
            "iteration_s": [r["num_tokens"] / r["tokens_per_second"] for r in records], **phases, "logged": logged,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "versions": {"jax": jax.__version__}, "config": differs}


def steady(xs: list[float]) -> float:
    return statistics.median(xs[2:] if len(xs) > 4 else xs)


def split(run: dict) -> dict:
    """Steady seconds per step: sampling, scoring, reference pass (ours; TRL's sits in its update), the update."""
    parts = {k: steady(run[k]) for k in ("sampling_s", "scoring_s", "reference_s") if run.get(k)}
    parts["update_s"] = steady(run["iteration_s"]) - sum(parts.values())
    return parts


def main() -> None:
    p = common.peer_parser(__doc__, "online_dpo_vs_trl", "ours,trl,trl_cache")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_ours(json.loads(args.worker))), flush=True)
        return
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    systems = [x for x in ("ours", "trl", "trl_cache") if x in args.systems.split(",")]
    # the DPO bench's virtualenv (trl 1.16.0), shared rather than built twice
    python = common.trl_python(os.path.join(os.path.dirname(work_dir), "dpo_vs_trl")) if systems != ["ours"] else None
    s = dict(work_dir=work_dir, tokenizer_dir=os.path.join(work_dir, "tokenizer"),
             model_dir=os.path.join(work_dir, "model"), rm_dir=os.path.join(work_dir, "reward_model"),
             data_path=os.path.join(work_dir, "pairs.jsonl"), model=common.MODEL, steps=args.steps, seed=args.seed,
             prompts=PROMPTS_PER_STEP, samples_per_prompt=2, response_tokens=RESPONSE_TOKENS, temperature=TEMPERATURE,
             beta=0.1, learning_rate=5e-7, clip_grad_norm=1.0)
    for d in (s["tokenizer_dir"], s["model_dir"], s["rm_dir"]):
        shutil.rmtree(d, ignore_errors=True)
    common.write_tokenizer(s["tokenizer_dir"], common.MODEL["vocab_size"])
    common.write_checkpoint(s["model_dir"], args.seed, s["tokenizer_dir"])
    ppo_vs_trl.write_reward_model(s["model_dir"], s["rm_dir"], args.seed)
    common.write_pairs(s["data_path"], args.steps * PROMPTS_PER_STEP, common.MODEL["vocab_size"], args.seed)
    env = common.peer_env(work_dir, args.compile_cache)
    runs = []
    for rep in range(args.repeats):
        for system in systems:
            script = os.path.abspath(__file__) if system == "ours" else os.path.join(HERE, "trl_online_dpo_worker.py")
            worker = {**s, "system": system, "gradient_checkpointing": system == "trl"}
            r = common.launch(sys.executable if system == "ours" else python, script, worker, env)
            r["repeat"], r["split"] = rep, split(r)
            runs.append(r)
            if system == "ours" and rep == 0:  # which flags made our numbers (paths are this run's)
                print("ours: config as run, where it differs from the defaults: " +
                      " ".join(f"{k}={v}" for k, v in r["config"].items()), flush=True)
            print(f"repeat {rep} {system:5s} end-to-end {r['end_to_end_s']:6.1f} s | steady step "
                  f"{steady(r['iteration_s']):.2f} s = " + " + ".join(f"{k[:-2]} {v:.2f}" for k, v in
                                                                     r["split"].items()) +
                  f" | peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
        common.clean_work_dir(work_dir)
    ratios = []
    for rep in range(args.repeats if "ours" in systems else 0):
        ours = next(r for r in runs if r["repeat"] == rep and r["system"] == "ours")
        row = {"repeat": rep}
        for peer in (r for r in runs if r["repeat"] == rep and r["system"] != "ours"):
            row.update({f"{peer['system']}_end_to_end": peer["end_to_end_s"] / ours["end_to_end_s"],
                        f"{peer['system']}_steady_step": steady(peer["iteration_s"]) / steady(ours["iteration_s"]),
                        f"{peer['system']}_sampling": peer["split"]["sampling_s"] / ours["split"]["sampling_s"]})
        ratios.append(row)
    median = {k: statistics.median(r[k] for r in ratios) for k in (ratios[0] if ratios else ()) if k != "repeat"}
    for r in ratios:
        print(f"repeat {r['repeat']} (peer time / ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()
                                                                      if k != "repeat"))
    print("median ratios:", json.dumps({k: round(v, 3) for k, v in median.items()}))
    common.write_result(args.out, s, ratios=ratios, median_ratios=median, runs=runs)


if __name__ == "__main__":
    main()
