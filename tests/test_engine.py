"""The sharded train step: mesh/process/accumulation equivalence, learning, reference pass, compile count."""

import json
import math
import re
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import reference
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.models.decoder import init_params
from dpo_jax.train.engine import build_engine
from tests import engine_helpers as H
from tests.conftest import xla_flags_with_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params_equal(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


@pytest.fixture(scope="module")
def one_device_run():
    e = H.engine(H.config(), devices=jax.devices()[:1])
    return H.run(e, 2, 8)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)])
def test_sharded_step_equals_one_device(mesh, one_device_run):
    want_history, want_state = one_device_run
    e = H.engine(H.config(mesh=mesh))
    history, state = H.run(e, 2, 8)
    for got, want in zip(history, want_history):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    _params_equal(state.params, want_state.params, atol=1e-6)
    spec = state.params["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert e.train_step._cache_size() == 1  # one compile for the whole run


def test_first_step_loss_is_ln2_and_rewards_zero():
    history, _ = H.run(H.engine(H.config(mesh=(2, 1, 1)), devices=jax.devices()[:2]), 1, 8)
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert history[0]["rewards/chosen"] == 0.0 and history[0]["rewards/margins"] == 0.0


def test_gradient_accumulation_4x2_equals_1x8():
    whole, whole_state = H.run(H.engine(H.config(mesh=(2, 1, 1), micro=1), devices=jax.devices()[:2]), 2, 8)
    accum, accum_state = H.run(H.engine(H.config(mesh=(2, 1, 1), micro=4), devices=jax.devices()[:2]), 2, 8)
    for step, (a, w) in enumerate(zip(accum, whole)):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
        if step:  # at step 0 rewards are exact ties (policy == reference): float order decides 'chosen > rejected'
            assert a["rewards/accuracies"] == w["rewards/accuracies"]
    _params_equal(accum_state.params, whole_state.params, atol=1e-6)


def test_padding_examples_do_not_count():
    """Padding pairs (example_mask 0) change neither the loss nor the update."""
    full, full_state = H.run(H.engine(H.config(pairs=6), devices=jax.devices()[:1]), 1, 6)
    padded_engine = H.engine(H.config(pairs=8), devices=jax.devices()[:1])
    state = padded_engine.state
    from dpo_jax import summaries

    local = H.local_batch(0, 8, padding=2)
    six = H.local_batch(0, 6)
    # same 6 real pairs as `full`, then 2 padding pairs
    for key in ("input_ids", "loss_mask"):
        local[key] = np.concatenate([six[key][:6], local[key][6:8] * 0, six[key][6:], local[key][14:] * 0])
    local["attention_mask"] = np.ones_like(local["input_ids"])
    sc, sr, _, _ = (np.asarray(x) for x in padded_engine.reference_step(state.params, padded_engine.shard_batch(local)))
    local["ref_chosen_logps"], local["ref_rejected_logps"] = sc, sr
    state, metrics = padded_engine.train_step(state, padded_engine.shard_batch(local))
    got = summaries.finalize(metrics)
    assert got["loss"] == pytest.approx(full[0]["loss"], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(full[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "bco_pair"])
def test_padding_examples_do_not_count_in_batch_level_losses(loss_type):
    """Losses that sort or average across the batch: 5 real pairs + 1 padding pair give the 5 pairs' loss and
    gradient (the audit found padding taking part in the sort / the mean)."""
    from dpo_jax import summaries

    ref = init_params(H.MODEL, jax.random.key(7))  # a reference unlike the policy: non-zero log-ratios
    results = []
    for pairs, padding in ((5, 0), (6, 1)):
        e = H.engine(H.config(pairs=pairs, loss_type=loss_type, optimizer_name="sgd", beta=5.0),
                     devices=jax.devices()[:1])
        local = H.local_batch(0, pairs, padding=padding)
        if padding:  # the same 5 real pairs as the unpadded batch, then the padding pair
            five = H.local_batch(0, 5)
            for key in ("input_ids", "loss_mask"):
                local[key] = np.concatenate([five[key][:5], local[key][5:6] * 0, five[key][5:], local[key][11:] * 0])
        sc, sr, _, _ = (np.asarray(x) for x in e.reference_step(ref, e.shard_batch(local)))
        local["ref_chosen_logps"], local["ref_rejected_logps"] = sc, sr
        state, metrics = e.train_step(e.state, e.shard_batch(local))
        results.append((summaries.finalize(metrics), state.params))
    (want, want_params), (got, got_params) = results
    assert abs(want["loss"] - np.log(2)) > 1e-3  # the reference differs from the policy
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    _params_equal(got_params, want_params, atol=1e-7)


def test_a_short_run_learns_the_synthetic_preference():
    history, _ = H.run(H.engine(H.config(mesh=(4, 1, 1), lr=3e-3), devices=jax.devices()[:4]), 25, 8)
    assert history[-1]["loss"] < 0.3 < history[0]["loss"]
    assert np.mean([h["rewards/accuracies"] for h in history[-5:]]) > 0.9
    assert history[-1]["rewards/margins"] > 1.0


@pytest.mark.parametrize("mode", ["sft", "unlikelihood"])
def test_sft_and_unlikelihood_modes(mode):
    c = H.config(mesh=(2, 1, 1))
    c.train.mode = mode
    e = H.engine(c, devices=jax.devices()[:2])
    assert not e.config.needs_reference
    history, _ = H.run(e, 15, 8)
    assert history[-1]["loss"] < history[0]["loss"]
    if mode == "sft":  # token-mean NLL: the first step's loss is -mean log p over the chosen response tokens
        assert history[0]["loss"] == pytest.approx(-history[0]["logps/chosen"] / H.RESPONSE, rel=1e-5)
        assert history[-1]["logps/rejected"] < history[0]["logps/rejected"] + 1.0


def test_lm_mode_is_sft_on_both_rows():
    """"lm" on pairs (a, b) is SFT on the pairs (a, a) and (b, b): the same per-token loss and gradient, half the
    rows (the sentiment experiment's π_SFT trains this way)."""
    from dpo_jax.train.modes import denominator
    from dpo_jax.train.step import StepConfig, loss_sum_and_metrics

    params = init_params(H.MODEL, jax.random.key(3))
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, H.MODEL.vocab_size, (3, 8)).astype(np.int32) for _ in range(2))
    mask = np.ones_like(a)
    mask[:, :3] = 0  # a 3-token prompt
    mask[1, 6:] = 0  # a shorter response

    def objective(mode, rows, masks, pairs):
        batch = jax.tree.map(jnp.asarray, {"input_ids": rows, "loss_mask": masks, "attention_mask": np.ones_like(rows),
                                           "example_mask": np.ones(pairs, np.int32)})
        c = StepConfig(H.MODEL, mode=mode)
        return jax.jit(jax.value_and_grad(lambda p: loss_sum_and_metrics(p, batch, c)[0] / denominator(batch, c)))(
            params)

    lm, lm_grad = objective("lm", np.concatenate([a, b]), np.concatenate([mask, mask]), 3)
    sft, sft_grad = objective("sft", np.concatenate([a, b, a, b]), np.concatenate([mask] * 4), 6)
    assert float(lm) == pytest.approx(float(sft), rel=1e-6)
    for x, y in zip(jax.tree.leaves(lm_grad), jax.tree.leaves(sft_grad)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_unlikelihood_never_penalises_the_unscorable_first_token():
    """An explicit empty prompt without BOS puts loss_mask 1 at column 0, which has no prediction (log-prob 0):
    it must not count — before the fix it added −α·log(1 − 1 + 1e-6) ≈ 13.8·α per example."""
    from dpo_jax.logprobs import naive_sequence_logprobs
    from dpo_jax.models.decoder import Decoder, unembedding
    from dpo_jax.train.step import StepConfig, loss_sum_and_metrics

    params = init_params(H.MODEL, jax.random.key(2))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, H.MODEL.vocab_size, (4, 7)).astype(np.int32)  # 2 pairs: chosen rows, rejected rows
    batch = {"input_ids": ids, "loss_mask": np.ones_like(ids), "attention_mask": np.ones_like(ids),
             "example_mask": np.ones(2, np.int32)}
    c = StepConfig(H.MODEL, mode="unlikelihood", unlikelihood_alpha=1.0)
    total, metrics = jax.jit(loss_sum_and_metrics, static_argnums=2)(params, jax.tree.map(jnp.asarray, batch), c)
    hidden = jax.jit(Decoder(H.MODEL).apply)({"params": params}, ids)
    lp = naive_sequence_logprobs(hidden, unembedding(params, H.MODEL)[0], ids, np.ones_like(ids)).token_logps
    chosen, rejected = np.asarray(lp[:2, 1:], np.float64), np.asarray(lp[2:, 1:], np.float64)
    want = -chosen.sum(1) - np.log1p(-np.exp(rejected)).sum(1)
    assert float(total) == pytest.approx(float(want.sum()), rel=1e-5)
    assert float(metrics["loss"].total) == pytest.approx(float(want.sum()), rel=1e-5)


