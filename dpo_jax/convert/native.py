"""dpo_jax's own model checkpoint: an orbax params tree plus the ModelConfig, and the HF side files needed to
export it again (the source config.json's token ids, tokenizer and generation files)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from dpo_jax import sharding
from dpo_jax.models.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_DIR = "hf"  # side files copied from the source HF checkpoint
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
HF_KEPT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_model(path: str, config: ModelConfig, params: Any, hf_source: str | None = None) -> None:
    """Writes config, params and (when converting from HF) the side files; refuses to overwrite."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; choose a new checkpoint path")
    os.makedirs(path)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
    if hf_source:
        os.makedirs(os.path.join(path, HF_DIR))
        for name in HF_SIDE_FILES:
            if os.path.isfile(os.path.join(hf_source, name)):
                shutil.copy2(os.path.join(hf_source, name), os.path.join(path, HF_DIR, name))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), params)
    checkpointer.wait_until_finished()


def load_model(path: str, sharding_fn: Callable[[Any], Any] | None = None) -> tuple[ModelConfig, Any]:
    """Reads a checkpoint written by `save_model`; `sharding_fn(abstract_params)` may return per-leaf shardings."""
    path = os.path.abspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: not a dpo_jax model checkpoint (no {CONFIG_FILE})")
    with open(config_path) as f:
        try:
            config = ModelConfig.from_json(f.read())
        except (ValueError, TypeError) as e:
            raise ValueError(f"{config_path}: {e}") from None
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(os.path.join(path, PARAMS_DIR))
    tree = getattr(metadata, "item_metadata", metadata)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    if sharding_fn is not None:
        abstract = sharding.abstract(abstract, sharding_fn(abstract))
    return config, checkpointer.restore(os.path.join(path, PARAMS_DIR), abstract)


def hf_side_config(path: str) -> dict[str, Any]:
    """Token-id keys of the source HF config, to carry into an exported config.json."""
    source = os.path.join(path, HF_DIR, "config.json")
    if not os.path.isfile(source):
        return {}
    with open(source) as f:
        cj = json.load(f)
    return {k: cj[k] for k in HF_KEPT_KEYS if k in cj}


def copy_hf_side_files(path: str, out: str) -> None:
    """Tokenizer and generation files next to an exported model (config.json is written fresh, not copied)."""
    for name in HF_SIDE_FILES:
        src = os.path.join(path, HF_DIR, name)
        if name != "config.json" and os.path.isfile(src):
            shutil.copy2(src, os.path.join(out, name))
