"""A run's trained model out of its run directory (the library of `dpo-jax export`, commands/export.py).

`export` writes an HF checkpoint (a LoRA run's adapters merged into the weights), with the tokenizer alongside;
`export_peft` writes a LoRA run's adapters as a PEFT adapter directory (convert/peft.py) that
`peft.PeftModel.from_pretrained` loads onto the base model. The run directory's config.json rebuilds the optimizer
(its state is part of the checkpoint's structure) and model_config.json the model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import sharding
from dpo_jax.convert.hf import save_hf_checkpoint
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.models import lora
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import init_params
from dpo_jax.train.checkpoint import RunCheckpoints
from dpo_jax.train.model_source import tokenizer_dir
from dpo_jax.train.state import TrainState, make_optimizer


def restore_params(run_dir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, ModelConfig, Any, int]:
    """(run config, model, params on one device, step) of checkpoint `step` (default: latest) of a run of
    `dpo-jax train`; a directory that is not one, or holds no checkpoint, is an error naming it."""
    run_dir = os.path.abspath(run_dir)
    for name in ("config.json", "model_config.json"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise ValueError(f"{run_dir}: not a dpo-jax run directory (no {name})")
    with open(os.path.join(run_dir, "config.json")) as f:
        c = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(run_dir, "model_config.json")) as f:
        model = ModelConfig.from_json(f.read())
    checkpoints = RunCheckpoints(os.path.join(run_dir, "checkpoints"), keep=1000)
    try:
        step = step if step is not None else checkpoints.latest_step()
        if step is None:
            raise ValueError(f"{run_dir}: no checkpoint (nothing trained yet)")
        optimizer, _ = make_optimizer(c.optimizer)
        abstract = jax.eval_shape(lambda: (lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(
            lora.trainable(p, model)[1])))(init_params(model, jax.random.key(0))))
        abstract = sharding.abstract(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        state, _, _ = checkpoints.restore(step, abstract, model=model, mode=c.train.mode)
    finally:
        checkpoints.close()
    return c, model, state.params, step


def export(run_dir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 5 * 2**30) -> tuple[int, list[str]]:
    """Writes checkpoint `step` (default: latest) of `run_dir` to `out`; returns (step, weight files)."""
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists and is not empty; choose a new directory")
    c, model, params, step = restore_params(run_dir, step)
    # A LoRA run is written as its merged weights: kernel + (alpha / r) A B, a plain HF checkpoint.
    files = save_hf_checkpoint(lora.base_config(model), lora.merged(params, model), out, dtype=dtype,
                               max_shard_bytes=max_shard_bytes)
    if c.data.tokenizer or tokenizer_dir(c.model):  # the run's own tokenizer alongside
        load_tokenizer(c.data, tokenizer_dir(c.model)).save_pretrained(out)
    return step, files


def export_peft(run_dir: str, out: str, *, step: int | None = None) -> tuple[int, list[str]]:
    """Writes the LoRA adapters of checkpoint `step` (default: latest) of `run_dir` as a PEFT adapter directory."""
    from dpo_jax.convert.peft import save_peft

    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists and is not empty; choose a new directory")
    c, model, params, step = restore_params(run_dir, step)
    if not model.lora_rank:
        raise ValueError(f"{run_dir} trained the whole model (config.model.lora.rank = 0): there are no adapters; "
                         "use --to-hf")
    return step, save_peft(model, params, out, base_model=c.model.path if c.model.source == "hf" else "")
