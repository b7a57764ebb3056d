"""Where a run's model comes from, as a table of sources (`MODEL_SOURCES`): a local HF checkpoint (optionally with
a PEFT adapter), a `dpo-jax convert` checkpoint, or a random init of a preset shape. A source gives the model config
and a loader; the config section's overrides (dtype, remat, attention, LoRA) are computed once and adapters added
once, whatever the source. The tokenizer is data/tokenizers.py's."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections

from dpo_jax.convert import native
from dpo_jax.convert.hf import load_hf_checkpoint, read_hf_config
from dpo_jax.convert.presets import preset_config
from dpo_jax.models import lora
from dpo_jax.models.config import FAMILY_SWITCHES, PRESETS, ModelConfig, shaped_config
from dpo_jax.models.decoder import init_params
from dpo_jax.models.reward import RewardScorer, as_reward_model, reward_model_config
from dpo_jax.train.modes import get_mode

def default_model_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "hf"  # hf: a local HF checkpoint dir; checkpoint: a `dpo-jax convert` checkpoint; random: init
    c.path = ""
    # a named architecture without weights (convert/presets.py: llama3-8b, qwen3-8b, pythia-2.8b, ...): what
    # `dpo-jax plan` compiles whatever the source, or with source = random a from-scratch model of that shape
    c.preset = ""
    c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.param_dtype = "float32"
    c.remat_policy = "dots"  # save matmul outputs, recompute the rest: less memory than "none" and faster here
    c.scan_layers = True  # one compiled layer body: faster compiles, and faster steps on XLA:CPU (docs/PERFORMANCE.md)
    c.attention_impl = ""  # "": automatic (the Pallas kernel on TPU, XLA elsewhere), "xla", "cudnn" or "pallas"
    c.attention_query_block = 192  # XLA attention: queries in blocks of ~192 skip the causal upper triangle (T >= 288)
    # architecture, for source = random (the vocabulary comes from the tokenizer): a shape from models/config.py
    # PRESETS (`c.model.update(PRESETS[name])`), or these fields set one by one
    c.update(PRESETS["gpt2-tiny"])  # family, hidden_size, num_layers, num_heads, intermediate_size
    c.max_position_embeddings = 512
    c.seed = 0
    # LoRA (models/lora.py): rank > 0 trains low-rank adapters on the `targets` projections, the base frozen
    # peft_path: a PEFT LoRA adapter directory to load onto the (source = hf) base; its rank, alpha and targets
    # are then the adapter's (rank must stay 0 here or agree); dropout: PEFT's lora_dropout on the adapters'
    # inputs in training steps (DPO, SFT, reward; PPO refuses it), this config's value even with a peft_path
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": ("q", "k", "v", "o"),
                                        "peft_path": ""})
    return c


def _model_overrides(m: ml_collections.ConfigDict) -> dict[str, Any]:
    out = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
               attention_impl=m.attention_impl or None, attention_query_block=m.attention_query_block)
    lora_section = m.get("lora")
    if lora_section is not None and (lora_section.rank or lora_section.get("peft_path")):
        out["lora_dropout"] = float(lora_section.dropout)
    if lora_section is not None and lora_section.rank:
        targets = lora_section.targets
        out.update(lora_rank=int(lora_section.rank), lora_alpha=float(lora_section.alpha),
                   lora_targets=tuple(targets.split(",") if isinstance(targets, str) else targets))
    return out


def with_adapters(config: ModelConfig, load: Callable[[], Any], seed: int) -> Callable[[], Any]:
    """`load` (base weights) plus fresh LoRA adapters when the config has them (B = 0: the model is the base)."""
    if not config.lora_rank:
        return load

    def adapters():  # only the adapters' initialisers run: the base init is dead code under jit
        return lora.split(init_params(config, jax.random.key(seed)))[1]

    return lambda: lora.merge(jax.jit(adapters)(), load())  # adapters a checkpoint already has win


def random_model_config(m: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The from-scratch model of a `model` section (source = random): its family's switches and its shape."""
    if m.family not in FAMILY_SWITCHES:
        raise ValueError(f"config.model.family = {m.family!r} for source=random; valid: {', '.join(FAMILY_SWITCHES)}")
    return shaped_config(m.family, vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                         max_position_embeddings=m.max_position_embeddings, **_model_overrides(m))


# A model source: (model section, vocabulary size, the section's overrides) -> (ModelConfig, load base weights,
# whether fresh LoRA adapters go on top). `load` is jittable for `random`.
Source = Callable[[ml_collections.ConfigDict, int, dict], tuple[ModelConfig, Callable[[], Any], bool]]


def _random_source(m, vocab_size, overrides):
    config = preset_config(m.preset).replace(**overrides) if m.get("preset") else random_model_config(m, vocab_size)
    return config, lambda: init_params(config, jax.random.key(m.seed)), False  # its init has the adapters


