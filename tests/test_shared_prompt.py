"""The shared-prompt layout computes exactly what the two-row layout computes, on fewer tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data.layout import LAYOUTS, PAIRS, scored_span
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.packing import CHOSEN, PROMPT, REJECTED, pack_pair, packed_length
from dpo_jax.models.decoder import init_params
from dpo_jax.train.step import StepConfig
from tests import engine_helpers as H

SHARED = LAYOUTS["shared_prompt"]


def test_pack_pair_shares_the_unscored_common_prefix():
    packed = pack_pair([5, 6, 7, 8, 9], [0, 0, 0, 1, 1], [5, 6, 7, 10], [0, 0, 0, 1])
    np.testing.assert_array_equal(packed["input_ids"], [5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(packed["segment_ids"], [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED])
    np.testing.assert_array_equal(packed["positions"], [0, 1, 2, 3, 4, 3])
    np.testing.assert_array_equal(packed["predecessor"], [-1, 0, 1, 2, 3, 2])  # 10 follows the prompt's last token
    np.testing.assert_array_equal(packed["loss_mask"], [0, 0, 0, 1, 1, 1])
    # A prompt whose last token the tokenizer merged differently into each response: only the common part is shared.
    packed = pack_pair([5, 6, 70, 8], [0, 0, 0, 1], [5, 6, 71, 9], [0, 0, 0, 1])
    np.testing.assert_array_equal(packed["input_ids"], [5, 6, 70, 8, 71, 9])
    np.testing.assert_array_equal(packed["positions"], [0, 1, 2, 3, 2, 3])
    np.testing.assert_array_equal(packed["predecessor"], [-1, 0, 1, 2, 1, 4])
    assert packed_length([5, 6, 70, 8], [0, 0, 0, 1], [5, 6, 71, 9], [0, 0, 0, 1]) == 6


def _pairs(n, seed=0, vocab=H.MODEL.vocab_size):
    """Pairs with varied prompt and response lengths; some prompts end in a token that differs between the sides."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, lc, lr = rng.integers(1, 7), rng.integers(1, 9), rng.integers(1, 9)
        prompt = rng.integers(0, vocab, p)
        chosen, rejected = np.concatenate([prompt, rng.integers(0, vocab, lc)]), \
            np.concatenate([prompt, rng.integers(0, vocab, lr)])
        if i % 3 == 2 and p > 1:
            rejected[p - 1] = (rejected[p - 1] + 1) % vocab  # a boundary merge: the prompts differ at their end
        rows.append({"example_id": i, "chosen_input_ids": chosen.astype(np.int32),
                     "chosen_loss_mask": (np.arange(p + lc) >= p).astype(np.int32),
                     "rejected_input_ids": rejected.astype(np.int32),
                     "rejected_loss_mask": (np.arange(p + lr) >= p).astype(np.int32)})
    return rows


def _batches(rows, pairs, windows=(0, 0)):
    """The same global batch in both layouts (the last example slot is padding)."""
    kw = dict(global_batch_pairs=pairs, shuffle=False, num_epochs=1, prefetch=0)
    plain = next(iter(PreferenceLoader(rows, seq_len=16, score_window=windows[0], **kw)))
    shared = next(iter(PreferenceLoader(rows, seq_len=24, layout="shared_prompt", score_window=windows[1], **kw)))
    return plain, shared


def _windows(rows):
    """The tightest score windows (plain, shared) for these pairs: their longest scored spans."""
    plain = max(scored_span(r[f"{side}_loss_mask"]) for r in rows for side in ("chosen", "rejected"))
    shared = max(scored_span(p["loss_mask"], p["predecessor"]) for p in (
        pack_pair(r["chosen_input_ids"], r["chosen_loss_mask"], r["rejected_input_ids"], r["rejected_loss_mask"])
        for r in rows))
    return plain, shared


def test_scored_span_runs_from_the_first_to_the_last_scored_token():
    assert scored_span([0, 0, 1, 1, 0, 1, 0]) == 4 and scored_span([1, 1, 0]) == 1  # position 0 is never scored
    assert scored_span([0, 0, 0]) == 0
    packed = pack_pair([5, 6, 7, 8, 9], [0, 0, 0, 1, 1], [5, 6, 7, 10], [0, 0, 0, 1])
    assert scored_span(packed["loss_mask"], packed["predecessor"]) == 3


def test_a_loader_refuses_an_example_wider_than_its_score_window():
    rows = _pairs(7)
    plain, shared = _windows(rows)
    _batches(rows, pairs=8, windows=(plain, shared))  # the tightest windows hold
    kw = dict(global_batch_pairs=8, shuffle=False, num_epochs=1, prefetch=0)
    with pytest.raises(ValueError, match=r"example \d+ has \d+ positions from its first to its last scored token, "
                                         rf"more than the score window {plain - 1}"):
        next(iter(PreferenceLoader(rows, seq_len=16, score_window=plain - 1, **kw)))
    with pytest.raises(ValueError, match=rf"more than the score window {shared - 1}"):
        next(iter(PreferenceLoader(rows, seq_len=24, layout="shared_prompt", score_window=shared - 1, **kw)))


@pytest.fixture(scope="module")
def params():
    return init_params(H.MODEL, jax.random.key(3))


