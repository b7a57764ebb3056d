"""ModelConfig: the switches that make one decoder cover GPT-2, GPT-NeoX/Pythia, GPT-J and the Llama family."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_TYPES = ("rotary", "learned")
RESIDUAL_TYPES = ("sequential", "parallel", "parallel_shared_norm")
MLP_TYPES = ("swiglu", "gelu")
HEADS = ("lm", "score")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = (None, "xla", "cudnn", "pallas")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc_in", "fc_out")  # the decoder's projection names


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a `Decoder`. Frozen and hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    position_embedding: str = "rotary"
    rotary_dim: int | None = None  # None: the whole head; else the first rotary_dim dims (partial rotary)
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # GPT-J rotates pairs (0,1),(2,3)..; NeoX/Llama rotate halves
    rope_scaling: RopeScaling | None = None
    residual: str = "sequential"  # parallel: x + attn(n1(x)) + mlp(n2(x)); parallel_shared_norm: GPT-J, one norm
    mlp_type: str = "swiglu"
    activation: str = "silu"
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys, itself included
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    family: str = "llama"  # HF model_type, used for export
    head: str = "lm"  # lm: next-token unembedding (a policy); score: a scalar reward head (*ForSequenceClassification)
    pad_token_id: int | None = None  # score head: read at each sequence's last token that is not this id (HF's rule)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    scan_unroll: int = 1  # layers per scanned loop iteration (`dpo-jax plan` unrolls 2 to count one layer's cost)
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: automatic (the Pallas kernel on TPU, else XLA's); "xla", "cudnn"
    #   (jax.nn.dot_product_attention's), or "pallas" (models/pair_attention.py; interpret mode off TPU)
    attention_query_block: int = 0  # > 0: XLA attention over T >= 1.5 x this skips the causal upper triangle in
    #   query blocks of about this many rows (attention.causal_attention); 0: one dense T x T
    lora_rank: int = 0  # > 0: low-rank adapters (models/lora.py) on the `lora_targets` projections
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank (PEFT's convention)
    lora_targets: tuple[str, ...] = ()  # projection names: q, k, v, o, gate, up, down, fc_in, fc_out
    lora_dropout: float = 0.0  # PEFT's lora_dropout on each adapter's input, in steps that pass a dropout key

    def __post_init__(self):
        checks = [
            ("norm_type", self.norm_type, NORM_TYPES),
            ("position_embedding", self.position_embedding, POSITION_TYPES),
            ("residual", self.residual, RESIDUAL_TYPES),
            ("mlp_type", self.mlp_type, MLP_TYPES),
            ("activation", self.activation, ACTIVATIONS),
            ("remat_policy", self.remat_policy, REMAT_POLICIES),
            ("head", self.head, HEADS),
        ]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"ModelConfig.{name} = {value!r}; valid: {', '.join(valid)}")
        if self.scan_unroll < 1:
            raise ValueError(f"ModelConfig.scan_unroll = {self.scan_unroll} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        rd = self.rotary_dim
        if rd is not None and (rd > self.head_dim or rd % 2):
            raise ValueError(f"ModelConfig.rotary_dim = {rd} must be even and <= head_dim ({self.head_dim})")
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # from JSON: a list (unhashable)
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
            raise ValueError(f"ModelConfig: lora_rank = {self.lora_rank}, lora_targets = {self.lora_targets}: a rank "
                             f">= 0 and, with a rank, targets among {', '.join(LORA_TARGETS)}"
                             + (f" (unknown: {unknown})" if unknown else ""))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl = {self.attention_impl!r}; valid: '' (automatic), xla, "
                             "cudnn, pallas")
        if self.attention_query_block < 0:
            raise ValueError(f"ModelConfig.attention_query_block = {self.attention_query_block}: a row count >= 0 "
                             "(0: one dense T x T attention)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"ModelConfig.lora_dropout = {self.lora_dropout}: a probability in [0, 1)")

    @property
    def rotary_dims(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig JSON has unknown keys: {sorted(unknown)}")
        return cls(**data)


# Each from-scratch family's switches; a checkpoint's own config.json is read by convert/families.py instead.
FAMILY_SWITCHES: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm_type="layernorm", norm_eps=1e-5, position_embedding="learned", mlp_type="gelu",
                 activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                 family="gpt2"),
    "llama": dict(family="llama"),  # ModelConfig's defaults are Llama's (RMSNorm, rotary, SwiGLU, no biases)
}

# nanoGPT-style table of shapes: family, width, depth, heads, MLP width. The config `model` section has the same
# keys, so `c.model.update(PRESETS[name])` picks a shape; the vocabulary always comes from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(family="gpt2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),  # tiny.py
    "gpt2-sentiment": dict(family="gpt2", hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512),
    "gpt2-bench": dict(family="gpt2", hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048),
    "llama-bench": dict(family="llama", hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048),
    "gpt2-small": dict(family="gpt2", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "gpt2-medium": dict(family="gpt2", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "gpt2-large": dict(family="gpt2", hidden_size=1280, num_layers=36, num_heads=20, intermediate_size=5120),
}


def shaped_config(family: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int, **overrides: Any) -> ModelConfig:
    """A from-scratch ModelConfig: `family`'s switches with this shape (multi-head attention, head_dim = D / H);
    `overrides` set any other field (max_position_embeddings, dtype, remat_policy, ...)."""
    if family not in FAMILY_SWITCHES:
        raise ValueError(f"model family {family!r} for a from-scratch model; valid: {', '.join(FAMILY_SWITCHES)}")
    return ModelConfig(**{**FAMILY_SWITCHES[family], "vocab_size": vocab_size, "hidden_size": hidden_size,
                          "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_heads,
                          "head_dim": hidden_size // num_heads, "intermediate_size": intermediate_size, **overrides})
