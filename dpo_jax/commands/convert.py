"""`dpo-jax convert`: HF checkpoint directory <-> dpo_jax model checkpoint.

    dpo-jax convert --from-hf HF_DIR --to CKPT [--dtype bfloat16] [--scan-layers]
    dpo-jax convert --from CKPT --to-hf HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from dpo_jax.convert import native
from dpo_jax.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from dpo_jax.parsing import parse_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-jax convert", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="a local Hugging Face checkpoint directory")
    src.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="a dpo_jax model checkpoint")
    p.add_argument("--to", metavar="CKPT", help="write a dpo_jax model checkpoint (with --from-hf)")
    p.add_argument("--to-hf", metavar="HF_DIR", help="write a Hugging Face checkpoint (with --from)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype written (default: as stored)")
    p.add_argument("--scan-layers", action="store_true", help="store layers stacked for nn.scan (with --from-hf)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="safetensors shard size (with --to-hf)")
    return p


def run(argv: list[str]) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            if not args.to or args.to_hf:
                parser.error("--from-hf needs --to CKPT")
            overrides = {"scan_layers": True} if args.scan_layers else {}
            config, params = load_hf_checkpoint(args.from_hf, args.dtype, config_overrides=overrides)
            native.save_model(args.to, config, params, hf_source=args.from_hf)
            n = sum(x.size for x in jax.tree.leaves(params))
            print(f"converted {args.from_hf} ({config.family}, {n:,} parameters, {config.param_dtype}) -> {args.to}")
        else:
            if not args.to_hf or args.to:
                parser.error("--from needs --to-hf HF_DIR")
            if os.path.exists(args.to_hf) and os.listdir(args.to_hf):
                raise ValueError(f"{args.to_hf} exists and is not empty; choose a new directory")
            config, params = native.load_model(args.from_ckpt)
            files = save_hf_checkpoint(config, params, args.to_hf, dtype=args.dtype,
                                       max_shard_bytes=args.max_shard_size,
                                       extra_config=native.hf_side_config(args.from_ckpt))
            native.copy_hf_side_files(args.from_ckpt, args.to_hf)
            print(f"exported {args.from_ckpt} -> {args.to_hf} ({len(files)} safetensors file(s))")
    except ValueError as e:
        print(f"dpo-jax convert: {e}", file=sys.stderr)
        sys.exit(2)
