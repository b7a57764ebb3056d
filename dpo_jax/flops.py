"""FLOP accounting for the policy train step, as MaxText counts it.

Forward FLOPs per token = 2 × (matmul parameters) + attention (2 matmuls of 2·heads·head_dim·T each, halved for
causal masking). Training = 3 × forward (forward + backward). The reference pass is not part of the step.
"""

from __future__ import annotations

from dpo_jax.models.config import ModelConfig


def matmul_params(c: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (embedding lookups excluded; the unembedding included, or for
    a reward model its [D, 1] score head)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = (3 if c.mlp_type == "swiglu" else 2) * c.hidden_size * c.intermediate_size
    return c.num_layers * (attn + mlp) + c.hidden_size * (c.vocab_size if c.head == "lm" else 1)


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    attention = c.num_layers * 2 * 2 * c.num_heads * c.head_dim * seq_len / 2  # QK^T and AV, causal half
    return 2.0 * matmul_params(c) + attention


def train_step_flops(c: ModelConfig, rows: int, seq_len: int, scored_positions: int = 0) -> float:
    """FLOPs of one policy train step over `rows` sequences of `seq_len` tokens (padding included: it is computed).
    scored_positions: > 0 when the unembedding runs on only that many positions per row (the step's score
    window), so that only computed FLOPs are counted."""
    forward = forward_flops_per_token(c, seq_len) * seq_len
    if 0 < scored_positions < seq_len and c.head == "lm":
        forward -= 2.0 * c.hidden_size * c.vocab_size * (seq_len - scored_positions)
    return 3.0 * forward * rows


# Dense bf16 peak TFLOP/s per device, by `jax.devices()[0].device_kind` substring (vendor spec sheets).
PEAK_TFLOPS = (("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
               ("TPU v5", 459.0),  # v5p's device kind is "TPU v5": after "TPU v5 lite", which it prefixes
               ("TPU v6", 918.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0))


def peak_tflops(device_kind: str) -> float:
    """The device's bf16 peak, or 0 when unknown (then MFU is not reported)."""
    return next((v for k, v in PEAK_TFLOPS if k.lower() in device_kind.lower()), 0.0)