def test_reference_precompute_is_cached_and_equals_the_per_batch_pass(tmp_path):
    e = H.engine(H.config(mesh=(2, 1, 1)), devices=jax.devices()[:2])
    pairs = [H.local_batch(s, 4) for s in range(3)]
    source = []
    for p in pairs:
        for i in range(4):
            source.append({"example_id": int(p["example_id"][i]),
                           "chosen_input_ids": p["input_ids"][i], "chosen_loss_mask": p["loss_mask"][i],
                           "rejected_input_ids": p["input_ids"][4 + i], "rejected_loss_mask": p["loss_mask"][4 + i]})

    def batches():
        return PreferenceLoader(source, global_batch_pairs=8, seq_len=12, shuffle=False, num_epochs=1, prefetch=0)

    path = reference.cache_path(str(tmp_path), "train", weights=reference.weights_fingerprint(e.state.params),
                                data="fixture", settings={"chunk": 128})
    table, cached = reference.precompute(e.state.params, e.reference_logps, batches, path)
    assert not cached and len(table) == 12 and os.path.isfile(path)
    again, cached = reference.precompute(e.state.params, e.reference_logps, batches, path)
    assert cached
    np.testing.assert_array_equal(again.values, table.values)
    local = H.local_batch(1, 4)
    sc, sr, nc, _ = (np.asarray(x) for x in e.reference_step(e.state.params, e.shard_batch(local)))
    looked_up = table.lookup(np.concatenate([local["example_id"], [-1]]))
    np.testing.assert_allclose(looked_up["ref_chosen_logps"][:4], sc, rtol=1e-6)
    np.testing.assert_allclose(looked_up["ref_rejected_logps"][:4], sr, rtol=1e-6)
    assert looked_up["ref_chosen_logps"][4] == 0.0 and np.all(nc == H.RESPONSE)
    with pytest.raises(ValueError, match=r"example ids \[999\] have no reference log-probs"):
        table.lookup(np.array([999]))
    other = reference.weights_fingerprint(jax.tree.map(lambda x: x + 1e-3, e.state.params))
    assert other != reference.weights_fingerprint(e.state.params)


