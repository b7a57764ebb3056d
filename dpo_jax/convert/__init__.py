"""HF checkpoint directories <-> (ModelConfig, params), through per-family tables; no transformers model classes."""

from dpo_jax.convert.hf import load_hf_checkpoint, save_hf_checkpoint

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint"]
