"""Load and save HF checkpoint directories as (ModelConfig, params), streaming one tensor at a time.

Every expected parameter must come from exactly one checkpoint tensor of the right shape, and every checkpoint
tensor must be used (or be a known weightless buffer): a mismatch is an error naming the tensor, never a silent
random init or a silently dropped weight.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpo_jax.convert.families import Family, expand, family_of, head_from_hf, head_to_hf
from dpo_jax.convert.tensors import CheckpointReader, write_safetensors
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder

Params = dict[str, Any]
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def read_hf_config(directory: str) -> tuple[Family, ModelConfig]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    with open(path) as f:
        try:
            cj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    return config_from_hf_json(cj, path)


def config_from_hf_json(cj: dict, where: str) -> tuple[Family, ModelConfig]:
    """An HF config.json's contents -> (its family, our ModelConfig); errors name `where`."""
    family = family_of(cj.get("model_type"), where)
    try:
        return family, family.config_from_hf(cj).replace(**head_from_hf(cj))
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} for model_type {family.model_type!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined unscanned parameter paths -> shapes, without allocating anything."""
    flat_config = config.replace(scan_layers=False, remat_policy="none")
    shapes = jax.eval_shape(
        lambda: Decoder(flat_config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    )
    shapes = jax.tree.map(lambda s: s.shape, shapes, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(k): v for k, v in _flatten(shapes)}


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        elif hasattr(v, "unbox"):
            yield prefix + (k,), v.unbox()
        else:
            yield prefix + (k,), v


def _unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def stack_layers(flat: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """layers_{i}/x paths -> one layers/x path with a leading [num_layers] axis (the nn.scan layout)."""
    out, per_layer = {}, {}
    for path, value in flat.items():
        head, _, rest = path.partition("/")
        if head.startswith("layers_"):
            per_layer.setdefault(rest, [None] * num_layers)[int(head[len("layers_"):])] = value
        else:
            out[path] = value
    for rest in list(per_layer):
        values = per_layer.pop(rest)
        host = all(isinstance(v, np.ndarray) for v in values)  # one host copy, not a compiled stack per shape
        out[f"layers/{rest}"] = jnp.asarray(np.stack(values)) if host else jnp.stack(values)
        del values
    return out


def unstack_layers(flat: dict[str, Any], num_layers: int) -> dict[str, Any]:
    out = {}
    for path, value in flat.items():
        head, _, rest = path.partition("/")
        if head == "layers":
            out.update({f"layers_{i}/{rest}": value[i] for i in range(num_layers)})
        else:
            out[path] = value
    return out


def load_hf_checkpoint(
    directory: str,
    dtype: Any = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    sharding_fn: ShardingFn | None = None,
    progress: bool | None = None,
) -> tuple[ModelConfig, Params]:
    """Reads a local HF checkpoint directory into (ModelConfig, params) without transformers' model classes.

    dtype: the parameter dtype (default float32); also recorded as the config's `param_dtype`.
    config_overrides: ModelConfig fields to set (e.g. `dtype="bfloat16"`, `scan_layers=True`).
    sharding_fn(path, shape) -> Sharding places each parameter as it is read (unscanned paths), so a large model is
    never assembled on one device. Tensors stream one at a time; peak host memory is about one tensor.
    """
    family, config = read_hf_config(directory)
    param_dtype = jnp.dtype(dtype or config.param_dtype)
    config = config.replace(**{**(config_overrides or {}), "param_dtype": param_dtype.name})
    shapes = expected_shapes(config)
    rules = [r for r in expand(family.rules, config.num_layers) if all(p in shapes for p in r.ours)]
    flat: dict[str, Any] = {}
    with CheckpointReader(directory) as reader:
        available = reader.keys()
        source = {r.hf: next((n for n in (r.hf, *r.aliases) if n in available), None) for r in rules}
        missing = [hf for hf, name in source.items() if name is None]
        if missing:
            raise ValueError(f"{directory}: checkpoint lacks tensor(s) {missing[:5]}"
                             f"{' and more' if len(missing) > 5 else ''} needed by this {family.model_type} config")
        used = set(source.values())
        extra = sorted(k for k in available - used if not family.ignore(k, config))
        if extra:
            raise ValueError(f"{directory}: unexpected tensor(s) {extra[:5]}{' and more' if len(extra) > 5 else ''}"
                             f" that this {family.model_type} config has no parameter for")
        for rule in tqdm(rules, desc=f"loading {os.path.basename(os.path.normpath(directory))}", unit="tensor",
                         disable=None if progress is None else not progress, leave=False):
            raw = reader.get(source[rule.hf])
            for path, value in zip(rule.ours, rule.hook.to_ours([raw], config)):
                if tuple(value.shape) != tuple(shapes[path]):
                    raise ValueError(f"{directory}: tensor {source[rule.hf]} has shape {tuple(raw.shape)}, which gives "
                                     f"{tuple(value.shape)} for parameter {path}; expected {tuple(shapes[path])}")
                value = np.asarray(value).astype(param_dtype)
                if sharding_fn:
                    value = jax.device_put(value, sharding_fn(path, value.shape))
                elif not (config.scan_layers and path.startswith("layers_")):  # those are stacked on the host first
                    value = jnp.asarray(value)
                flat[path] = value
            del raw
    if config.scan_layers:
        flat = stack_layers(flat, config.num_layers)
    return config, _unflatten(flat)


def save_hf_checkpoint(
    config: ModelConfig,
    params: Params,
    directory: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: dict[str, Any] | None = None,
) -> list[str]:
    """Writes config.json + safetensors (sharded above `max_shard_bytes`) loadable by
    `transformers.AutoModelForCausalLM.from_pretrained` (a reward model: `AutoModelForSequenceClassification`).
    `extra_config` adds keys such as bos/eos token ids.
    Tensors are converted and written one shard at a time. Returns the weight file names."""
    family = family_of(config.family, "ModelConfig.family")
    out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    flat = {"/".join(k): v for k, v in _flatten(params)}
    if config.scan_layers:
        flat = unstack_layers(flat, config.num_layers)
    shapes = expected_shapes(config)
    if set(flat) != set(shapes):
        raise ValueError(f"params do not match the config: missing {sorted(set(shapes) - set(flat))[:5]}, "
                         f"unexpected {sorted(set(flat) - set(shapes))[:5]}")
    rules = [r for r in expand(family.rules, config.num_layers) if all(p in shapes for p in r.ours)]

    def tensors():
        for rule in rules:
            ours = [np.asarray(jax.device_get(flat[p])).astype(np.float32) for p in rule.ours]
            (hf,) = rule.hook.to_hf(ours, config)
            yield rule.hf, np.asarray(hf).astype(out_dtype)

    files = write_safetensors(tensors(), directory, max_shard_bytes)
    hf_config = {
        "model_type": family.model_type,
        **head_to_hf(config, family),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": out_dtype.name,
        **family.config_to_hf(config),
        **(extra_config or {}),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return files
