"""Shape presets of the models users bring, as the HF config.json fields that fix their architecture (no weights):
`model.preset = NAME` plans (`dpo-jax plan`) or trains from a random init a model of exactly that shape. The fields
are read through the same family table as a checkpoint's config.json, so a preset and the real checkpoint give the
same ModelConfig."""

from __future__ import annotations

from dpo_jax.convert.hf import config_from_hf_json
from dpo_jax.models.config import ModelConfig

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu")

HF_PRESETS: dict[str, dict] = {
    "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, intermediate_size=8192, max_position_embeddings=131072,
                        tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, max_position_embeddings=8192),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, max_position_embeddings=8192),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                     tie_word_embeddings=False),
    # the model of the peers' published TPU DPO figure (MaxText's DPO example on Tunix, v5p-8): the comparison row
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                       tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       hidden_act="silu"),
    # the DPO paper's TL;DR (GPT-J) and Anthropic HH (Pythia-2.8B) models
    "gptj-6b": dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                    n_positions=2048, activation_function="gelu_new", layer_norm_epsilon=1e-5),
    "pythia-2.8b": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2560, num_hidden_layers=32,
                        num_attention_heads=32, intermediate_size=10240, max_position_embeddings=2048,
                        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
                        layer_norm_eps=1e-5),
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a shape preset (a language model; `for_mode` makes a reward model of it)."""
    if name not in HF_PRESETS:
        raise ValueError(f"config.model.preset = {name!r}; valid: {', '.join(HF_PRESETS)}")
    return config_from_hf_json(HF_PRESETS[name], f"config.model.preset = {name!r}")[1]
