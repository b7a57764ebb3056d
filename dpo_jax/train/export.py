"""`dpo-jax export --run DIR --to-hf OUT | --to-peft OUT [--step N] [--dtype bfloat16]`: a run's trained model.

--to-hf writes an HF checkpoint (a LoRA run's adapters merged into the weights), with the tokenizer alongside;
--to-peft writes a LoRA run's adapters as a PEFT adapter directory (convert/peft.py) that
`peft.PeftModel.from_pretrained` loads onto the base model. The run directory's config.json rebuilds the optimizer
(its state is part of the checkpoint's structure) and model_config.json the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax.convert.cli import parse_size
from dpo_jax.convert.hf import save_hf_checkpoint
from dpo_jax.models import lora
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import init_params
from dpo_jax.train.checkpoint import RunCheckpoints
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
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract)
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
    tokenizer_dir = c.data.tokenizer if c.data.tokenizer and not c.data.tokenizer.startswith("bpe:") else (
        c.model.path if c.model.source == "hf" else None)
    if c.data.tokenizer.startswith("bpe:"):
        from dpo_jax.train.model_source import load_tokenizer

        load_tokenizer(c).save_pretrained(out)
    elif tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
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


def run(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="dpo-jax export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (train.run_dir)")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-hf", metavar="OUT", help="output HF checkpoint directory (LoRA: merged weights)")
    to.add_argument("--to-peft", metavar="OUT", help="output PEFT adapter directory (LoRA runs)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", type=parse_size, default="5GB")
    args = p.parse_args(argv)
    try:
        if args.to_peft:
            step, files = export_peft(args.run, args.to_peft, step=args.step)
        else:
            step, files = export(args.run, args.to_hf, step=args.step, dtype=args.dtype,
                                 max_shard_bytes=args.max_shard_size)
    except ValueError as e:
        print(f"dpo-jax export: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported step {step} of {args.run} -> {args.to_peft or args.to_hf} ({len(files)} file(s))")
