"""One Tunix DPO run for bench/dpo_vs_tunix.py; runs inside the Tunix virtualenv, never imports dpo_jax.

    <tunix-venv>/bin/python bench/tunix_worker.py '<settings json>'

Tunix's DPOTrainer as its docs show it: a Llama3 `nnx` model and a frozen copy as the reference (Tunix computes the
reference log-probs for every batch inside the loop), pre-tokenized `TrainingInput` batches (prompts left-padded,
responses right-padded, to the data's longest prompt and response: static shapes, one compile), AdamW with the
bench's schedule and clipping, a checkpoint at the end. Prints one JSON line with its timings.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def main() -> None:
    s = json.loads(sys.argv[1])
    t_start = time.perf_counter()
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama
    from tunix.sft.dpo import dpo_trainer

    t_imported = time.perf_counter()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(s["tokenizer_dir"])
    with open(s["data_path"]) as f:
        rows = [json.loads(line) for line in f]
    eos = tok.eos_token_id
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"][-s["max_prompt_length"]:] for r in rows]
    room = [s["max_length"] - len(p) for p in prompts]
    chosen = [(tok(r["chosen"], add_special_tokens=False)["input_ids"] + [eos])[:n] for r, n in zip(rows, room)]
    rejected = [(tok(r["rejected"], add_special_tokens=False)["input_ids"] + [eos])[:n] for r, n in zip(rows, room)]
    p_len, r_len = max(map(len, prompts)), max(map(len, chosen + rejected))

    def pad(seqs, n, left):
        """[len(seqs), n] ids and mask, padded on the left (prompts) or the right (responses)."""
        ids, mask = np.zeros((len(seqs), n), np.int32), np.zeros((len(seqs), n), np.int32)
        for i, x in enumerate(seqs):
            where = slice(n - len(x), n) if left else slice(0, len(x))
            ids[i, where], mask[i, where] = x, 1
        return ids, mask

    b = s["pairs"]
    batches = []
    for start in range(0, b * s["steps"], b):
        sl = slice(start, start + b)
        (pi, pm), (ci, cm), (ri, rm) = (pad(prompts[sl], p_len, True), pad(chosen[sl], r_len, False),
                                        pad(rejected[sl], r_len, False))
        batches.append(dpo_trainer.TrainingInput(prompt_ids=pi, prompt_mask=pm, chosen_ids=ci, chosen_mask=cm,
                                                 rejected_ids=ri, rejected_mask=rm))
    m = s["model"]
    config = llama.ModelConfig(num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
                               hidden_dim=m["intermediate_size"], num_heads=m["num_heads"],
                               head_dim=m["hidden_size"] // m["num_heads"], num_kv_heads=m["num_kv_heads"],
                               rope_theta=int(m["rope_theta"]), norm_eps=m["norm_eps"])
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        policy = llama.Llama3(config, rngs=nnx.Rngs(s["seed"]))
        ref = nnx.clone(policy)
        schedule = optax.linear_schedule(s["learning_rate"], 0.0, s["steps"])
        optimizer = optax.chain(optax.clip_by_global_norm(s["clip_grad_norm"]),
                                optax.adamw(schedule, weight_decay=0.0))
        run_dir = os.path.join(s["work_dir"], f"tunix_run_{os.getpid()}")
        cfg = dpo_trainer.DPOTrainingConfig(
            eval_every_n_steps=10 ** 9, max_steps=s["steps"], beta=s["beta"], checkpoint_root_directory=run_dir,
            checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=s["steps"], max_to_keep=1),
            pbar_description=None)
        trainer = dpo_trainer.DPOTrainer(policy, ref, optimizer, cfg)
        stamps = []

        def timed():
            for batch in batches:
                stamps.append(time.perf_counter())
                yield batch

        trainer.train(timed())
        jax.block_until_ready(nnx.state(policy))
        if hasattr(trainer, "close"):
            trainer.close()
    t_end = time.perf_counter()
    stamps.append(t_end)
    step_s = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    print(json.dumps({
        "system": "tunix", "end_to_end_s": t_end - t0, "import_s": t_imported - t_start, "data_s": 0.0,
        "reference_s": 0.0, "step_s": step_s, "losses": [], "pairs_per_step": b,
        "tokens": {"processed_per_step": 2 * b * (p_len + r_len), "prompt_len": p_len, "response_len": r_len},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"jax": jax.__version__}, "devices": [str(x) for x in jax.devices()],
    }), flush=True)


if __name__ == "__main__":
    main()
