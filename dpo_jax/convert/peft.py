"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names.

PEFT stores, per adapted torch module `M`, `base_model.model.M.lora_A.weight` [r, in] and `lora_B.weight` [out, r]
and adds (lora_alpha / r) · B A to the module's weight. Our adapter beside projection `p` holds A [in..., r] and
B [r, out...] (models/decoder.py), so lora_A = A flattened and transposed, lora_B likewise. Which torch module a
projection is comes from the family's conversion table (convert/families.py): a row that maps one HF weight to our
`p/kernel`.

Where HF fuses several of our projections into one module (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`), our
separate q/k/v adapters of rank r are exactly one PEFT adapter of that module of rank 3r: lora_A = [A_q; A_k; A_v]
stacked along the rank, lora_B block-diagonal (block j holds B of part j in the module's output order, given by the
family's fused-weight hook; zero elsewhere), and alpha 3·alpha so that PEFT's alpha / rank equals ours. The file
says so with `rank_pattern` / `alpha_pattern` for that module. A part the run did not adapt is a zero block. Read
back, that form splits exactly; a PEFT adapter of the fused module at the global rank r (one trained by PEFT) is
read as q/k/v adapters sharing its lora_A, also exact.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from dpo_jax.convert.families import Hook, family_of
from dpo_jax.convert.hf import stack_layers, unstack_layers
from dpo_jax.models.config import LORA_TARGETS, ModelConfig

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def modules(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """Our projection name -> (the HF module with `{i}` for the layer, our kernel path with `{i}`), for every
    projection that is a torch module of its own in this family."""
    out = {}
    for rule in family_of(config.family, "model").rules:
        if len(rule.ours) == 1 and rule.ours[0].endswith("/kernel") and rule.hf.endswith(".weight"):
            name = rule.ours[0].split("/")[-2]
            if name in LORA_TARGETS and "{i}" in rule.hf:
                out[name] = (rule.hf[:-len(".weight")], rule.ours[0])
    return out


def fused_modules(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], Hook]]:
    """HF modules (with `{i}`) that fuse several of our projections -> (the projections in the module's order, our
    kernel paths with `{i}`, the family's hook between the fused weight and ours)."""
    out = {}
    for rule in family_of(config.family, "model").rules:
        if len(rule.ours) > 1 and all(p.endswith("/kernel") for p in rule.ours) and rule.hf.endswith(".weight") \
                and "{i}" in rule.hf:
            names = tuple(p.split("/")[-2] for p in rule.ours)
            if all(n in LORA_TARGETS for n in names):
                out[rule.hf[:-len(".weight")]] = (names, rule.ours, rule.hook)
    return out


def _module_key(module: str) -> str:
    """The module's last two name parts: how target_modules and the rank/alpha patterns name it, unambiguous where a
    leaf name is not (GPT-2's attn.c_proj, mlp.c_proj)."""
    return ".".join(module.split(".")[-2:])


def _check_targets(config: ModelConfig, targets) -> dict[str, tuple[str, str]]:
    table = modules(config)
    fused = {n for names, _, _ in fused_modules(config).values() for n in names}
    missing = [t for t in targets if t not in table and t not in fused]
    if missing:
        raise ValueError(f"{config.family}: LoRA targets {missing} are not HF modules there; PEFT adapters can be "
                         f"written for {sorted(set(table) | fused)} (set config.model.lora.targets to those)")
    return table


def _conv1d(config: ModelConfig) -> bool:
    return config.family == "gpt2"  # GPT-2's Conv1D stores [in, out]; torch Linear [out, in]


def _fused_b(config: ModelConfig, hook: Hook, parts: list[np.ndarray]) -> np.ndarray:
    """PEFT's lora_B [out, r] of a fused module from our per-part B [r, heads, head_dim] (the hook treats r as the
    input dimension: the fused weight is linear in the parts)."""
    w = hook.to_hf(parts, config)[0]
    return w.T if _conv1d(config) else w


def _fused_parts(config: ModelConfig, hook: Hook, lora_b: np.ndarray) -> list[np.ndarray]:
    """The inverse: PEFT's lora_B [out, r] -> our per-part B [r, heads, head_dim]."""
    return hook.to_ours([lora_b.T if _conv1d(config) else lora_b], config)


def _flat(params: Any, config: ModelConfig) -> dict[str, Any]:
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    return unstack_layers(flat, config.num_layers) if config.scan_layers else flat


def save_peft(config: ModelConfig, params: Any, out: str, base_model: str = "") -> list[str]:
    """Writes the adapters of `params` (a LoRA model) as a PEFT adapter directory; returns the files written."""
    from safetensors.numpy import save_file

    if not config.lora_rank:
        raise ValueError("the model has no LoRA adapters (config.model.lora.rank = 0): nothing to export to PEFT")
    if config.head != "lm":
        raise ValueError("a LoRA reward model also trains its score head, which a PEFT adapter would carry as "
                         "modules_to_save: not supported; export the merged model with --to-hf")
    table = _check_targets(config, config.lora_targets)
    flat, r = _flat(params, config), config.lora_rank
    tensors, written, rank_pattern, alpha_pattern = {}, set(), {}, {}
    for target in config.lora_targets:
        if target not in table:
            continue  # in a fused module: below
        module, kernel = table[target]
        written.add(module)
        for i in range(config.num_layers):
            adapter = kernel.format(i=i)[:-len("/kernel")] + "_lora"
            a, b = np.asarray(flat[f"{adapter}/a"], np.float32), np.asarray(flat[f"{adapter}/b"], np.float32)
            name = PREFIX + module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    for module, (names, kernels, hook) in fused_modules(config).items():
        if not set(names) & set(config.lora_targets):
            continue
        written.add(module)
        rank_pattern[_module_key(module)], alpha_pattern[_module_key(module)] = len(names) * r, \
            len(names) * config.lora_alpha
        for i in range(config.num_layers):
            shapes = [flat[k.format(i=i)].shape for k in kernels]  # [D, heads, head_dim]
            adapters = [k.format(i=i)[:-len("/kernel")] + "_lora" for k in kernels]
            lora_a, blocks = [], []
            for j, (name, shape, adapter) in enumerate(zip(names, shapes, adapters)):
                adapted = name in config.lora_targets
                a = np.asarray(flat[f"{adapter}/a"], np.float32).reshape(-1, r).T if adapted else \
                    np.zeros((r, shape[0]), np.float32)
                parts = [np.zeros((r,) + s[1:], np.float32) for s in shapes]
                if adapted:
                    parts[j] = np.asarray(flat[f"{adapter}/b"], np.float32)
                lora_a.append(a)
                blocks.append(_fused_b(config, hook, parts))
            name = PREFIX + module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(lora_a, 0))
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.concatenate(blocks, 1))
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "bias": "none",
        "target_modules": sorted({_module_key(m) for m in written}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,  # fused modules: rank 3r, alpha 3·alpha
        "fan_in_fan_out": _conv1d(config),
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    return [CONFIG_FILE, WEIGHTS_FILE]


def _pattern(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches a module named it or ending in "." + it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _matches(entry: str, module: str) -> bool:
    """PEFT's rule for a target_modules entry: the module is it or ends with "." + it."""
    return module == entry or module.endswith("." + entry)


def _read_adapter_config(directory: str) -> tuple[str, dict]:
    """(path, contents) of the adapter directory's adapter_config.json."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no {CONFIG_FILE} (is this a PEFT adapter directory?)")
    with open(path) as f:
        return path, json.load(f)


def adapter_config(directory: str, config: ModelConfig) -> ModelConfig:
    """`config` (a base model) with the rank, alpha and targets of the PEFT LoRA adapter in `directory`; anything
    this cannot represent exactly is an error naming the file and key."""
    return _lora_config(*_read_adapter_config(directory), config)


def _lora_config(path: str, ac: dict, config: ModelConfig) -> ModelConfig:
    for key, want in (("peft_type", "LORA"), ("bias", "none")):
        if ac.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {ac.get(key)!r}; only {want!r} is supported")
    if ac.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save is set; not supported (fully trained modules)")
    fused = fused_modules(config)
    for key in ("rank_pattern", "alpha_pattern"):  # per-module ranks: only the fused form (see the module doc)
        other = [k for k in (ac.get(key) or {}) if not any(_pattern({k: 1}, m.format(i=0), 0) for m in fused)]
        if other:
            raise ValueError(f"{path}: {key} sets {other}; per-module ranks and alphas are supported only for the "
                             f"fused modules {sorted(_module_key(m) for m in fused) or 'none here'}")
    if ac.get("use_dora") or ac.get("use_rslora"):
        raise ValueError(f"{path}: DoRA / rsLoRA adapters are not supported")
    if not isinstance(ac.get("target_modules"), list):
        raise ValueError(f"{path}: target_modules must be a list of module names (a regex is not supported)")
    table = modules(config)
    matches = {m: [name for name, (module, _) in table.items() if _matches(m, module)] +
               [n for module, (names, _, _) in fused.items() if _matches(m, module) for n in names]
               for m in ac["target_modules"]}
    unknown = [m for m, names in matches.items() if not names]
    if unknown:
        known = sorted([module for module, _ in table.values()] + list(fused))
        raise ValueError(f"{path}: target_modules {unknown} are not {config.family} projections we can adapt "
                         f"({known})")
    targets = tuple(name for name in LORA_TARGETS if any(name in names for names in matches.values()))
    return config.replace(lora_rank=int(ac["r"]), lora_alpha=float(ac["lora_alpha"]), lora_targets=targets,
                          lora_dropout=float(ac.get("lora_dropout", 0.0)))


def load_peft(directory: str, config: ModelConfig, params: Any) -> tuple[ModelConfig, dict]:
    """A PEFT LoRA adapter directory onto base `params` of `config`: (`adapter_config`, params with the adapters).
    Every tensor of the file must be one of the adapters' (an error names the first that is not)."""
    from safetensors.numpy import load_file

    path, ac = _read_adapter_config(directory)
    lora_config = _lora_config(path, ac, config)
    table, r, targets = modules(config), lora_config.lora_rank, lora_config.lora_targets
    where = f"{directory}/{WEIGHTS_FILE}"
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    expected, used = {}, set()
    flat = _flat(params, config)

    def pair(name: str, want_a: tuple, want_b: tuple) -> tuple[np.ndarray, np.ndarray]:
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{where}: no {name}.lora_A/lora_B.weight")
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(f"{where}: {name} has lora_A {a.shape} / lora_B {b.shape}, expected {want_a} / {want_b}")
        used.update({f"{name}.lora_A.weight", f"{name}.lora_B.weight"})
        return a.astype(np.float32), b.astype(np.float32)

    for target in targets:
        if target not in table:
            continue  # in a fused module: below
        module, kernel = table[target]
        for i in range(config.num_layers):
            shape = flat[kernel.format(i=i)].shape
            n_in = 2 if target == "o" else 1  # o's kernel is [heads, head_dim, D]; the others [D, ...]
            adapter = kernel.format(i=i)[:-len("/kernel")] + "_lora"
            a, b = pair(PREFIX + module.format(i=i), (r, int(np.prod(shape[:n_in]))), (int(np.prod(shape[n_in:])), r))
            expected[f"{adapter}/a"] = a.T.reshape(shape[:n_in] + (r,))
            expected[f"{adapter}/b"] = b.T.reshape((r,) + shape[n_in:])
    for module, (names, kernels, hook) in fused_modules(config).items():
        if not set(names) & set(targets):
            continue
        n = len(names)
        for i in range(config.num_layers):
            name = PREFIX + module.format(i=i)
            rank = int(_pattern(ac.get("rank_pattern"), module.format(i=i), r))
            alpha = float(_pattern(ac.get("alpha_pattern"), module.format(i=i), lora_config.lora_alpha))
            shapes = [flat[k.format(i=i)].shape for k in kernels]
            adapters = [k.format(i=i)[:-len("/kernel")] + "_lora" for k in kernels]
            out = sum(int(np.prod(s[1:])) for s in shapes)
            a, b = pair(name, (rank, shapes[0][0]), (out, rank))
            if rank == n * r and alpha == n * lora_config.lora_alpha:  # the block form (ours): split exactly
                for j, adapter in enumerate(adapters):
                    parts = _fused_parts(config, hook, b[:, j * r:(j + 1) * r])
                    if any(np.any(p) for k, p in enumerate(parts) if k != j):
                        raise ValueError(f"{where}: {name}'s lora_B is not block-diagonal over {names} (the form "
                                         f"of rank {rank} = {n} x r it must have); it cannot be split into "
                                         "rank-r adapters")
                    expected[f"{adapter}/a"] = a[j * r:(j + 1) * r].T
                    expected[f"{adapter}/b"] = parts[j]
            elif rank == r and alpha == lora_config.lora_alpha:  # one rank-r adapter: parts share its lora_A
                for adapter, part in zip(adapters, _fused_parts(config, hook, b)):
                    expected[f"{adapter}/a"], expected[f"{adapter}/b"] = a.T, part
            else:
                raise ValueError(f"{where}: {name} has rank {rank} and alpha {alpha:g}; a fused module's adapter "
                                 f"must have rank r = {r} and alpha {lora_config.lora_alpha:g}, or {n}·r and "
                                 f"{n}·alpha (the block form dpo-jax writes)")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{where}: tensors this adapter config does not explain, e.g. {extra[0]}")
    merged = {**flat, **{k: np.asarray(v, np.float32) for k, v in expected.items()}}
    if config.scan_layers:
        merged = stack_layers(merged, config.num_layers)
    return lora_config, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})
