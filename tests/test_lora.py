"""LoRA: the adapters start at zero, only they train, and the reference is the same base with them off."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import summaries
from dpo_jax.models import lora
from dpo_jax.models.config import shaped_config
from dpo_jax.models.decoder import Decoder, init_params, logical_axes, logits
from dpo_jax.train.engine import build_engine
from dpo_jax.train.step import StepConfig
from tests import engine_helpers as H
from tests.hf_models import hf_logits

LLAMA = H.MODEL.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
GPT2 = shaped_config("gpt2", 64, 32, 2, 4, 64).replace(lora_rank=2, lora_targets=("q", "v", "fc_in", "fc_out"))


@functools.partial(jax.jit, static_argnums=0)  # compiled, not op by op (tests/conftest.py)
def _hidden(config, params, ids):
    return Decoder(config).apply({"params": params}, ids)


def _randomize_b(params, seed=0):
    """Adapters as after some training (B != 0)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    flat = {k: (0.3 * jax.random.normal(next(keys), v.shape) if k[-1].key == "b" else v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    return jax.tree_util.tree_map_with_path(lambda k, v: flat[k], params)


@pytest.mark.parametrize("model", [LLAMA, GPT2, LLAMA.replace(scan_layers=True)], ids=["llama", "gpt2", "scanned"])
def test_a_new_adapter_is_the_base_model_and_merging_a_trained_one_is_exact(model):
    params = init_params(model, jax.random.key(0))
    base = lora.base_params(params)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, model.vocab_size)
    np.testing.assert_array_equal(_hidden(model, params, ids), _hidden(lora.base_config(model), base, ids))
    # The base tree is exactly what a model without adapters initialises (same paths, shapes and values).
    plain = init_params(lora.base_config(model), jax.random.key(0))
    assert jax.tree.structure(plain) == jax.tree.structure(base)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(base)))
    trained = _randomize_b(params)
    moved = _hidden(model, trained, ids)
    assert float(jnp.abs(moved - _hidden(model, params, ids)).max()) > 1e-3
    merged = lora.merged(trained, model)
    np.testing.assert_allclose(_hidden(lora.base_config(model), merged, ids), moved, atol=2e-5)
    # Adapters shard like their projection's inputs and outputs; the rank axis is replicated.
    axes = logical_axes(model)["layers" if model.scan_layers else "layers_0"]["attn"]
    a, b = axes["q_lora"]["a"], axes["q_lora"]["b"]
    assert tuple(a)[-2:] == ("embed", None) and tuple(b)[-3:] == (None, "heads", "head_dim")


def test_training_moves_only_the_adapters_and_the_optimizer_state_is_theirs():
    c = H.config(optimizer_name="adamw", lr=1e-2)
    e = build_engine(c, LLAMA, lambda: init_params(LLAMA, jax.random.key(0)), devices=jax.devices()[:1])
    before = jax.device_get(e.state.params)
    history, state = H.run(e, 3, 8)
    after = jax.device_get(state.params)
    frozen_before, adapters_before = lora.split(before)
    frozen_after, adapters_after = lora.split(after)
    for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(x, y)  # bit-identical
    assert all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters_before),
                                                        jax.tree.leaves(adapters_after)))
    adapter_size = sum(x.size for x in jax.tree.leaves(adapters_before))
    state_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert adapter_size < sum(x.size for x in jax.tree.leaves(frozen_before)) / 4
    assert state_size <= 2 * adapter_size + 16  # Adam's mu and nu over the adapters, a step count: nothing else
    assert history[-1]["loss"] < history[0]["loss"]


