"""ModelConfig: the switches that make one decoder cover GPT-2, GPT-NeoX/Pythia, GPT-J and the Llama family."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_TYPES = ("rotary", "learned")
RESIDUAL_TYPES = ("sequential", "parallel", "parallel_shared_norm")
MLP_TYPES = ("swiglu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None  # jax.nn.dot_product_attention(implementation=...): None, "xla", "cudnn"

    def __post_init__(self):
        checks = [
            ("norm_type", self.norm_type, NORM_TYPES),
            ("position_embedding", self.position_embedding, POSITION_TYPES),
            ("residual", self.residual, RESIDUAL_TYPES),
            ("mlp_type", self.mlp_type, MLP_TYPES),
            ("activation", self.activation, ACTIVATIONS),
            ("remat_policy", self.remat_policy, REMAT_POLICIES),
        ]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"ModelConfig.{name} = {value!r}; valid: {', '.join(valid)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        rd = self.rotary_dim
        if rd is not None and (rd > self.head_dim or rd % 2):
            raise ValueError(f"ModelConfig.rotary_dim = {rd} must be even and <= head_dim ({self.head_dim})")
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

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
