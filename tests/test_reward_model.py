"""The reward model: Bradley-Terry step against NumPy, layouts and meshes against the plain path, HF parity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as T

from dpo_jax import summaries
from dpo_jax.convert import load_hf_checkpoint, save_hf_checkpoint
from dpo_jax.data.layout import LAYOUTS, PAIRS
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.models.decoder import init_params
from dpo_jax.models.reward import as_reward_model, sequence_scores
from dpo_jax.train.engine import build_engine
from dpo_jax.train.step import StepConfig
from tests import engine_helpers as H
from tests import hf_models as HF

SHARED = LAYOUTS["shared_prompt"]
PAD = 0


def _rm(model=H.MODEL, seed=0):
    return as_reward_model(model, init_params(model, jax.random.key(seed)), PAD, jax.random.key(seed + 1))


def _rows(n, seed=0, vocab=H.MODEL.vocab_size):
    """Ragged pairs with margins; some responses end in the pad id (as an EOS that doubles as pad would)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, lc, lr = rng.integers(1, 6), rng.integers(1, 8), rng.integers(1, 8)
        prompt = rng.integers(1, vocab, p)
        chosen = np.concatenate([prompt, rng.integers(1, vocab, lc)])
        rejected = np.concatenate([prompt, rng.integers(1, vocab, lr)])
        if i % 3 == 1:
            chosen[-1] = PAD
        rows.append({"example_id": i, "chosen_input_ids": chosen.astype(np.int32),
                     "chosen_loss_mask": (np.arange(len(chosen)) >= p).astype(np.int32),
                     "rejected_input_ids": rejected.astype(np.int32),
                     "rejected_loss_mask": (np.arange(len(rejected)) >= p).astype(np.int32),
                     "margin": np.float32(rng.uniform(-1, 1))})
    return rows


def _batch(rows, pairs, layout="pairs", seq_len=16):
    kw = dict(global_batch_pairs=pairs, shuffle=False, num_epochs=1, prefetch=0, pad_id=PAD)
    return next(iter(PreferenceLoader(rows, seq_len=seq_len, layout=layout, **kw)))


def _loss(params, batch, c):
    b = {k: jnp.asarray(v) for k, v in batch.items() if k in c.batch_keys()}
    return H.loss_and_grads(params, b, c)


def test_reward_step_is_bradley_terry_of_each_sequence_scored_alone():
    """Loss and metrics of the step == the NumPy formulas on scores of each sequence run by itself, unpadded."""
    config, params = _rm()
    rows = _rows(7)
    batch = _batch(rows, 8)
    assert batch["margin"][:7].tolist() == [r["margin"] for r in rows] and batch["margin"][7] == 0
    c = StepConfig(config, mode="reward", center_rewards_coefficient=0.3)
    (total, metrics), grads = _loss(params, batch, c)

    one = jax.jit(lambda p, ids: sequence_scores(p, config, ids, jnp.ones(ids.shape, jnp.int32))[0])

    def alone(ids):  # a compile per length, but not an op-by-op (eager) run per sequence: 4x quicker
        return float(one(params, jnp.asarray(ids)[None]))

    rc = np.array([alone(r["chosen_input_ids"][:len(r["chosen_input_ids"]) - (r["chosen_input_ids"][-1] == PAD)])
                   for r in rows])
    rr = np.array([alone(r["rejected_input_ids"]) for r in rows])
    margin = np.array([r["margin"] for r in rows])
    want = np.log1p(np.exp(-(rc - rr - margin))) + 0.3 * (rc + rr) ** 2
    np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
    final = summaries.finalize(metrics)
    assert final["accuracy"] == pytest.approx(np.mean(rc > rr))
    assert final["margin"] == pytest.approx(np.mean(rc - rr), abs=1e-5)
    assert final["rewards/chosen"] == pytest.approx(rc.mean(), abs=1e-5)
    assert final["mean_reward"] == pytest.approx((rc.mean() + rr.mean()) / 2, abs=1e-5)
    assert float(jnp.abs(grads["score_kernel"]).max()) > 1e-4 and float(
        jnp.abs(grads["layers_0"]["attn"]["q"]["kernel"]).max()) > 1e-6  # the body learns from step one


