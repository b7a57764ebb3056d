"""PEFT adapters out and in: our adapter directory on the HF base gives our logits; PEFT's own directory loads back."""

import jax
import numpy as np
import pytest
from peft import PeftModel

from dpo_jax.convert import load_hf_checkpoint
from dpo_jax.convert.peft import fused_modules, load_peft, modules, save_peft
from dpo_jax.models import lora
from dpo_jax.models.decoder import init_params
from dpo_jax.train.model_source import default_model_config, model_loader
from tests import hf_models as H
from tests.test_lora import _randomize_b
from tests.test_models_hf import _batch, _ours


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (HF model directory, our config, our params)."""
    out = {}
    for name in H.CONFIGS:
        path = str(tmp_path_factory.mktemp(name))
        H.build(name).save_pretrained(path)
        config, params = load_hf_checkpoint(path)
        out[name] = (path, config, params)
    return out


@pytest.mark.parametrize("name", list(H.CONFIGS))
def test_our_adapter_on_the_hf_base_through_peft_gives_our_logits_and_loads_back(name, bases, tmp_path):
    path, config, base = bases[name]
    fused = {n for names, _, _ in fused_modules(config).values() for n in names}  # GPT-2, NeoX: q, k, v in one
    targets = tuple(sorted(set(modules(config)) | fused))  # every projection, fused or its own torch module
    lora_config = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    adapters = lora.split(_randomize_b(init_params(lora_config, jax.random.key(1))))[1]
    params = lora.merge(base, adapters)
    ids, mask = _batch()
    ours = _ours(lora_config, params, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - _ours(config, base, ids, mask))[real].max() > 1e-3  # the adapters do change the model

    save_peft(lora_config, params, str(tmp_path / "adapter"), base_model=path)
    hf = PeftModel.from_pretrained(H.build(name), str(tmp_path / "adapter")).eval()
    assert np.abs(H.hf_logits(hf, ids, mask) - ours)[real].max() <= 1e-4

    back_config, back = load_peft(str(tmp_path / "adapter"), config, base)
    assert (back_config.lora_rank, back_config.lora_alpha, set(back_config.lora_targets)) == (4, 8.0, set(targets))
    for (k, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree_util.tree_flatten_with_path(back)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))


def test_peft_saved_adapters_load_as_ours_and_bad_ones_are_refused(bases, tmp_path):
    """An adapter PEFT itself trained-and-saved (B random) loads onto our base with PEFT's logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    path, config, base = bases["llama"]
    model = get_peft_model(H.build("llama"), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "peft"))
    ids, mask = _batch()
    want = H.hf_logits(model.eval(), ids, mask)
    lora_config, params = load_peft(str(tmp_path / "peft"), config, base)
    assert set(lora_config.lora_targets) == {"q", "down"} and lora_config.lora_rank == 2
    assert np.abs(_ours(lora_config, params, ids, mask) - want)[mask.astype(bool)].max() <= 1e-4
    # The same through a run's model section (model.lora.peft_path), with scanned layers: a policy to train on.
    m = default_model_config()
    m.source, m.path, m.scan_layers, m.lora.peft_path = "hf", path, True, str(tmp_path / "peft")
    scanned_config, load = model_loader(m, H.VOCAB)
    assert scanned_config.lora_rank == 2 and scanned_config.scan_layers
    assert np.abs(_ours(scanned_config, load(), ids, mask) - want)[mask.astype(bool)].max() <= 1e-4
    m.lora.rank = 8
    with pytest.raises(ValueError, match="config.model.lora.rank = 8, but the PEFT adapter in"):
        model_loader(m, H.VOCAB)

    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft(str(tmp_path), config, base)


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_fused_qkv_adapters_through_peft_both_forms(name, bases, tmp_path):
    """q and o only on a fused-QKV family: one rank-3r adapter of the fused module (k, v as zero blocks) gives our
    logits through PEFT and splits back exactly; an adapter PEFT trained on the fused module at rank r (lora_A shared
    by q, k, v) loads with PEFT's logits; a rank-3r one that is not block-diagonal, and a rank pattern on a module
    that is not fused, are refused naming the module or key."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    path, config, base = bases[name]
    lora_config = config.replace(lora_rank=2, lora_alpha=6.0, lora_targets=("q", "o"))
    params = lora.merge(base, lora.split(_randomize_b(init_params(lora_config, jax.random.key(2))))[1])
    ids, mask = _batch()
    real = mask.astype(bool)
    ours = _ours(lora_config, params, ids, mask)
    out = str(tmp_path / "ours")
    save_peft(lora_config, params, out, base_model=path)
    with open(f"{out}/adapter_config.json") as f:
        written = json.load(f)
    (module,) = fused_modules(config)
    key = ".".join(module.split(".")[-2:])
    assert written["rank_pattern"] == {key: 6} and written["alpha_pattern"] == {key: 18.0} and written["r"] == 2
    hf = PeftModel.from_pretrained(H.build(name), out).eval()
    assert np.abs(H.hf_logits(hf, ids, mask) - ours)[real].max() <= 1e-4
    back_config, back = load_peft(out, config, base)
    assert set(back_config.lora_targets) == {"q", "k", "v", "o"}
    np.testing.assert_allclose(_ours(back_config, back, ids, mask)[real], ours[real], atol=1e-5)
    flat_back = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(np.asarray(flat_back[path_]), np.asarray(leaf), err_msg=str(path_))

    leaf = module.split(".")[-1]
    model = get_peft_model(H.build(name), LoraConfig(r=2, lora_alpha=4, target_modules=[leaf]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "peft"))
    shared_config, shared = load_peft(str(tmp_path / "peft"), config, base)
    assert set(shared_config.lora_targets) == {"q", "k", "v"} and shared_config.lora_rank == 2
    assert np.abs(_ours(shared_config, shared, ids, mask) - H.hf_logits(model.eval(), ids, mask))[real].max() <= 1e-4

    from safetensors.numpy import load_file, save_file

    tensors = load_file(f"{out}/adapter_model.safetensors")
    b_name = next(k for k in tensors if k.endswith(module.format(i=0) + ".lora_B.weight"))
    tensors[b_name] = tensors[b_name] + 0.1  # every block now touches every part
    save_file(tensors, f"{out}/adapter_model.safetensors")
    with pytest.raises(ValueError, match="is not block-diagonal"):
        load_peft(out, config, base)
    written["rank_pattern"] = {"mlp.c_fc" if name == "gpt2" else "dense_h_to_4h": 4}
    with open(f"{out}/adapter_config.json", "w") as f:
        json.dump(written, f)
    with pytest.raises(ValueError, match="rank_pattern sets"):
        load_peft(out, config, base)
