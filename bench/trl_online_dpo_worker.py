"""One TRL OnlineDPOTrainer run for bench/online_dpo_vs_trl.py, inside the TRL virtualenv that script creates.

Standalone on purpose: torch/trl/transformers only; settings as JSON in argv[1]; prints one JSON line of timings.
TRL 1.16 keeps OnlineDPOTrainer under trl.experimental.online_dpo. OnlineDPOConfig turns gradient checkpointing on by
default, and with it the generation's KV cache off; the bench runs it both ways (s["gradient_checkpointing"]).
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
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    datasets.disable_progress_bars()
    t_imported = time.perf_counter()
    torch.manual_seed(s["seed"])
    phases: dict[str, list[float]] = {"sampling_s": [], "scoring_s": []}

    def timed(name: str, key: str) -> None:
        original = getattr(OnlineDPOTrainer, name)

        def wrapper(self, *a, **k):
            t = time.perf_counter()
            out = original(self, *a, **k)
            phases[key].append(time.perf_counter() - t)
            return out
        setattr(OnlineDPOTrainer, name, wrapper)

    timed("_generate", "sampling_s")
    timed("_calculate_rewards_from_functions", "scoring_s")
    iteration: list[float] = []
    logged: dict[str, list[float]] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            iteration.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("objective/scores", "objective/kl", "rewards/accuracies", "loss"):
                if logs and key in logs:
                    logged.setdefault(key, []).append(float(logs[key]))

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], padding_side="left")
    with open(s["data_path"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    train = datasets.Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(s["rm_dir"], num_labels=1, dtype=torch.float32)
    args = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_run_", dir=s["work_dir"]), per_device_train_batch_size=s["prompts"],
        gradient_accumulation_steps=1, max_steps=s["steps"], max_new_tokens=s["response_tokens"],
        temperature=s["temperature"], beta=[s["beta"]], loss_type="sigmoid", learning_rate=s["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=s["clip_grad_norm"],
        logging_steps=1, save_strategy="steps", save_steps=s["steps"], report_to="none", use_cpu=True, bf16=False,
        fp16=False, seed=s["seed"], dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=s["gradient_checkpointing"])
    trainer = OnlineDPOTrainer(model=policy, ref_model=ref, reward_funcs=reward, args=args, train_dataset=train,
                               processing_class=tokenizer, reward_processing_classes=tokenizer, callbacks=[Timer()])
    trainer.train()
    t_end = time.perf_counter()
    print(json.dumps({"system": s["system"], "end_to_end_s": t_end - t0, "import_s": t_imported - t_start,
                      "iteration_s": iteration, **phases, "logged": logged,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
