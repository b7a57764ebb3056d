"""The Pallas pair-attention kernel (models/pair_attention.py) against XLA attention under the decoder's own mask, in
Pallas interpret mode on the CPU: values at real tokens and gradients, for the pair-rows, shared-prompt and packed
layouts, GQA, a sliding window and padding rows; the decoder with attention_impl="pallas" against "xla"; and, where
libtpu is installed, the kernel compiled for a TPU, its temporaries linear in T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data.packing import PROMPT
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, build_attention_mask, init_params
from dpo_jax.models.pair_attention import pair_attention


def _rows(layout: str, t: int):
    """(valid, segment_ids or None, positions) [2, t] for two rows of a layout, each with padding at its end."""
    valid, segments, positions = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
    if layout == "pairs":
        for row, n in enumerate((t - 7, t - 2)):
            valid[row, :n], positions[row, :n] = 1, np.arange(n)
        return valid, None, positions
    per_row = {"shared_prompt": [[(5, 9, 7)], [(11, 4, 13)]],
               "packed": [[(5, 4, 6), (3, 7, 2), (4, 3, 3)], [(10, 9, 12)]]}[layout]
    for row, pairs in enumerate(per_row):
        i = 0
        for group, (prompt, chosen, rejected) in enumerate(pairs):
            for role, n in ((PROMPT, prompt), (PROMPT + 1, chosen), (PROMPT + 2, rejected)):
                start = 0 if role == PROMPT else prompt
                segments[row, i:i + n], valid[row, i:i + n] = 4 * group + role, 1
                positions[row, i:i + n] = np.arange(start, start + n)
                i += n
    return valid, segments, positions


@pytest.mark.parametrize("layout,heads,kv_heads,window", [
    ("pairs", 4, 4, None), ("pairs", 4, 2, 5), ("shared_prompt", 4, 1, None), ("packed", 4, 2, None),
    ("packed", 2, 2, 6)])
def test_kernel_values_and_gradients_equal_xla(layout, heads, kv_heads, window):
    t, d = 40, 16  # not a multiple of the block (16): the kernel pads
    valid, segments, positions = _rows(layout, t)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, kv_heads, d)), jnp.float32) for _ in range(2))
    config = ModelConfig(vocab_size=8, hidden_size=heads * d, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=d, intermediate_size=8, sliding_window=window)
    shared = None if segments is None else PROMPT
    mask = build_attention_mask(config, jnp.arange(t), jnp.asarray(valid),
                                None if segments is None else jnp.asarray(segments), shared, jnp.asarray(positions))

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=d**-0.5)

    def kernel(q, k, v):
        return pair_attention(q, k, v, key_valid=jnp.asarray(valid),
                              segment_ids=None if segments is None else jnp.asarray(segments),
                              positions=jnp.asarray(positions), shared_segment=shared, sliding_window=window,
                              scale=d**-0.5, block=16, interpret=True)

    real = valid[:, :, None, None].astype(bool)
    np.testing.assert_allclose(np.where(real, kernel(q, k, v), 0), np.where(real, xla(q, k, v), 0), atol=2e-6)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real  # a loss that reads real tokens only
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), (0, 1, 2))(q, k, v) for f in (kernel, xla)]
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(ours, theirs, atol=5e-6)


def test_decoder_with_the_kernel_equals_xla_on_packed_rows():
    """The whole decoder (2 scanned layers, GQA, a window) on packed rows: hidden states at real tokens and parameter
    gradients equal with attention_impl pallas and xla."""
    base = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       intermediate_size=64, sliding_window=12, scan_layers=True, attention_impl="xla")
    params = init_params(base, jax.random.key(0))
    t = 40
    valid, segments, positions = _rows("packed", t)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, t)), jnp.int32)
    real = jnp.asarray(valid[..., None], jnp.float32)

    def loss(p, config):
        hidden = Decoder(config).apply({"params": p}, ids, positions=jnp.asarray(positions),
                                       segment_ids=jnp.asarray(segments), attention_mask=jnp.asarray(valid),
                                       shared_segment=PROMPT)
        return jnp.sum(jnp.sin(hidden) * real), hidden * real

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, h_xla), g_xla = step(params, base)
    (_, h_kernel), g_kernel = step(params, base.replace(attention_impl="pallas"))
    np.testing.assert_allclose(h_kernel, h_xla, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5), g_kernel, g_xla)


def _tpu_devices():
    try:
        from dpo_jax.plan.chips import topology_devices

        return topology_devices("v5e:2x2")
    except ValueError as e:
        pytest.fail(f"libtpu (the test extra) should give TPU topologies here: {e}")


def _attention_memory_bytes(t: int, devices) -> int:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dpo_jax.compile_target import compiling_for
    from dpo_jax.sharding import on_mesh

    mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    q = jax.ShapeDtypeStruct((len(devices), t, 8, 128), jnp.bfloat16, sharding=rows)
    meta = jax.ShapeDtypeStruct((len(devices), t), jnp.int32, sharding=rows)

    def loss(q, valid, segments, positions):
        out = pair_attention(q, q, q, key_valid=valid, segment_ids=segments, positions=positions,
                             shared_segment=PROMPT, scale=0.1)
        return jnp.sum(out.astype(jnp.float32))

    with compiling_for("tpu"):
        compiled = jax.jit(on_mesh(jax.grad(loss), mesh)).lower(q, meta, meta, meta).compile()
    memory = compiled.memory_analysis()
    return memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes


def test_kernel_compiles_for_tpu_and_its_memory_grows_linearly_in_t():
    """Forward and backward lower through Mosaic for a v5e (shard_mapped over the mesh), and from 16k to 32k tokens
    per row the gradient's memory (arguments, outputs, temporaries) about doubles, linear (quadratic: 4x), and
    stays below one head's T x T float32 score matrix (4 GiB at 32k)."""
    devices = _tpu_devices()
    small, large = _attention_memory_bytes(16384, devices), _attention_memory_bytes(32768, devices)
    assert 0 < small < large <= 2.5 * small
    assert large < 32768**2 * 4
