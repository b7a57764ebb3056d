"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names.

PEFT stores, per adapted torch module `M`, `base_model.model.M.lora_A.weight` [r, in] and `lora_B.weight` [out, r]
and adds (lora_alpha / r) · B A to the module's weight. Our adapter beside projection `p` holds A [in..., r] and
B [r, out...] (models/decoder.py), so lora_A = A flattened and transposed, lora_B likewise. Which torch module a
projection is comes from the family's conversion table (convert/families.py): a row that maps one HF weight to our
`p/kernel`. Where HF fuses several of our projections into one module (GPT-2's `c_attn`, GPT-NeoX's
`query_key_value`), separate q/k/v adapters are not one PEFT adapter of that module, and exporting them is an
error naming the module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from dpo_jax.convert.families import family_of
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


def _check_targets(config: ModelConfig, targets) -> dict[str, tuple[str, str]]:
    table = modules(config)
    fused = [t for t in targets if t not in table]
    if fused:
        raise ValueError(f"{config.family}: LoRA targets {fused} are fused with other projections in one HF module "
                         f"there; PEFT adapters can be written for {sorted(table)} (set config.model.lora.targets "
                         "to those to export one)")
    return table


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
    tensors = {}
    for target in config.lora_targets:
        module, kernel = table[target]
        for i in range(config.num_layers):
            adapter = kernel.format(i=i)[:-len("/kernel")] + "_lora"
            a, b = np.asarray(flat[f"{adapter}/a"], np.float32), np.asarray(flat[f"{adapter}/b"], np.float32)
            name = PREFIX + module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "bias": "none",
        # the module's last two name parts: unambiguous where a leaf name is not (GPT-2's attn.c_proj, mlp.c_proj)
        "target_modules": sorted({".".join(table[t][0].split(".")[-2:]) for t in config.lora_targets}),
        "fan_in_fan_out": config.family == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    return [CONFIG_FILE, WEIGHTS_FILE]


def adapter_config(directory: str, config: ModelConfig) -> ModelConfig:
    """`config` (a base model) with the rank, alpha and targets of the PEFT LoRA adapter in `directory`; anything
    this cannot represent exactly is an error naming the file and key."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no {CONFIG_FILE} (is this a PEFT adapter directory?)")
    with open(path) as f:
        ac = json.load(f)
    for key, want in (("peft_type", "LORA"), ("bias", "none")):
        if ac.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {ac.get(key)!r}; only {want!r} is supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if ac.get(key):
            raise ValueError(f"{path}: {key} is set; not supported (per-module ranks, alphas or fully trained "
                             "modules)")
    if ac.get("use_dora") or ac.get("use_rslora"):
        raise ValueError(f"{path}: DoRA / rsLoRA adapters are not supported")
    if not isinstance(ac.get("target_modules"), list):
        raise ValueError(f"{path}: target_modules must be a list of module names (a regex is not supported)")
    table = modules(config)
    # PEFT's rule: an entry names every module that is it or ends with "." + it
    matches = {m: [name for name, (module, _) in table.items() if module == m or module.endswith("." + m)]
               for m in ac["target_modules"]}
    unknown = [m for m, names in matches.items() if not names]
    if unknown:
        raise ValueError(f"{path}: target_modules {unknown} are not {config.family} projections we can adapt "
                         f"({sorted(module for module, _ in table.values())})")
    targets = tuple(name for name in LORA_TARGETS if any(name in names for names in matches.values()))
    return config.replace(lora_rank=int(ac["r"]), lora_alpha=float(ac["lora_alpha"]), lora_targets=targets,
                          lora_dropout=float(ac.get("lora_dropout", 0.0)))


def load_peft(directory: str, config: ModelConfig, params: Any) -> tuple[ModelConfig, dict]:
    """A PEFT LoRA adapter directory onto base `params` of `config`: (`adapter_config`, params with the adapters).
    Every tensor of the file must be one of the adapters' (an error names the first that is not)."""
    from safetensors.numpy import load_file

    lora_config = adapter_config(directory, config)
    table, r, targets = modules(config), lora_config.lora_rank, lora_config.lora_targets
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    expected = {}
    flat = _flat(params, config)
    for target in targets:
        module, kernel = table[target]
        for i in range(config.num_layers):
            shape = flat[kernel.format(i=i)].shape
            n_in = 2 if target == "o" else 1  # o's kernel is [heads, head_dim, D]; the others [D, ...]
            name = PREFIX + module.format(i=i)
            adapter = kernel.format(i=i)[:-len("/kernel")] + "_lora"
            a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
            if a is None or b is None:
                raise ValueError(f"{directory}/{WEIGHTS_FILE}: no {name}.lora_A/lora_B.weight")
            want_a, want_b = (r, int(np.prod(shape[:n_in]))), (int(np.prod(shape[n_in:])), r)
            if a.shape != want_a or b.shape != want_b:
                raise ValueError(f"{directory}/{WEIGHTS_FILE}: {name} has lora_A {a.shape} / lora_B {b.shape}, "
                                 f"expected {want_a} / {want_b}")
            expected[f"{adapter}/a"] = a.T.reshape(shape[:n_in] + (r,)).astype(np.float32)
            expected[f"{adapter}/b"] = b.T.reshape((r,) + shape[n_in:]).astype(np.float32)
    used = {PREFIX + table[t][0].format(i=i) + s for t in targets for i in range(config.num_layers)
            for s in (".lora_A.weight", ".lora_B.weight")}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{directory}/{WEIGHTS_FILE}: tensors this adapter config does not explain, e.g. {extra[0]}")
    merged = {**flat, **expected}
    if config.scan_layers:
        merged = stack_layers(merged, config.num_layers)
    return lora_config, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})