def test_reference_parameters_are_freed_after_the_pass():
    """Device memory in use (live arrays): policy + optimizer only, after a separate reference was run and freed."""
    e = H.engine(H.config(), devices=jax.devices()[:1])
    live = lambda: sum(x.nbytes for x in jax.live_arrays())  # noqa: E731
    before = live()
    ref = init_params(H.MODEL, jax.random.key(7))
    ref_bytes = sum(x.nbytes for x in jax.tree.leaves(ref))
    assert live() >= before + ref_bytes
    np.asarray(e.reference_step(ref, e.shard_batch(H.local_batch(0, 8)))[0])
    jax.tree.map(lambda x: x.delete(), ref)
    del ref
    assert live() < before + ref_bytes / 10
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(e.state))
    assert live() >= state_bytes


def test_invalid_layouts_are_refused_before_compiling():
    with pytest.raises(ValueError, match="mesh .* has 6 devices but there are 8"):
        H.engine(H.config(mesh=(2, 3, 1)))
    with pytest.raises(ValueError, match="global_batch_pairs = 6 does not divide over the data-parallel size 8"):
        H.engine(H.config(mesh=(8, 1, 1), pairs=6))
    # 4 pairs make 8 rows, one a device, but the pairs' own fields (ids, masks, reference log-probs) do not split
    with pytest.raises(ValueError, match="global_batch_pairs = 4 does not divide over the data-parallel size 8"):
        H.engine(H.config(mesh=(8, 1, 1), pairs=4))
    with pytest.raises(ValueError, match=r"dimension 1 \(kv_heads\) of size 2 is not divisible by mesh axes tensor"):
        H.engine(H.config(mesh=(2, 1, 4)))
    with pytest.raises(ValueError, match="micro-batch has 2 pairs, not divisible by the data-parallel size 8"):
        H.engine(H.config(mesh=(8, 1, 1), pairs=8, micro=4))
    c = H.config(mesh=(8, 1, 1))
    c.dpo.loss_type = "dpo"
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        H.engine(c)
    c = H.config(mesh=(8, 1, 1))
    c.dpo.reference = "sometimes"
    with pytest.raises(ValueError, match="config.dpo.reference = 'sometimes'"):
        H.engine(c)


