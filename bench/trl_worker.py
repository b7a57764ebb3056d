"""One TRL DPOTrainer (mode "reward": RewardTrainer) run for bench/dpo_vs_trl.py, in the TRL virtualenv it creates.

Standalone on purpose: it imports torch/trl/transformers only (never dpo_jax or JAX), reads its settings as JSON
from argv[1] and prints one JSON line of timings. Run it through bench/dpo_vs_trl.py, not by hand.
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
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    datasets.disable_progress_bars()
    t_imported = time.perf_counter()
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"])
    with open(s["data_path"]) as f:
        rows = [json.loads(line) for line in f]
    train = datasets.Dataset.from_list(rows)

    phases: dict[str, float] = {}
    original_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):  # TRL's whole reference pass, caching included
        t = time.perf_counter()
        out = original_precompute(self, *args, **kwargs)
        phases["reference_s"] = phases.get("reference_s", 0.0) + time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    reward = s.get("mode") == "reward"
    Trainer = RewardTrainer if reward else DPOTrainer
    original_prepare = Trainer._prepare_dataset

    def timed_prepare(self, *args, **kwargs):
        t = time.perf_counter()
        out = original_prepare(self, *args, **kwargs)
        phases["data_s"] = phases.get("data_s", 0.0) + time.perf_counter() - t
        return out

    Trainer._prepare_dataset = timed_prepare

    step_times: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="trl_run_", dir=s["work_dir"])
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=s["pairs"], gradient_accumulation_steps=1,
        max_steps=s["steps"], num_train_epochs=1, learning_rate=s["learning_rate"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=s["clip_grad_norm"], max_length=s["max_length"],
        logging_steps=1, save_strategy="steps", save_steps=s["steps"], report_to="none", use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, seed=s["seed"], disable_tqdm=True)
    if reward:  # the causal LM's body + a fresh score head, as a reward model starts from its SFT policy
        model = AutoModelForSequenceClassification.from_pretrained(s["model_dir"], num_labels=1, dtype=torch.float32)
        args = RewardConfig(**common)
    else:
        model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
        args = DPOConfig(**common, beta=s["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=s["precompute"])
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      callbacks=[StepTimer()])
    t_built = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    first = trainer.train_dataset[0]
    print(json.dumps({
        "system": "trl_precompute" if s["precompute"] and not reward else "trl_default",
        "end_to_end_s": t_end - t0,
        "setup_s": t_built - t0,
        "train_s": t_end - t_built,
        "import_s": t_imported - t_start,
        "data_s": phases.get("data_s", 0.0),
        "reference_s": phases.get("reference_s", 0.0),
        "step_s": step_times,
        "losses": losses,
        "tokens": {"prompt": len(first.get("prompt_ids", [])), "chosen": len(first["chosen_ids"]),
                   "rejected": len(first["rejected_ids"])},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__,
                     "transformers": __import__("transformers").__version__},
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
