"""dpo-jax train --config configs/sft_hh.py:model=pythia-2.8b --config.model.path=/models/pythia-2.8b --config.data.train_path=/data/hh-rlhf/train.jsonl.gz --config.data.eval_path=/data/hh-rlhf/test.jsonl.gz

Expected: the DPO paper's reference model — Pythia-2.8B fine-tuned on the preferred responses of Anthropic HH (one
epoch, ~2,500 steps of 64 pairs); eval logps/chosen rises while loss (token NLL) falls. Export it with
`dpo-jax export --run runs/sft_hh_pythia-2.8b --to-hf OUT` and use OUT as configs/dpo_hh.py's model.path.

Recipe (paper §6 / the authors' code): RMSprop, lr 1e-6 with 150 linear warmup steps then constant, batch 64,
max_length 512, max_prompt_length 256, HH truncation keep_end, gradient-norm clip 10. bf16 compute, float32
params and optimizer state, FSDP over all devices. ARG: model=pythia-1.4b|pythia-2.8b|pythia-6.9b (micro-batching).
"""

from dpo_jax.commands.train import default_run_config
from dpo_jax.config import parse_arg

MICRO_BATCHES = {"pythia-1.4b": 1, "pythia-2.8b": 2, "pythia-6.9b": 4}


def hh_config(arg, mode: str, name: str):
    a = parse_arg(arg, {"model": "pythia-2.8b"}, f"configs/{name}.py")
    if a["model"] not in MICRO_BATCHES:
        raise ValueError(f"configs/{name}.py: model={a['model']!r}; valid: {', '.join(MICRO_BATCHES)}")
    c = default_run_config()
    c.model.source, c.model.dtype, c.model.remat_policy, c.model.scan_layers = "hf", "bfloat16", "full", True
    c.data.format, c.data.max_length, c.data.max_prompt_length = "hh", 512, 256
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.mode = mode
    c.train.global_batch_pairs, c.train.micro_batches = 64, MICRO_BATCHES[a["model"]]
    c.train.steps, c.train.log_every, c.train.save_every, c.train.eval_every = 2500, 10, 250, 250
    c.train.eval_samples, c.train.sample_max_new_tokens = 8, 128
    c.train.run_dir = f"runs/{name}_{a['model']}"
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = "rmsprop", 1e-6, 150
    c.optimizer.clip_grad_norm = 10.0
    return c


def get_config(arg=None):
    return hh_config(arg, "sft", "sft_hh")
