"""Tiny random HF PyTorch models (built from configs, nothing downloaded) for parity tests."""

import numpy as np
import torch
import transformers as T

VOCAB = 61


def _llama_like(cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64)
    return cls(**{**base, **kw})


CONFIGS = {
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64),
    "gpt_neox_sequential": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, rotary_pct=1.0,
                                                   use_parallel_residual=False, max_position_embeddings=64,
                                                   tie_word_embeddings=False),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "llama": lambda: _llama_like(T.LlamaConfig),
    "llama3_scaled_tied": lambda: _llama_like(
        T.LlamaConfig, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "mistral": lambda: _llama_like(T.MistralConfig, sliding_window=5),
    "qwen2": lambda: _llama_like(T.Qwen2Config),
    "qwen3": lambda: _llama_like(T.Qwen3Config, head_dim=16),
}


def build(name, seed=0):
    """A tiny random model with eager attention, its weights perturbed so that norms and biases are not trivial."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, input_ids, attention_mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long))
    return out.logits.float().numpy()
