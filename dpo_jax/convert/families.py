"""Per-family HF ↔ dpo_jax mappings: config translation plus tables of (HF tensor, our params, hook).

A table row maps one HF tensor to one or more of our parameters (fused QKV splits into three) through a hook that
knows both directions. A row applies when all its parameters exist for the config (biases, q/k norms, untied heads
only exist when the config says so), so optional tensors need no special cases. Our layer paths are the unscanned
ones (`layers_{i}/...`); scanned models are stacked afterwards.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from dpo_jax.models.config import ModelConfig, RopeScaling, shaped_config

Arrays = Sequence[np.ndarray]


# ----- hooks: (to ours, to HF), each a function of the arrays and the config ---------------------------------------

@dataclasses.dataclass(frozen=True)
class Hook:
    to_ours: Callable[[Arrays, ModelConfig], list[np.ndarray]]
    to_hf: Callable[[Arrays, ModelConfig], list[np.ndarray]]


IDENTITY = Hook(lambda a, c: [a[0]], lambda a, c: [a[0]])
TRANSPOSE = Hook(lambda a, c: [a[0].T], lambda a, c: [a[0].T])


def _heads(c: ModelConfig, kind: str) -> int:
    return c.num_heads if kind == "q" else c.num_kv_heads


def linear_to_heads(kind: str) -> Hook:
    """torch Linear [H·hd, D] -> [D, H, hd]; its bias [H·hd] -> [H, hd]."""

    def to_ours(a, c):
        w, h = a[0], _heads(c, kind)
        return [w.reshape(h, c.head_dim)] if w.ndim == 1 else [w.T.reshape(w.shape[1], h, c.head_dim)]

    def to_hf(a, c):
        w = a[0]
        return [w.reshape(-1)] if w.ndim == 2 else [w.reshape(w.shape[0], -1).T]

    return Hook(to_ours, to_hf)


# torch Linear [D, H·hd] (output projection) -> [H, hd, D]
LINEAR_FROM_HEADS = Hook(
    lambda a, c: [a[0].T.reshape(c.num_heads, c.head_dim, a[0].shape[0])],
    lambda a, c: [a[0].reshape(-1, a[0].shape[-1]).T],
)
# GPT-2 Conv1D [H·hd, D] (already in x out) -> [H, hd, D]
CONV1D_FROM_HEADS = Hook(
    lambda a, c: [a[0].reshape(c.num_heads, c.head_dim, a[0].shape[-1])],
    lambda a, c: [a[0].reshape(-1, a[0].shape[-1])],
)


def _split_conv1d_qkv(a, c):
    """GPT-2 c_attn: Conv1D [D, 3·H·hd] (q | k | v) -> 3 × [D, H, hd]; bias [3·H·hd] -> 3 × [H, hd]."""
    w = a[0]
    parts = np.split(w, 3, axis=-1)
    shape = (c.num_heads, c.head_dim) if w.ndim == 1 else (w.shape[0], c.num_heads, c.head_dim)
    return [p.reshape(shape) for p in parts]


def _join_conv1d_qkv(a, c):
    flat = [x.reshape(-1) if x.ndim == 2 else x.reshape(x.shape[0], -1) for x in a]
    return [np.concatenate(flat, axis=-1)]


CONV1D_QKV = Hook(_split_conv1d_qkv, _join_conv1d_qkv)


def _split_neox_qkv(a, c):
    """GPT-NeoX query_key_value: [H·3·hd, D], per head (q, k, v) -> 3 × [D, H, hd]; bias -> 3 × [H, hd]."""
    w = a[0]
    if w.ndim == 1:
        w = w.reshape(c.num_heads, 3, c.head_dim)
        return [w[:, i] for i in range(3)]
    w = w.reshape(c.num_heads, 3, c.head_dim, w.shape[-1])
    return [w[:, i].transpose(2, 0, 1) for i in range(3)]


def _join_neox_qkv(a, c):
    if a[0].ndim == 2:
        return [np.stack(a, axis=1).reshape(-1)]
    stacked = np.stack([x.transpose(1, 2, 0) for x in a], axis=1)  # [H, 3, hd, D]
    return [stacked.reshape(-1, stacked.shape[-1])]


NEOX_QKV = Hook(_split_neox_qkv, _join_neox_qkv)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # may contain {i} (layer index); the name written on export
    ours: tuple[str, ...]  # '/'-joined param paths, may contain {i}
    hook: Hook = IDENTITY
    aliases: tuple[str, ...] = ()  # other names the same tensor has in the wild, accepted on load


def _norm_rules(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", (f"{ours}/scale",)), Rule(f"{hf}.bias", (f"{ours}/bias",))]


def _linear_rules(hf: str, ours: str, weight_hook: Hook = TRANSPOSE, bias_hook: Hook = IDENTITY) -> list[Rule]:
    return [Rule(f"{hf}.weight", (f"{ours}/kernel",), weight_hook), Rule(f"{hf}.bias", (f"{ours}/bias",), bias_hook)]


# ----- the families ---------------------------------------------------------------------------------------------

def _rope(cj: dict, default_partial: float = 1.0) -> tuple[float, RopeScaling | None, float]:
    """(theta, llama3 scaling, partial rotary factor) from transformers v5 `rope_parameters` or the legacy keys.

    `default_partial` is the family's default when the file names none (transformers' GPT-NeoX default is 0.25).
    """
    params = dict(cj.get("rope_parameters") or {})
    legacy = cj.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", cj.get("rope_theta", cj.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor",
                         cj.get("partial_rotary_factor", cj.get("rotary_pct", default_partial)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None, float(partial)
    if rope_type == "llama3":
        scaling = RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
        return float(theta), scaling, float(partial)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")


def _rope_to_hf(c: ModelConfig) -> dict:
    """Always explicit: a family's defaults (NeoX's partial factor 0.25) must not leak into an exported model."""
    params: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default",
                              "partial_rotary_factor": c.rotary_dims / c.head_dim}
    if c.rope_scaling is not None:
        params.update(dataclasses.asdict(c.rope_scaling), rope_type="llama3")
    return {"rope_parameters": params}


def _activation(name: str) -> str:
    table = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
             "silu": "silu", "swish": "silu", "relu": "relu"}
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(sorted(table))})")
    return table[name]


_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def _gpt2_config(cj: dict) -> ModelConfig:
    d, h = cj["n_embd"], cj["n_head"]
    if cj.get("scale_attn_by_inverse_layer_idx") or cj.get("reorder_and_upcast_attn"):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    return shaped_config(
        "gpt2", cj["vocab_size"], d, cj["n_layer"], h, cj.get("n_inner") or 4 * d,
        max_position_embeddings=cj["n_positions"], norm_eps=cj.get("layer_norm_epsilon", 1e-5),
        activation=_activation(cj.get("activation_function", "gelu_new")),
        tie_word_embeddings=cj.get("tie_word_embeddings", True),
    )


def _gpt2_to_hf(c: ModelConfig) -> dict:
    return {"n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
            "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps, "activation_function": _ACT_TO_HF[c.activation]}


def _gptj_config(cj: dict) -> ModelConfig:
    d, h = cj["n_embd"], cj["n_head"]
    return ModelConfig(
        vocab_size=cj["vocab_size"], hidden_size=d, num_layers=cj["n_layer"], num_heads=h, num_kv_heads=h,
        head_dim=d // h, intermediate_size=cj.get("n_inner") or 4 * d, max_position_embeddings=cj["n_positions"],
        norm_type="layernorm", norm_eps=cj.get("layer_norm_epsilon", 1e-5), rotary_dim=cj.get("rotary_dim"),
        rope_interleaved=True, residual="parallel_shared_norm", mlp_type="gelu",
        activation=_activation(cj.get("activation_function", "gelu_new")), mlp_bias=True,
        tie_word_embeddings=cj.get("tie_word_embeddings", False), lm_head_bias=True, family="gptj",
    )


def _gptj_to_hf(c: ModelConfig) -> dict:
    return {"n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings, "layer_norm_epsilon": c.norm_eps, "rotary_dim": c.rotary_dim,
            "activation_function": _ACT_TO_HF[c.activation]}


def _neox_config(cj: dict) -> ModelConfig:
    d, h = cj["hidden_size"], cj["num_attention_heads"]
    theta, scaling, partial = _rope(cj, default_partial=0.25)
    hd = d // h
    bias = cj.get("attention_bias", True)
    return ModelConfig(
        vocab_size=cj["vocab_size"], hidden_size=d, num_layers=cj["num_hidden_layers"], num_heads=h, num_kv_heads=h,
        head_dim=hd, intermediate_size=cj["intermediate_size"],
        max_position_embeddings=cj.get("max_position_embeddings", 2048), norm_type="layernorm",
        norm_eps=cj.get("layer_norm_eps", 1e-5), rotary_dim=int(hd * partial), rope_theta=theta, rope_scaling=scaling,
        residual="parallel" if cj.get("use_parallel_residual", True) else "sequential", mlp_type="gelu",
        activation=_activation(cj.get("hidden_act", "gelu")), qkv_bias=bias, attn_out_bias=bias, mlp_bias=True,
        tie_word_embeddings=cj.get("tie_word_embeddings", False), family="gpt_neox",
    )


def _neox_to_hf(c: ModelConfig) -> dict:
    return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "layer_norm_eps": c.norm_eps, "use_parallel_residual": c.residual == "parallel",
            "hidden_act": _ACT_TO_HF[c.activation], "attention_bias": c.qkv_bias, **_rope_to_hf(c)}


def _llama_config(cj: dict) -> ModelConfig:
    family = cj["model_type"]
    d, h = cj["hidden_size"], cj["num_attention_heads"]
    hd = cj.get("head_dim") or d // h
    theta, scaling, partial = _rope(cj)
    attention_bias = cj.get("attention_bias", False)
    qkv_bias = True if family == "qwen2" else attention_bias
    out_bias = False if family in ("qwen2", "mistral") else attention_bias
    sliding = None
    if family == "mistral":
        sliding = cj.get("sliding_window")
    elif cj.get("use_sliding_window"):
        raise ValueError(f"{family}: use_sliding_window (per-layer sliding windows) is not supported")
    return ModelConfig(
        vocab_size=cj["vocab_size"], hidden_size=d, num_layers=cj["num_hidden_layers"], num_heads=h,
        num_kv_heads=cj.get("num_key_value_heads") or h, head_dim=hd, intermediate_size=cj["intermediate_size"],
        max_position_embeddings=cj.get("max_position_embeddings", 2048), norm_type="rmsnorm",
        norm_eps=cj.get("rms_norm_eps", 1e-6), rotary_dim=int(hd * partial) if partial != 1.0 else None,
        rope_theta=theta, rope_scaling=scaling, mlp_type="swiglu", activation=_activation(cj.get("hidden_act", "silu")),
        qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=cj.get("mlp_bias", False), qk_norm=family == "qwen3",
        sliding_window=sliding, tie_word_embeddings=cj.get("tie_word_embeddings", False), family=family,
    )


def _llama_to_hf(c: ModelConfig) -> dict:
    out = {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
           "hidden_act": _ACT_TO_HF[c.activation], **_rope_to_hf(c)}
    if c.family in ("llama", "qwen3"):
        out["attention_bias"] = c.qkv_bias
    if c.family == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.family == "mistral":
        out["sliding_window"] = c.sliding_window
    return out


_GPT2_RULES = [
    Rule("transformer.wte.weight", ("embed/embedding",)),
    Rule("transformer.wpe.weight", ("pos_embed/embedding",)),
    *_norm_rules("transformer.ln_f", "final_norm"),
    *_norm_rules("transformer.h.{i}.ln_1", "layers_{i}/attn_norm"),
    *_norm_rules("transformer.h.{i}.ln_2", "layers_{i}/mlp_norm"),
    Rule("transformer.h.{i}.attn.c_attn.weight", tuple(f"layers_{{i}}/attn/{p}/kernel" for p in "qkv"), CONV1D_QKV),
    Rule("transformer.h.{i}.attn.c_attn.bias", tuple(f"layers_{{i}}/attn/{p}/bias" for p in "qkv"), CONV1D_QKV),
    *_linear_rules("transformer.h.{i}.attn.c_proj", "layers_{i}/attn/o", CONV1D_FROM_HEADS),
    *_linear_rules("transformer.h.{i}.mlp.c_fc", "layers_{i}/mlp/fc_in", IDENTITY),
    *_linear_rules("transformer.h.{i}.mlp.c_proj", "layers_{i}/mlp/fc_out", IDENTITY),
    Rule("lm_head.weight", ("lm_head_kernel",), TRANSPOSE),
    Rule("score.weight", ("score_kernel",), TRANSPOSE),  # *ForSequenceClassification
]

_GPTJ_RULES = [
    Rule("transformer.wte.weight", ("embed/embedding",)),
    *_norm_rules("transformer.ln_f", "final_norm"),
    *_norm_rules("transformer.h.{i}.ln_1", "layers_{i}/attn_norm"),
    *[Rule(f"transformer.h.{{i}}.attn.{p}_proj.weight", (f"layers_{{i}}/attn/{p}/kernel",), linear_to_heads(p))
      for p in "qkv"],
    Rule("transformer.h.{i}.attn.out_proj.weight", ("layers_{i}/attn/o/kernel",), LINEAR_FROM_HEADS),
    *_linear_rules("transformer.h.{i}.mlp.fc_in", "layers_{i}/mlp/fc_in"),
    *_linear_rules("transformer.h.{i}.mlp.fc_out", "layers_{i}/mlp/fc_out"),
    Rule("lm_head.weight", ("lm_head_kernel",), TRANSPOSE),
    Rule("lm_head.bias", ("lm_head_bias",)),
    Rule("score.weight", ("score_kernel",), TRANSPOSE),  # *ForSequenceClassification
]

_NEOX_RULES = [
    Rule("gpt_neox.embed_in.weight", ("embed/embedding",)),
    *_norm_rules("gpt_neox.final_layer_norm", "final_norm"),
    *_norm_rules("gpt_neox.layers.{i}.input_layernorm", "layers_{i}/attn_norm"),
    *_norm_rules("gpt_neox.layers.{i}.post_attention_layernorm", "layers_{i}/mlp_norm"),
    Rule("gpt_neox.layers.{i}.attention.query_key_value.weight",
         tuple(f"layers_{{i}}/attn/{p}/kernel" for p in "qkv"), NEOX_QKV),
    Rule("gpt_neox.layers.{i}.attention.query_key_value.bias",
         tuple(f"layers_{{i}}/attn/{p}/bias" for p in "qkv"), NEOX_QKV),
    *_linear_rules("gpt_neox.layers.{i}.attention.dense", "layers_{i}/attn/o", LINEAR_FROM_HEADS),
    *_linear_rules("gpt_neox.layers.{i}.mlp.dense_h_to_4h", "layers_{i}/mlp/fc_in"),
    *_linear_rules("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "layers_{i}/mlp/fc_out"),
    # transformers v5 calls the head `lm_head` in memory (a torch.save'd state dict) and `embed_out` on disk.
    Rule("embed_out.weight", ("lm_head_kernel",), TRANSPOSE, aliases=("lm_head.weight",)),
    Rule("score.weight", ("score_kernel",), TRANSPOSE),  # *ForSequenceClassification
]

_LLAMA_RULES = [
    Rule("model.embed_tokens.weight", ("embed/embedding",)),
    Rule("model.norm.weight", ("final_norm/scale",)),
    Rule("model.layers.{i}.input_layernorm.weight", ("layers_{i}/attn_norm/scale",)),
    Rule("model.layers.{i}.post_attention_layernorm.weight", ("layers_{i}/mlp_norm/scale",)),
    *[r for p in "qkv" for r in _linear_rules(f"model.layers.{{i}}.self_attn.{p}_proj", f"layers_{{i}}/attn/{p}",
                                              linear_to_heads(p), linear_to_heads(p))],
    *_linear_rules("model.layers.{i}.self_attn.o_proj", "layers_{i}/attn/o", LINEAR_FROM_HEADS),
    Rule("model.layers.{i}.self_attn.q_norm.weight", ("layers_{i}/attn/q_norm/scale",)),
    Rule("model.layers.{i}.self_attn.k_norm.weight", ("layers_{i}/attn/k_norm/scale",)),
    *[r for p in ("gate", "up", "down") for r in _linear_rules(f"model.layers.{{i}}.mlp.{p}_proj",
                                                               f"layers_{{i}}/mlp/{p}")],
    Rule("lm_head.weight", ("lm_head_kernel",), TRANSPOSE),
    Rule("score.weight", ("score_kernel",), TRANSPOSE),  # *ForSequenceClassification
]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the HF class name written to config.json
    classifier: str  # ... and that of a reward model (head = "score"): the *ForSequenceClassification class
    rules: list[Rule]
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    ignored: tuple[str, ...] = ()  # regexes of HF tensors that carry no weights (old buffers)

    def ignore(self, name: str, config: ModelConfig) -> bool:
        if config.tie_word_embeddings and name in ("lm_head.weight", "embed_out.weight"):
            return True  # some tied checkpoints also store the (identical) head
        return any(re.fullmatch(p, name) for p in self.ignored)


_OLD_BUFFERS = (r".*\.attn\.(masked_)?bias", r".*\.attention\.(masked_)?bias", r".*rotary_emb\.inv_freq")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification", _GPT2_RULES, _gpt2_config, _gpt2_to_hf,
               _OLD_BUFFERS),
        Family("gptj", "GPTJForCausalLM", "GPTJForSequenceClassification", _GPTJ_RULES, _gptj_config, _gptj_to_hf,
               _OLD_BUFFERS),
        Family("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification", _NEOX_RULES, _neox_config,
               _neox_to_hf, _OLD_BUFFERS),
        *[Family(name, f"{cls}ForCausalLM", f"{cls}ForSequenceClassification", _LLAMA_RULES, _llama_config,
                 _llama_to_hf, _OLD_BUFFERS)
          for name, cls in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))],
    ]
}


def head_from_hf(cj: dict) -> dict[str, Any]:
    """The ModelConfig head fields of an HF config.json: a *ForSequenceClassification checkpoint is a reward model
    (one score, read at the last token that is not `pad_token_id`); anything else a language model."""
    if not any(str(a).endswith("ForSequenceClassification") for a in cj.get("architectures") or ()):
        return {"head": "lm"}
    labels = cj.get("num_labels", len(cj["id2label"]) if "id2label" in cj else 2)  # transformers' default: 2
    if labels != 1:
        raise ValueError(f"num_labels = {labels}: a reward model has one score per sequence (num_labels = 1)")
    return {"head": "score", "pad_token_id": cj.get("pad_token_id")}


def head_to_hf(c: ModelConfig, family: Family) -> dict[str, Any]:
    if c.head == "lm":
        return {"architectures": [family.architecture]}
    return {"architectures": [family.classifier], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": c.pad_token_id}


def family_of(model_type: str | None, where: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def expand(rules: list[Rule], num_layers: int) -> list[Rule]:
    """Rules with {i} instantiated for every layer."""
    out = []
    for r in rules:
        if "{i}" in r.hf:
            out += [Rule(r.hf.format(i=i), tuple(p.format(i=i) for p in r.ours), r.hook,
                         tuple(a.format(i=i) for a in r.aliases)) for i in range(num_layers)]
        else:
            out.append(r)
    return out