@pytest.mark.parametrize("model", [H.MODEL, H.MODEL.replace(sliding_window=4)], ids=["gqa", "sliding_window"])
def test_shared_prompt_rows_give_the_same_rewards_loss_and_gradient(model):
    config, params = _rm(model)
    rows = _rows(7, seed=1)
    results = []
    for layout, seq_len in ((PAIRS, 16), (SHARED, 24)):
        c = StepConfig(config, mode="reward", layout=layout)
        results.append(_loss(params, _batch(rows, 8, layout.name, seq_len), c))
    (t0, m0), g0 = results[0]
    (t1, m1), g1 = results[1]
    np.testing.assert_allclose(t1, t0, rtol=1e-5)
    for key in m0:
        np.testing.assert_allclose(m1[key].total, m0[key].total, rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _engine(c, devices, layout=PAIRS):
    config, _ = _rm()
    return build_engine(c, config, lambda: _rm()[1], devices=devices, layout=layout)


def _train(e, batches):
    state, out = e.state, []
    for b in batches:
        state, metrics = e.train_step(state, e.shard_batch(b))
        out.append(summaries.finalize(metrics))
    return out, state


def test_sharded_accumulated_shared_prompt_reward_step_equals_one_device():
    """(2,2,2) mesh, 2 micro-batches, shared-prompt rows == one device, one micro-batch, two rows per pair (SGD)."""
    rows = _rows(16, seed=2)
    plain = [_batch(rows[i::2], 8) for i in range(2)]
    shared = [_batch(rows[i::2], 8, "shared_prompt", 24) for i in range(2)]

    def cfg(mesh, micro):
        c = H.config(mesh=mesh, pairs=8, micro=micro, lr=0.1, optimizer_name="sgd")
        c.train.mode = "reward"
        return c

    want, want_state = _train(_engine(cfg((1, 1, 1), 1), jax.devices()[:1]), plain)
    e = _engine(cfg((2, 2, 2), 2), jax.devices(), SHARED)
    got, state = _train(e, shared)
    for g, w in zip(got, want):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), _rm()[1]))
    assert float(moved) > 1e-3 and e.train_step._cache_size() == 1


def test_mode_and_head_must_agree():
    with pytest.raises(ValueError, match="train.mode = 'reward' needs a reward model"):
        StepConfig(H.MODEL, mode="reward")
    with pytest.raises(ValueError, match="train.mode = 'dpo' needs a policy"):
        StepConfig(_rm()[0], mode="dpo")


# ----- transformers *ForSequenceClassification in and out -----------------------------------------------------------

FAMILIES = ["gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3"]


def _hf_reward_model(name, seed=0):
    torch.manual_seed(seed)
    cfg = HF.CONFIGS[name]()
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    model = T.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf_batch(left):
    rng = np.random.default_rng(7)
    ids = rng.integers(1, HF.VOCAB, (3, 10))
    mask = np.ones((3, 10), np.int32)
    if left:
        mask[1, :3], mask[2, :6] = 0, 0
    else:
        mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = PAD
    ids[0, -1] = PAD  # a real trailing token equal to the pad id (EOS = pad): transformers skips it, and so must we
    return ids, mask


def _hf_scores(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions))
    return out.logits[:, 0].float().numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_sequence_classification_scores_match_and_export_reloads(name, tmp_path):
    model = _hf_reward_model(name)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf_checkpoint(str(tmp_path / "hf"))
    assert config.head == "score" and config.pad_token_id == PAD
    for left in (False, True):
        ids, mask = _hf_batch(left)
        want = _hf_scores(model, ids, mask)
        got = np.asarray(sequence_scores(params, config, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"left={left}")
    save_hf_checkpoint(config, params, str(tmp_path / "out"))
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"),
                                                                    attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__ and reloaded.config.pad_token_id == PAD
    ids, mask = _hf_batch(False)
    np.testing.assert_allclose(_hf_scores(reloaded, ids, mask), _hf_scores(model, ids, mask), atol=1e-5)


def test_our_reward_model_exports_to_transformers(tmp_path):
    """A reward model made here from a policy (scanned layers) loads with AutoModelForSequenceClassification."""
    policy = H.MODEL.replace(scan_layers=True, family="llama")
    config, params = as_reward_model(policy, init_params(policy, jax.random.key(0)), 3, jax.random.key(1))
    save_hf_checkpoint(config, params, str(tmp_path))
    hf = T.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = _hf_batch(False)
    ids[ids == PAD] = 3
    got = np.asarray(sequence_scores(params, config, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, _hf_scores(hf, ids, mask), atol=1e-4)


def test_a_classifier_with_several_labels_is_refused_naming_the_file(tmp_path):
    model = _hf_reward_model("llama")
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        cj = json.load(f)
    cj["id2label"] = {"0": "NEG", "1": "POS"}
    cj.pop("num_labels", None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cj, f)
    with pytest.raises(ValueError, match=r"config\.json: num_labels = 2: a reward model has one score"):
        load_hf_checkpoint(str(tmp_path))
