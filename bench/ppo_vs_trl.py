"""PPO throughput, dpo_jax vs TRL's PPOTrainer, in one invocation on one machine.

    python bench/ppo_vs_trl.py [--iterations 8] [--repeats 3] [--systems ours,trl] [--compile-cache DIR]
        [--work-dir DIR] [--out docs/bench/ppo_vs_trl.json]

Both systems run the same PPO job: the DPO bench's GPT-2-shaped model (6 layers, width 512, vocab 8192, random init
written once as an HF checkpoint) as policy and π_ref, a reward model made from it (the same body + a score head,
written once as an HF *ForSequenceClassification checkpoint) as reward and value model, prompts of 48 tokens,
8 prompts per iteration, responses of up to 53 tokens at temperature 0.7 (TRL's defaults), 4 PPO epochs in one
minibatch, KL coefficient 0.05, AdamW lr 1e-6, clip 1.0, float32 on the CPU, logging every iteration, a checkpoint
at the end. An iteration is a rollout (generation, policy / reference / value forward passes, reward-model scores)
plus the update; generation is timed separately. Runs are fresh processes, interleaved (ours, TRL, ours, ...).

TRL removed PPOTrainer after 1.12 (trl.experimental.ppo; huggingface/trl#7020), so its side runs trl==1.12.0 in its
own virtualenv under the work directory (with torch==2.13.0 and this environment's transformers).

Ours runs `dpo-jax ppo`'s defaults but for the job's settings above (the first run prints the config keys that
differ), with an empty compile cache per run (cold) unless --compile-cache shares one (repeat 0 fills it).
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

TRL_PPO_VERSION = "1.12.0"
PROMPT_TOKENS, RESPONSE_TOKENS, PROMPTS_PER_ITERATION = 48, 53, 8


def write_prompts(path: str, n: int, vocab_size: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in rng.integers(2, vocab_size, PROMPT_TOKENS))})
                    + "\n")


def write_reward_model(model_dir: str, out: str, seed: int) -> None:
    """The shared reward (and initial value) model: the policy checkpoint's body + a seeded score head."""
    import jax
    from transformers import AutoTokenizer

    from dpo_jax.convert.hf import load_hf_checkpoint, save_hf_checkpoint
    from dpo_jax.models.reward import as_reward_model

    config, params = load_hf_checkpoint(model_dir)
    config, params = as_reward_model(config, params, 0, jax.random.key(seed + 7))
    save_hf_checkpoint(config, params, out, extra_config={"bos_token_id": 1, "eos_token_id": 1})
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def run_ours(s: dict) -> dict:
    t_start = time.perf_counter()
    import jax

    from dpo_jax import compile_cache
    from dpo_jax.commands import ppo as ppo_run
    from dpo_jax.rlhf import ppo

    t_imported = time.perf_counter()
    generation: list[float] = []
    original = ppo.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = jax.block_until_ready(original(*a, **k))
        generation.append(time.perf_counter() - t)
        return out

    ppo.generate = timed_generate
    run_dir = tempfile.mkdtemp(prefix="ours_run_", dir=s["work_dir"])
    c = ppo_run.default_config()
    c.policy.source, c.policy.path = "hf", s["model_dir"]
    c.reward.model.source, c.reward.model.path, c.value_init = "hf", s["rm_dir"], "reward"
    c.prompts.path, c.prompts.max_prompt_length = s["prompts_path"], PROMPT_TOKENS
    c.ppo.max_new_tokens, c.ppo.temperature, c.ppo.kl_coef = RESPONSE_TOKENS, 0.7, 0.05
    t = c.train
    t.steps, t.batch_prompts, t.seed, t.log_every, t.save_every = s["iterations"], PROMPTS_PER_ITERATION, s["seed"], \
        1, s["iterations"]
    t.run_dir, t.tensorboard = run_dir, False
    o = c.optimizer
    o.name, o.learning_rate, o.warmup_steps, o.clip_grad_norm, o.weight_decay = "adamw", 1e-6, 0, 1.0, 0.0
    compile_cache.configure(os.path.join(run_dir, "cache"))  # as `dpo-jax ppo` does: here empty, unless shared
    t0 = time.perf_counter()
    ppo_run.main(c)
    t_end = time.perf_counter()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"system": "ours", "end_to_end_s": t_end - t0, "import_s": t_imported - t_start,
            "iteration_s": [r["num_tokens"] / r["tokens_per_second"] for r in records], "generation_s": generation,
            "scores": [r["objective/scores"] for r in records], "kl": [r["objective/kl"] for r in records],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "versions": {"jax": jax.__version__}, "config": common.config_changes(c, ppo_run.default_config())}