def test_reference_free_needs_no_reference_and_uses_a_zero_reference():
    e = H.engine(H.config(reference_free=True), devices=jax.devices()[:1])
    assert not e.config.needs_reference and "ref_chosen_logps" not in e.config.batch_keys()
    local = H.local_batch(0, 8)
    sc, sr, _, _ = (np.asarray(x) for x in e.reference_step(e.state.params, e.shard_batch(local)))
    history, _ = H.run(e, 1, 8)  # donates e.state
    from dpo_jax.losses import preference_loss

    want = np.mean(np.asarray(preference_loss(sc, sr, None, None, reference_free=True)[0]))
    assert history[0]["loss"] == pytest.approx(float(want), rel=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_MESHES = [(2, 4, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def two_process_results():
    """Both meshes' runs from one pair of processes (one start-up and distributed set-up: the suite's time)."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags_with_devices(4)}
    meshes = ";".join(",".join(map(str, mesh)) for mesh in TWO_PROCESS_MESHES)
    procs = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", str(i), port, meshes],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append([json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")])
    return results


@pytest.mark.parametrize("mesh", TWO_PROCESS_MESHES)
def test_two_processes_match_one_process(mesh, two_process_results):
    """2 processes x 4 CPU devices (gloo) give the same losses and params as this process's 8 devices."""
    results = [next(r for r in process if tuple(r["mesh"]) == mesh) for process in two_process_results]
    assert results[0] == results[1]
    want, state = H.run(H.engine(H.config(mesh=mesh, pairs=8)), 3, 8)
    np.testing.assert_allclose(results[0]["loss"], [h["loss"] for h in want], atol=1e-6)
    assert results[0]["acc"] == [h["rewards/accuracies"] for h in want]
    kernel_sum = float(jnp.sum(jnp.abs(state.params["layers_1"]["mlp"]["down"]["kernel"])))
    assert results[0]["kernel_sum"] == pytest.approx(kernel_sum, rel=1e-5)


def _engine_for(model, c, devices):
    return build_engine(c, model, lambda: init_params(model, jax.random.key(0)), devices=devices)


def test_mixed_precision_and_remat_scan_variants():
    """bf16 compute keeps float32 params and optimizer state and stays close to float32; remat + scanned layers
    compute the same step as the plain model."""
    devices = jax.devices()[:2]
    c = H.config(mesh=(2, 1, 1))
    plain, plain_state = H.run(_engine_for(H.MODEL, c, devices), 2, 8)
    bf16 = _engine_for(H.MODEL.replace(dtype="bfloat16"), c, devices)
    bf_hist, bf_state = H.run(bf16, 2, 8)
    leaves = jax.tree.leaves((bf_state.params, bf_state.opt_state))
    assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    assert bf_hist[1]["loss"] == pytest.approx(plain[1]["loss"], abs=0.02)
    remat = H.MODEL.replace(scan_layers=True, remat_policy="full")

    def stacked_init():  # the same weights as the plain model, stacked for nn.scan
        flat = init_params(H.MODEL, jax.random.key(0))
        layers = [flat.pop(f"layers_{i}") for i in range(H.MODEL.num_layers)]
        return {**flat, "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}

    rm_hist, rm_state = H.run(build_engine(c, remat, stacked_init, devices=devices), 2, 8)
    assert rm_hist[1]["loss"] == pytest.approx(plain[1]["loss"], abs=1e-6)
    np.testing.assert_allclose(np.asarray(rm_state.params["layers"]["mlp"]["up"]["kernel"][1]),
                               np.asarray(plain_state.params["layers_1"]["mlp"]["up"]["kernel"]), atol=1e-6)


def test_compiled_train_step_never_holds_full_logits():
    """The whole jitted train step at a GPT-NeoX vocabulary (50,304), 8 rows x 1024 tokens (compile only): no
    buffer in the compiled HLO is as large as the [2B, T, V] logits, and XLA temp memory stays below one such
    float32 tensor (what remains is per-chunk logits and the O(T^2) attention scores of the XLA attention)."""
    model = H.MODEL.replace(vocab_size=50304, hidden_size=64, num_layers=1, intermediate_size=128)
    e = _engine_for(model, H.config(pairs=4), jax.devices()[:1])
    rows, t = 8, 1024
    batch = {k: jax.ShapeDtypeStruct((rows, t) if n == 2 else (rows // 2,),
                                     jnp.float32 if k.startswith("ref") else jnp.int32)
             for k, n in e.config.batch_keys().items()}
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), e.state)
    compiled = e.train_step.lower(state, batch).compile()
    full_logits = rows * t * model.vocab_size
    for dims in re.findall(r"(?:f32|bf16|pred|s32)\[([\d,]+)\]", compiled.as_text()):
        shape = [int(d) for d in dims.split(",")]
        assert not (str(model.vocab_size) in dims.split(",") and math.prod(shape) >= full_logits // 2), shape
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * full_logits * 0.75
