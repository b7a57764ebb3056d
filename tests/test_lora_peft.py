"""PEFT adapters out and in: our adapter directory on the HF base gives our logits; PEFT's own directory loads back."""

import jax
import numpy as np
import pytest
from peft import PeftModel

from dpo_jax.convert import load_hf_checkpoint
from dpo_jax.convert.peft import load_peft, modules, save_peft
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
    targets = tuple(sorted(modules(config)))  # every projection that is its own torch module in this family
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

    gpt2 = bases["gpt2"][1].replace(lora_rank=2, lora_targets=("q", "o"))
    with pytest.raises(ValueError, match=r"gpt2: LoRA targets \['q'\] are fused with other projections"):
        save_peft(gpt2, init_params(gpt2, jax.random.key(0)), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft(str(tmp_path), config, base)
