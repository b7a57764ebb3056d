"""`dpo-jax export --run DIR --to-hf OUT | --to-peft OUT [--step N] [--dtype bfloat16]`: a run's trained model.

--to-hf writes an HF checkpoint (a LoRA run's adapters merged into the weights), with the tokenizer alongside;
--to-peft writes a LoRA run's adapters as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads onto
the base model (train/export.py).
"""

from __future__ import annotations

import argparse
import sys

from dpo_jax.parsing import parse_size
from dpo_jax.train.export import export, export_peft


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
