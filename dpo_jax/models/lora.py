"""LoRA parameter trees: which leaves train, the base with the adapters off, and the merged weights.

The decoder puts each adapter beside its projection (`attn/q` and `attn/q_lora/{a, b}`), so a LoRA model's
parameters are the base model's tree plus `*_lora` subtrees. Training differentiates and optimizes only those
(`split` / `merge`: the optimizer state and the gradients are the adapters' size); the base weights are never
updated. The reference of a LoRA policy is the same base with the adapters off (`base_config`, `base_params`): no
second copy of the weights. `merged` folds the adapters into the kernels for export.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from dpo_jax.models.config import ModelConfig

SUFFIX = "_lora"


def _is_adapter(path: tuple[str, ...]) -> bool:
    return any(str(p).endswith(SUFFIX) for p in path)


def _partition(params: Any, taken) -> tuple[dict, dict]:
    """(leaves whose path `taken` rejects, leaves it takes): two trees with the original paths, no arrays copied."""
    flat = traverse_util.flatten_dict(params)
    take = {k: v for k, v in flat.items() if taken(k)}
    rest = {k: v for k, v in flat.items() if k not in take}
    return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(take)


def split(params: Any) -> tuple[dict, dict]:
    """(frozen base, adapters)."""
    return _partition(params, _is_adapter)


def merge(base: Any, adapters: Any) -> dict:
    """The inverse of `split`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def trainable(params: Any, config: ModelConfig) -> tuple[dict, Any]:
    """(frozen, trained) parts of a model's parameters: with adapters, they train — and a reward model's score
    head, which starts random (PEFT's modules_to_save) —; without, everything."""
    if not config.lora_rank:
        return {}, params
    return _partition(params, lambda k: _is_adapter(k) or (config.head == "score" and k[-1] == "score_kernel"))


def combine(frozen: dict, trained: Any, config: ModelConfig) -> Any:
    """The inverse of `trainable`."""
    return merge(frozen, trained) if config.lora_rank else trained


def base_config(config: ModelConfig) -> ModelConfig:
    """The same model without adapters."""
    return config.replace(lora_rank=0, lora_targets=())


def base_params(params: Any) -> dict:
    """The base weights of a LoRA model (the adapters dropped; the arrays are the same buffers)."""
    return split(params)[0]


def merged(params: Any, config: ModelConfig) -> dict:
    """Base parameters with each adapter folded in: kernel + (alpha / r) · A B, in the kernel's dtype."""
    if not config.lora_rank:
        return params
    flat, scale = traverse_util.flatten_dict(params), config.lora_alpha / config.lora_rank
    out = {k: v for k, v in flat.items() if not _is_adapter(k)}
    for key in [k for k in flat if k[-1] == "a" and _is_adapter(k)]:
        module = key[-2]
        target = key[:-2] + (module[:-len(SUFFIX)], "kernel")
        a, b = flat[key], flat[key[:-1] + ("b",)]
        leading = a.ndim + b.ndim - 2 - out[target].ndim  # scanned layers: a leading layer axis
        delta = _outer(a.astype(jnp.float32), b.astype(jnp.float32), leading)
        out[target] = (out[target].astype(jnp.float32) + scale * delta).astype(out[target].dtype)
    return traverse_util.unflatten_dict(out)


def _outer(a, b, leading: int):
    """A [L..., in..., r] and B [L..., r, out...] -> A B [L..., in..., out...] (L: leading stacked-layer axes)."""
    a2 = a.reshape(a.shape[:leading] + (-1, a.shape[-1]))
    b2 = b.reshape(b.shape[:leading + 1] + (-1,))
    out = jnp.matmul(a2, b2)
    return out.reshape(a.shape[:-1] + b.shape[leading + 1:])
