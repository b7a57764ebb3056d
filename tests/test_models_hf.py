"""HF parity: tiny random PyTorch models of every family -> our Decoder (same logits) -> HF again (same logits)."""

import functools
import gc
import json
import os
import weakref
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file

from dpo_jax.convert import load_hf_checkpoint, save_hf_checkpoint
from dpo_jax.convert.hf import expected_shapes
from dpo_jax.convert.tensors import CheckpointReader
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, init_params, logical_axes, logits
from tests import hf_models as H

AXIS_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", None}


def _batch(seed=0, left=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, H.VOCAB, (3, 12))
    mask = np.ones((3, 12), np.int32)
    if left:
        mask[1, :4], mask[2, :9] = 0, 0
    else:
        mask[1, 8:], mask[2, 3:] = 0, 0
    return ids, mask


def _ours(config, params, ids, mask):
    return np.asarray(_logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))


@functools.partial(jax.jit, static_argnums=0)  # compiled, not op by op (the suite's time)
def _logits(config, params, ids, mask):
    return logits(params, config, Decoder(config).apply({"params": params}, ids, attention_mask=mask))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, directory it was saved to)."""
    out = {}
    for name in H.CONFIGS:
        model = H.build(name)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", list(H.CONFIGS))
def test_load_matches_hf_logits_and_export_reloads_in_transformers(name, saved, tmp_path):
    model, path = saved[name]
    ids, mask = _batch()
    want = H.hf_logits(model, ids, mask)
    config, params = load_hf_checkpoint(path)
    real = mask.astype(bool)
    assert np.abs(_ours(config, params, ids, mask) - want)[real].max() <= 1e-4

    files = save_hf_checkpoint(config, params, str(tmp_path), max_shard_bytes=40_000)
    assert len(files) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    reloaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__
    assert np.abs(H.hf_logits(reloaded, ids, mask) - want)[real].max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox"])
def test_left_padded_batch_matches_hf_with_its_position_ids(name, saved):
    model, path = saved[name]
    ids, mask = _batch(1, left=True)
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(position_ids)).logits.numpy()
    config, params = load_hf_checkpoint(path)
    assert np.abs(_ours(config, params, ids, mask) - want)[mask.astype(bool)].max() <= 1e-4


def test_mistral_sliding_window_is_really_applied(saved):
    model, path = saved["mistral"]
    ids, mask = _batch()
    config, params = load_hf_checkpoint(path)
    assert config.sliding_window == 5
    full_attention = _ours(config.replace(sliding_window=None), params, ids, mask)
    assert np.abs(full_attention - H.hf_logits(model, ids, mask))[mask.astype(bool)].max() > 1e-3


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_and_rematerialised_layers_compute_the_same(saved, remat):
    _, path = saved["qwen3"]
    ids, mask = _batch()
    config, params = load_hf_checkpoint(path)
    scan_config, scan_params = load_hf_checkpoint(path, config_overrides={"scan_layers": True, "remat_policy": remat})
    assert scan_params["layers"]["attn"]["q"]["kernel"].shape[0] == config.num_layers
    np.testing.assert_allclose(_ours(scan_config, scan_params, ids, mask), _ours(config, params, ids, mask),
                               atol=1e-5)

    def loss(p, c):
        return jnp.sum(Decoder(c).apply({"params": p}, jnp.asarray(ids)) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # compiled, not op by op (the suite's time)
    g_scan = grad(scan_params, scan_config)["layers"]["mlp"]["down"]["kernel"]
    g_flat = grad(params, config)
    np.testing.assert_allclose(np.asarray(g_scan[1]), np.asarray(g_flat["layers_1"]["mlp"]["down"]["kernel"]),
                               rtol=1e-4, atol=1e-5)


def test_sharded_safetensors_and_pytorch_bin_load_the_same(saved, tmp_path):
    model, path = saved["gpt_neox"]
    ids, mask = _batch()
    want = H.hf_logits(model, ids, mask)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((open(os.path.join(path, "config.json")).read()))
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    for d in (tmp_path / "sharded", bin_dir):
        config, params = load_hf_checkpoint(str(d))
        assert np.abs(_ours(config, params, ids, mask) - want)[mask.astype(bool)].max() <= 1e-4


def test_bfloat16_forward_is_close_to_float32(saved):
    """bf16 compute and params vs float32 on the same weights: logits within 0.03 absolute, ~3x the measured
    0.01 on logits of magnitude ~1 (docs/ARCHITECTURE.md); bf16 keeps 8 mantissa bits."""
    _, path = saved["llama"]
    ids, mask = _batch()
    config, params = load_hf_checkpoint(path)
    bf_config, bf_params = load_hf_checkpoint(path, "bfloat16", config_overrides={"dtype": "bfloat16"})
    assert bf_params["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    hidden = Decoder(bf_config).apply({"params": bf_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert hidden.dtype == jnp.bfloat16
    got = np.asarray(logits(bf_params, bf_config, hidden))
    want = _ours(config, params, ids, mask)
    assert got.dtype == np.float32
    assert np.abs(got - want)[mask.astype(bool)].max() < 0.03


def _write_variant(src, dst, edit):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        (dst / "config.json").write_text(f.read())


def test_checkpoint_mismatches_name_the_tensor(saved, tmp_path):
    _, path = saved["llama"]
    _write_variant(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_checkpoint(str(tmp_path / "missing"))
    _write_variant(path, tmp_path / "extra", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                                  np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_hf_checkpoint(str(tmp_path / "extra"))
    _write_variant(path, tmp_path / "shape", lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match=r"tensor model.norm.weight has shape \(31,\).*expected \(32,\)"):
        load_hf_checkpoint(str(tmp_path / "shape"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported: gpt2"):
        load_hf_checkpoint(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match="no weights found"):
        load_hf_checkpoint(str(tmp_path / "noweights"))


def test_loading_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The loader reads, converts and places one tensor before reading the next: no raw checkpoint tensor is still
    alive when the next is read, and peak host (numpy) memory is a small fraction of the checkpoint."""
    config = T.LlamaConfig(vocab_size=64, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=512)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    total = sum(t.nbytes for t in tensors.values())
    del tensors

    refs, max_alive_at_read, reads = [], [], []
    original_get = CheckpointReader.get

    class Tracked(np.ndarray):  # weakref-able ndarray view of what the reader returned
        pass

    def tracked_get(self, name):
        gc.collect()  # fast: everything older than the load is frozen (gc.freeze below)
        max_alive_at_read.append(sum(r() is not None for r in refs))
        reads.append(name)
        raw = original_get(self, name).view(Tracked)
        refs.append(weakref.ref(raw))
        return raw

    load_hf_checkpoint(str(tmp_path), progress=False)  # warm-up: one-time allocations (compiles) are not the load's
    monkeypatch.setattr(CheckpointReader, "get", tracked_get)
    gc.collect()
    gc.freeze()  # the collections per read then scan only what the load allocates
    tracemalloc.start()
    try:
        load_hf_checkpoint(str(tmp_path), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    assert len(reads) == len(set(reads)) == 6 * 9 + 3  # each tensor read exactly once
    assert max(max_alive_at_read) == 0
    assert peak < total / 3, (peak, total)


def test_every_parameter_has_logical_axes():
    for scan in (False, True):
        config = ModelConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                             intermediate_size=24, qk_norm=True, qkv_bias=True, scan_layers=scan)
        axes = logical_axes(config)
        params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # shapes are enough
        for spec, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(params)):
            assert len(spec) == p.ndim and set(spec) <= AXIS_NAMES, (spec, p.shape)
        assert axes["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
        if scan:
            assert axes["layers"]["attn"]["k"]["kernel"][0] == "layers"
    assert set(expected_shapes(config)) >= {"lm_head_kernel", "layers_1/attn/k_norm/scale"}


def test_model_config_rejects_bad_values():
    base = dict(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                intermediate_size=8)
    with pytest.raises(ValueError, match="norm_type = 'batchnorm'; valid: rmsnorm, layernorm"):
        ModelConfig(**base, norm_type="batchnorm")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="rotary_dim = 5"):
        ModelConfig(**base, rotary_dim=5)
    config = ModelConfig(**base)
    assert ModelConfig.from_json(config.to_json()) == config