def test_both_layouts_give_the_same_pair_logprobs(params):
    plain, shared = _batches(_pairs(7), pairs=8)
    assert shared["input_ids"].shape == (8, 24) and plain["input_ids"].shape == (16, 16)
    assert shared["attention_mask"].sum() < plain["attention_mask"].sum()  # each prompt runs once
    got = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, shared), StepConfig(H.MODEL, layout=SHARED))
    want = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, plain), StepConfig(H.MODEL))
    for field in ("chosen_sums", "rejected_sums", "chosen_counts", "rejected_counts"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=2e-5, err_msg=field)
    assert float(jnp.sum(want.chosen_counts)) > 0 and float(jnp.abs(want.rejected_sums).sum()) > 1.0


@pytest.mark.parametrize("mode", ["dpo", "sft", "unlikelihood"])
def test_both_layouts_give_the_same_loss_and_gradient(params, mode):
    """Plain and shared-prompt rows, each with and without a score window: one loss, metrics and gradient."""
    rows = _pairs(8, seed=1)
    windows = _windows(rows)
    assert windows[0] < 16 and windows[1] < 24  # the windows skip positions in both layouts
    plain, shared = _batches(rows, pairs=8, windows=windows)
    ref = {"ref_chosen_logps": np.linspace(-30, -10, 8).astype(np.float32),
           "ref_rejected_logps": np.linspace(-25, -12, 8).astype(np.float32)}
    results = []
    for batch, layout, window in ((plain, PAIRS, 0), (shared, SHARED, 0), (plain, PAIRS, windows[0]),
                                  (shared, SHARED, windows[1])):
        c = StepConfig(H.MODEL, mode=mode, layout=layout, score_window=window)
        b = {k: jnp.asarray(v) for k, v in {**batch, **ref}.items() if k in c.batch_keys()}
        (total, metrics), grads = H.loss_and_grads(params, b, c)
        results.append((total, metrics, grads))
    t0, m0, g0 = results[0]
    for t1, m1, g1 in results[1:]:
        np.testing.assert_allclose(t1, t0, rtol=1e-5, atol=1e-5)
        for key in m0:
            np.testing.assert_allclose(m1[key].total, m0[key].total, rtol=1e-5, atol=1e-5, err_msg=key)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-4


def test_engine_with_micro_batches_on_a_mesh_matches_the_plain_layout(params):
    rows = _pairs(16, seed=2)
    plain, shared = _batches(rows, pairs=16)
    c_plain = H.config(pairs=16)
    c_shared = H.config(mesh=(2, 1, 1), pairs=16, micro=2)
    history = []
    for c, batch, devices, layout in ((c_plain, plain, jax.devices()[:1], PAIRS),
                                      (c_shared, shared, jax.devices()[:2], SHARED)):
        e = H.engine(c, devices=devices, layout=layout)
        sc, sr, _, _ = (np.asarray(x) for x in e.reference_logps(e.state.params, batch))
        local = {**batch, "ref_chosen_logps": sc, "ref_rejected_logps": sr}
        state, out = e.state, []
        for _ in range(2):
            state, metrics = e.train_step(state, e.shard_batch(local))
            out.append({k: float(v.total / v.count) for k, v in metrics.items()})
        history.append(out)
    assert history[0][0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    for want, got in zip(*history):
        for key in ("loss", "rewards/margins", "grad_norm", "logps/chosen"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


SLIDING = H.MODEL.replace(sliding_window=8)


def _one_pair(prompt, chosen, rejected, seed=4):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, SLIDING.vocab_size, prompt)
    c, r = rng.integers(0, SLIDING.vocab_size, chosen), rng.integers(0, SLIDING.vocab_size, rejected)
    return {"example_id": 0, "chosen_input_ids": np.concatenate([p, c]).astype(np.int32),
            "chosen_loss_mask": (np.arange(prompt + chosen) >= prompt).astype(np.int32),
            "rejected_input_ids": np.concatenate([p, r]).astype(np.int32),
            "rejected_loss_mask": (np.arange(prompt + rejected) >= prompt).astype(np.int32)}


@pytest.mark.parametrize("rows", [[_one_pair(6, 10, 5)], _pairs(7, seed=5)])
def test_sliding_window_models_give_the_same_pair_logprobs_in_both_layouts(rows):
    """The window counts positions, not slots: in a packed row the rejected response sees the prompt keys it would
    see as its own sequence (the audit's case: prompt 6, chosen 10, rejected 5 tokens, window 8)."""
    params = init_params(SLIDING, jax.random.key(0))
    plain, shared = _batches(rows, pairs=len(rows) + (len(rows) > 1))
    assert shared["attention_mask"].sum(1).max() > SLIDING.sliding_window  # rows longer than the window
    got = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, shared), StepConfig(SLIDING, layout=SHARED))
    want = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, plain), StepConfig(SLIDING))
    unwindowed = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, plain), StepConfig(H.MODEL))
    for field in ("chosen_sums", "rejected_sums", "chosen_counts", "rejected_counts"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=2e-5, err_msg=field)
    assert float(jnp.abs(want.chosen_sums - unwindowed.chosen_sums).max()) > 1e-4  # the window does bite
