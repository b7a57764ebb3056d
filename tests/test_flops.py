"""FLOP accounting against a hand count, and the peak table."""

import pytest

from dpo_jax.flops import forward_flops_per_token, matmul_params, peak_tflops, train_step_flops
from dpo_jax.models.config import ModelConfig


def test_matmul_params_and_step_flops_by_hand():
    c = ModelConfig(vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                    intermediate_size=16)
    attn = 8 * 4 * (2 * 2 + 2 * 1)  # q and o: 2 heads each; k and v: 1 kv head each
    mlp = 3 * 8 * 16  # swiglu: gate, up, down
    assert matmul_params(c) == 2 * (attn + mlp) + 8 * 100
    per_token = 2 * matmul_params(c) + 2 * 2 * 2 * 2 * 4 * 10 / 2  # layers x (QK + AV) x 2 flops x heads x hd x T/2
    assert forward_flops_per_token(c, 10) == pytest.approx(per_token)
    assert train_step_flops(c, rows=3, seq_len=10) == pytest.approx(3 * per_token * 30)
    reward_model = c.replace(head="score")  # no vocabulary projection: a [D, 1] head, whatever the score window
    assert matmul_params(reward_model) == matmul_params(c) - c.hidden_size * (c.vocab_size - 1)
    assert train_step_flops(reward_model, 3, 10, scored_positions=4) == train_step_flops(reward_model, 3, 10)
    unembedding = 2 * c.hidden_size * c.vocab_size  # per position; a score window of 4 skips 6 of 10 positions
    assert train_step_flops(c, rows=3, seq_len=10, scored_positions=4) == pytest.approx(3 * (per_token * 10 - 6 *
                                                                                                 unembedding) * 3)
    assert train_step_flops(c, rows=3, seq_len=10, scored_positions=10) == train_step_flops(c, rows=3, seq_len=10)


def test_peak_table():
    assert peak_tflops("TPU v4") == 275.0 and peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("cpu") == 0.0
