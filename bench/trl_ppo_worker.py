"""One TRL PPOTrainer run for bench/ppo_vs_trl.py, inside the trl==1.12.0 virtualenv that script creates.

Standalone on purpose: torch/trl/transformers only; settings as JSON in argv[1]; prints one JSON line of timings.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time


def main() -> None:
    s = json.loads(sys.argv[1])
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_start = time.perf_counter()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    datasets.disable_progress_bars()
    t_imported = time.perf_counter()
    torch.manual_seed(s["seed"])
    generation: list[float] = []
    original = module.batch_generation

    def timed_generation(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        generation.append(time.perf_counter() - t)
        return out

    module.batch_generation = timed_generation
    iteration: list[float] = []
    scores: list[float] = []
    kl: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            iteration.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                scores.append(float(logs["objective/scores"]))
                kl.append(float(logs["objective/kl"]))

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], padding_side="left")
    with open(s["prompts_path"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    train = datasets.Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(s["rm_dir"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(s["rm_dir"], num_labels=1, dtype=torch.float32)
    n = s["prompts_per_iteration"]
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_run_", dir=s["work_dir"]), per_device_train_batch_size=n,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=4, total_episodes=s["iterations"] * n,
        local_rollout_forward_batch_size=n, response_length=s["response_tokens"], temperature=0.7, kl_coef=0.05,
        stop_token="eos", learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, num_sample_generations=0, logging_steps=1, save_strategy="steps",
        save_steps=s["iterations"], report_to="none", use_cpu=True, bf16=False, fp16=False, seed=s["seed"],
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train, value_model=value, callbacks=[Timer()])
    trainer.train()
    t_end = time.perf_counter()
    print(json.dumps({"system": "trl", "end_to_end_s": t_end - t0, "import_s": t_imported - t_start,
                      "iteration_s": iteration, "generation_s": generation, "scores": scores, "kl": kl,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