def steady(xs: list[float]) -> float:
    return statistics.median(xs[2:] if len(xs) > 4 else xs)


def main() -> None:
    p = common.peer_parser(__doc__, "ppo_vs_trl", "ours,trl")
    p.add_argument("--iterations", type=int, default=8)
    p.set_defaults(repeats=3)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_ours(json.loads(args.worker))), flush=True)
        return
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    systems = [x for x in ("ours", "trl") if x in args.systems.split(",")]
    python = common.trl_python(work_dir, TRL_PPO_VERSION, "trl-ppo-venv") if "trl" in systems else None
    s = dict(work_dir=work_dir, tokenizer_dir=os.path.join(work_dir, "tokenizer"),
             model_dir=os.path.join(work_dir, "model"), rm_dir=os.path.join(work_dir, "reward_model"),
             prompts_path=os.path.join(work_dir, "prompts.jsonl"), iterations=args.iterations, seed=args.seed,
             prompts_per_iteration=PROMPTS_PER_ITERATION, response_tokens=RESPONSE_TOKENS, mode="ppo")
    for d in (s["tokenizer_dir"], s["model_dir"], s["rm_dir"]):
        shutil.rmtree(d, ignore_errors=True)
    common.write_tokenizer(s["tokenizer_dir"], common.MODEL["vocab_size"])
    common.write_checkpoint(s["model_dir"], args.seed, s["tokenizer_dir"])
    write_reward_model(s["model_dir"], s["rm_dir"], args.seed)
    write_prompts(s["prompts_path"], args.iterations * PROMPTS_PER_ITERATION, common.MODEL["vocab_size"], args.seed)
    env = common.peer_env(work_dir, args.compile_cache)
    runs = []
    for rep in range(args.repeats):
        for system in systems:
            script = os.path.abspath(__file__) if system == "ours" else os.path.join(HERE, "trl_ppo_worker.py")
            r = common.launch(sys.executable if system == "ours" else python, script, s, env)
            r["repeat"] = rep
            runs.append(r)
            if system == "ours" and rep == 0:  # which flags made our numbers (paths are this run's)
                print("ours: config as run, where it differs from the defaults: " +
                      " ".join(f"{k}={v}" for k, v in r["config"].items()), flush=True)
            print(f"repeat {rep} {system:5s} end-to-end {r['end_to_end_s']:6.1f} s | steady iteration "
                  f"{steady(r['iteration_s']):.2f} s of which generation {steady(r['generation_s']):.2f} s | "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
        common.clean_work_dir(work_dir)
    ratios = []
    for rep in range(args.repeats if systems == ["ours", "trl"] else 0):
        ours, trl = (next(r for r in runs if r["repeat"] == rep and r["system"] == x) for x in ("ours", "trl"))
        ratios.append({"repeat": rep, "end_to_end": trl["end_to_end_s"] / ours["end_to_end_s"],
                       "steady_iteration": steady(trl["iteration_s"]) / steady(ours["iteration_s"]),
                       "generation": steady(trl["generation_s"]) / steady(ours["generation_s"])})
    median = {k: statistics.median(r[k] for r in ratios) for k in (ratios[0] if ratios else ()) if k != "repeat"}
    for r in ratios:
        print(f"repeat {r['repeat']}: end-to-end {r['end_to_end']:.2f}x, steady iteration {r['steady_iteration']:.2f}x,"
              f" generation {r['generation']:.2f}x (TRL time / ours)")
    print("median ratios:", json.dumps({k: round(v, 3) for k, v in median.items()}))
    common.write_result(args.out, s, ratios=ratios, median_ratios=median, runs=runs)

if __name__ == "__main__":
    main()