def _hf_source(m, vocab_size, overrides):
    config = read_hf_config(m.path)[1].replace(**overrides)
    base = lambda: load_hf_checkpoint(  # noqa: E731
        m.path, m.param_dtype, config_overrides=overrides | {"lora_rank": 0, "lora_targets": ()})[1]
    peft_path = m.get("lora", {}).get("peft_path", "")
    if not peft_path:
        return config, base, True
    from dpo_jax.convert.peft import adapter_config, load_peft

    plain = lora.base_config(config)
    adapted = adapter_config(peft_path, plain)
    if config.lora_rank and config.lora_rank != adapted.lora_rank:
        raise ValueError(f"config.model.lora.rank = {config.lora_rank}, but the PEFT adapter in "
                         f"config.model.lora.peft_path = {peft_path!r} has rank {adapted.lora_rank}")
    adapted = adapted.replace(lora_dropout=config.lora_dropout)  # a training setting: the config's
    return adapted, lambda: load_peft(peft_path, plain, base())[1], False  # the adapter's own adapters


def _checkpoint_source(m, vocab_size, overrides):
    config_path = os.path.join(m.path, native.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"config.model.path = {m.path!r} is not a dpo_jax model checkpoint (no {native.CONFIG_FILE})")
    with open(config_path) as f:
        config = ModelConfig.from_json(f.read()).replace(**overrides)
    return config, lambda: native.load_model(m.path)[1], True


MODEL_SOURCES: dict[str, Source] = {"hf": _hf_source, "checkpoint": _checkpoint_source, "random": _random_source}
NEEDS_PATH = ("hf", "checkpoint")


def model_loader(m: ml_collections.ConfigDict, vocab_size: int) -> tuple[ModelConfig, Callable[[], Any]]:
    """(ModelConfig, load()) of a model section, where load() returns fresh initial params (jittable for
    source=random): the section's overrides computed once, LoRA adapters added once."""
    if m.source not in MODEL_SOURCES:
        raise ValueError(f"config.model.source = {m.source!r}; valid: {', '.join(MODEL_SOURCES)}")
    if m.get("preset") and m.source != "random":
        raise ValueError(f"config.model.preset = {m.preset!r} is a shape without weights: use it with "
                         f"config.model.source = 'random' (a from-scratch model) or in `dpo-jax plan`, not with "
                         f"source = {m.source!r}")
    if m.source in NEEDS_PATH and not m.path:
        raise ValueError(f"config.model.path is empty (needed for source={m.source!r})")
    config, load, add_adapters = MODEL_SOURCES[m.source](m, vocab_size, _model_overrides(m))
    return config, with_adapters(config, load, m.seed) if add_adapters else load


def tokenizer_dir(m: ml_collections.ConfigDict) -> str:
    """The directory a model section's own tokenizer is in (an HF checkpoint's), or ''."""
    return m.path if m.source == "hf" else ""


def pad_id(tokenizer) -> int:
    """The pad id a reward model reads past and sequences are padded with: the tokenizer's pad, else its EOS
    (TRL's choice, and what an exported reward model's `pad_token_id` says)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def model_with_head(m: ml_collections.ConfigDict, vocab_size: int, head: str, key: str
                    ) -> tuple[ModelConfig, Callable[[], Any]]:
    """`model_loader` for a section that must hold a policy (head "lm") or a reward model ("score"); the error
    names the config key."""
    config, load = model_loader(m, vocab_size)
    if config.head != head:
        kind = "a reward model (score head)" if head == "score" else "a policy (language-model head)"
        raise ValueError(f"config.{key}.path = {m.path!r} is not {kind}")
    return config, load


def load_reward_scorer(m: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh, rules: Any,
                       key: str) -> RewardScorer:
    """The reward model of a model section (an HF *ForSequenceClassification dir or a dpo_jax checkpoint), loaded,
    placed on `mesh` and ready to score; errors name config.`key`."""
    config, load = model_with_head(m, vocab_size, "score", key)
    return RewardScorer(config, load(), mesh, rules)


def for_mode(m: ml_collections.ConfigDict, mode: str, config: ModelConfig, load: Callable[[], Any],
             tokenizer) -> tuple[ModelConfig, Callable[[], Any]]:
    """The model a train mode needs (the head it registered, train/modes.py) from a model source. A reward model from
    a policy (the SFT model): its body with a fresh score head (seeded by model.seed) whose pad id is the
    tokenizer's pad, else its EOS (TRL's choice, and what an exported checkpoint's `pad_token_id` will say). A
    reward-model source for a policy mode is an error."""
    where = f"config.model.path = {m.path!r}" if m.source != "random" else "config.model (source = random)"
    if get_mode(mode).head == "lm":
        if config.head != "lm":
            raise ValueError(f"{where} is a reward model ({config.head!r} head); config.train.mode = {mode!r} "
                             "trains a policy, which needs a language-model head")
        return config, load
    if config.head == "score":
        return config, load  # continue training a reward model
    pad = pad_id(tokenizer)
    reward_config = reward_model_config(config, pad)
    return reward_config, lambda: as_reward_model(config, load(), pad, jax.random.key(m.seed + 1))[1]


def source_identity(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """What identifies a model's initial weights without loading them: the seed of a random init, or the path of a
    checkpoint with every file's size and modification time (a rewritten checkpoint changes it)."""
    if m.source == "random":
        return {"source": "random", "seed": m.seed}
    path = os.path.abspath(m.path)
    files = []
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            st = os.stat(os.path.join(root, name))
            files.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return {"source": m.source, "path": path, "files": files}