def test_the_base_reference_equals_a_separately_held_base_model():
    """dpo.reference = base: the reference log-probs inside the step are the base model's, adapters off."""
    params = _randomize_b(init_params(LLAMA, jax.random.key(3)))
    base_model, base = lora.base_config(LLAMA), lora.base_params(params)
    batch = {k: jnp.asarray(v) for k, v in H.local_batch(0, 4).items() if k != "example_id"}
    ref = H.plain_pair_logprobs(base, batch, StepConfig(base_model))
    explicit = {**batch, "ref_chosen_logps": ref.chosen_sums, "ref_rejected_logps": ref.rejected_sums}
    (want, wm), gw = H.loss_and_grads(params, explicit, StepConfig(LLAMA))
    (got, gm), gg = H.loss_and_grads(params, batch, StepConfig(LLAMA, base_reference=True))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(jnp.abs(got - 4 * np.log(2))) > 1e-3  # the adapters moved the policy off its reference
    np.testing.assert_allclose(gm["rewards/margins"].total, wm["rewards/margins"].total, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(lora.split(gg)[1]), jax.tree.leaves(lora.split(gw)[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="reference = 'base' is the base model with the LoRA adapters off"):
        StepConfig(H.MODEL, base_reference=True)


def test_a_lora_step_on_a_2x2x2_mesh_with_micro_batches_equals_one_device():
    """Two SGD steps with the base reference; the adapters (float32) and metrics agree."""
    model = dataclasses.replace(LLAMA, scan_layers=True)
    results = []
    for mesh, micro, devices in (((1, 1, 1), 1, jax.devices()[:1]), ((2, 2, 2), 2, jax.devices()[:8])):
        c = H.config(mesh=mesh, micro=micro, optimizer_name="sgd", lr=0.5, reference="base")
        e = build_engine(c, model, lambda: _randomize_b(init_params(model, jax.random.key(4))), devices=devices)
        state, out = e.state, []
        for step in range(2):
            local = {k: v for k, v in H.local_batch(step, 8).items()}
            state, metrics = e.train_step(state, e.shard_batch(local))
            out.append(summaries.finalize(metrics))
        results.append((out, jax.device_get(lora.split(state.params)[1])))
    (want, wa), (got, ga) = results
    for w, g in zip(want, got):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(wa), jax.tree.leaves(ga)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_adapter_dropout_is_unbiased_and_on_in_the_train_step_only():
    """PEFT's lora_dropout: an adapter's mean output over dropout keys is its output without dropout; a train step
    with dropout differs from one without but is a function of (state, batch) (so resume is exact); evaluation
    never drops."""
    from dpo_jax.models.decoder import LoraAdapter

    model = LLAMA.replace(lora_dropout=0.5, scan_layers=True)
    adapter = LoraAdapter(model, (6,), ("embed", "mlp"), (-1,))
    x = jax.random.normal(jax.random.key(0), (3, 32))
    variables = adapter.init(jax.random.key(1), x)
    variables = {"params": {**variables["params"], "b": jax.random.normal(jax.random.key(2), (4, 6))}}
    plain = adapter.apply(variables, x)
    draws = jax.vmap(lambda k: adapter.apply(variables, x, rngs={"dropout": k}))(
        jax.random.split(jax.random.key(3), 4096))
    assert float(jnp.abs(draws[0] - plain).max()) > 1e-2  # each draw drops
    np.testing.assert_allclose(draws.mean(0), plain, atol=0.05 * float(jnp.abs(plain).max()))

    params = _randomize_b(init_params(model, jax.random.key(4)))
    batch = H.local_batch(0, 8)
    results = {}
    for name, m in (("dropout", model), ("none", model.replace(lora_dropout=0.0))):
        e = build_engine(H.config(optimizer_name="sgd", lr=0.5, reference="base"), m, lambda: params,
                         devices=jax.devices()[:1])
        evaluated = summaries.finalize(e.eval_step(e.state.params, e.shard_batch(batch)))
        for again in ("", " again"):
            state, metrics = e.train_step(jax.tree.map(jnp.copy, e.state), e.shard_batch(batch))
            results[name + again] = (evaluated, summaries.finalize(metrics),
                                     jax.device_get(lora.split(state.params)[1]))
    (ev_d, tr_d, a_d), (_, tr_a, a_a), (ev_n, tr_n, _), _ = results.values()
    assert tr_d == tr_a and jax.tree.all(jax.tree.map(np.array_equal, a_d, a_a))  # same key, same step
    assert abs(tr_d["loss"] - tr_n["loss"]) > 1e-4  # dropout changed the training forward
    assert ev_d["loss"] == pytest.approx(ev_n["loss"], rel=1e-6)  # and not evaluation's


def test_a_tiny_lora_run_resumes_exactly_and_exports_merged_and_peft(tmp_path):
    """configs/tiny.py:lora (GPT-2; q/k/v adapters go out as one block-diagonal adapter of the fused c_attn):
    killed after checkpoint 8 and resumed, the same metric lines; the merged HF export computes what the adapters
    compute; the PEFT export holds exactly the trained adapters; a model without adapters has nothing to export."""
    import subprocess
    import sys

    import transformers

    from dpo_jax.convert.peft import load_peft, save_peft
    from dpo_jax.train.export import export, export_peft, restore_params
    from tests.test_runs import REPO, _train_lines, assert_same_lines, kill_and_resume

    tiny = os.path.join(REPO, "configs", "tiny.py")
    overrides = {"train.steps": 12, "train.log_every": 3, "train.save_every": 4, "train.eval_samples": 0,
                 "data.eval_path": "", "train.tensorboard": False, "data.cache_dir": str(tmp_path / "cache")}
    cli = lambda run_dir: [sys.executable, "-m", "dpo_jax.main", "train", "--config", f"{tiny}:lora",  # noqa
                           f"--config.train.run_dir={run_dir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(cli(tmp_path / "straight"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    want = _train_lines(tmp_path / "straight")
    assert [r["step"] for r in want] == [3, 6, 9, 12] and want[-1]["loss"] < want[0]["loss"] < 0.7
    kill_and_resume(cli(tmp_path / "killed"), "[train] step 9")
    assert_same_lines(_train_lines(tmp_path / "killed"), want)

    _, model, params, _ = restore_params(str(tmp_path / "straight"))
    assert model.lora_rank == 8 and model.lora_targets == ("q", "k", "v", "o", "fc_in", "fc_out")
    export(str(tmp_path / "straight"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (2, 10))
    ours = np.asarray(logits(params, model, Decoder(model).apply({"params": params}, jnp.asarray(ids))))
    np.testing.assert_allclose(hf_logits(hf, ids, np.ones_like(ids)), ours, atol=1e-4)
    export_peft(str(tmp_path / "straight"), str(tmp_path / "peft"))
    _, back = load_peft(str(tmp_path / "peft"), lora.base_config(model), lora.base_params(params))
    for a, b in zip(jax.tree.leaves(lora.split(params)[1]), jax.tree.leaves(lora.split(back)[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_peft(lora.base_config(model), lora.base_params(params), str(tmp_path / "peft2"))


def test_a_lora_reward_model_trains_its_adapters_and_its_new_score_head_only():
    from dpo_jax.models.reward import as_reward_model

    model, params = as_reward_model(LLAMA, init_params(LLAMA, jax.random.key(0)), None, jax.random.key(1))
    c = H.config(optimizer_name="sgd", lr=0.5)
    c.train.mode = "reward"
    e = build_engine(c, model, lambda: params, devices=jax.devices()[:1])
    state = e.state
    for step in range(2):
        local = {**H.local_batch(step, 8), "margin": np.zeros(8, np.float32)}
        state, _ = e.train_step(state, e.shard_batch(local))
    frozen, trained = lora.trainable(jax.device_get(state.params), model)
    frozen0, trained0 = lora.trainable(params, model)
    assert "score_kernel" in trained and "score_kernel" not in frozen
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained0), jax.tree.leaves(trained)))
