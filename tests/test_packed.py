"""The packed layout (several shared-prompt pairs per row) computes exactly what two rows per pair compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.packing import (CHOSEN, PROMPT, REJECTED, budget_rows, fill_batches, first_fit_decreasing, pack_pair, pack_row,
                                  packed_length)
from dpo_jax.data.layout import PAIRS, PackedPairs, scored_span
from dpo_jax.logprobs import scored_mask
from dpo_jax.models.decoder import SEGMENT_STRIDE, init_params
from dpo_jax.train.step import StepConfig
from tests import engine_helpers as H
from tests.test_shared_prompt import SLIDING, _pairs

PACKED = PackedPairs(max_pairs_per_row=4)


def test_first_fit_decreasing_is_deterministic_respects_capacity_and_count_and_drops_nothing():
    assert first_fit_decreasing([5, 3, 7, 2, 4], 10, 3) == [[2, 1], [0, 4], [3]]
    assert first_fit_decreasing([1] * 7, 100, 3) == [[0, 1, 2], [3, 4, 5], [6]]  # at most K per row
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 200)
    rows = first_fit_decreasing(lengths, 64, 5)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[r]) <= 64 and len(r) <= 5 for r in rows)
    assert rows == first_fit_decreasing(lengths, 64, 5)
    with pytest.raises(ValueError, match="a pair of 65 tokens does not fit a packed row of 64"):
        first_fit_decreasing([3, 65], 64, 4)


def test_pack_row_keeps_pairs_apart():
    a = pack_pair([5, 6, 7, 8], [0, 0, 1, 1], [5, 6, 9], [0, 0, 1])
    b = pack_pair([1, 2, 3], [0, 1, 1], [1, 4], [0, 1])
    row = pack_row([a, b])
    np.testing.assert_array_equal(row["input_ids"], [5, 6, 7, 8, 9, 1, 2, 3, 4])
    np.testing.assert_array_equal(row["segment_ids"], [PROMPT] * 2 + [CHOSEN] * 2 + [REJECTED] + [
        SEGMENT_STRIDE + PROMPT] + [SEGMENT_STRIDE + CHOSEN] * 2 + [SEGMENT_STRIDE + REJECTED])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 2, 0, 1, 2, 1])  # restart per pair
    np.testing.assert_array_equal(row["predecessor"], [-1, 0, 1, 2, 1, -1, 5, 6, 5])


def _spans(rows):
    """Each pair's first-to-last scored span when packed (what the prepared data's metadata holds)."""
    packed = [pack_pair(r["chosen_input_ids"], r["chosen_loss_mask"], r["rejected_input_ids"], r["rejected_loss_mask"])
              for r in rows]
    return np.asarray([scored_span(p["loss_mask"], p["predecessor"]) for p in packed])


def _loaders(rows, pairs, seq_len=48, layout=PACKED, groups=0):
    """The same pairs as plain rows and as packed rows, with the packed loader's planned score positions (per row,
    or per group of rows with `groups`)."""
    kw = dict(global_batch_pairs=pairs, shuffle=False, num_epochs=1, prefetch=0)
    plain = next(iter(PreferenceLoader(rows, seq_len=16, **kw)))
    loader = PreferenceLoader(rows, seq_len=seq_len, layout=layout, lengths=_lengths(rows), score_spans=_spans(rows),
                              score_groups=groups, rows_multiple=max(groups, 1), **kw)
    assert loader.score_groups == (groups if layout.max_pairs_per_row > 1 else 0)
    assert 0 < loader.score_window < seq_len * loader.planned_rows // max(groups, 1)
    return plain, next(iter(loader)), loader.score_window


def _by_id(values, ids):
    return {int(i): float(v) for v, i in zip(np.asarray(values), np.asarray(ids)) if i >= 0}


@pytest.mark.parametrize("model,layout,groups", [
    (H.MODEL, PACKED, 0), (SLIDING, PACKED, 0), (H.MODEL, PackedPairs(1), 0),
    (SLIDING.replace(attention_query_block=16), PACKED, 0), (H.MODEL, PACKED, 1), (SLIDING, PACKED, 2)],
    ids=["gqa", "sliding_window", "one_pair_per_row", "sliding_window_query_blocks", "one_score_group",
         "sliding_window_two_score_groups"])
def test_packed_pair_logprobs_equal_two_rows_per_pair(model, layout, groups):
    """K = 1 (what the loaders choose when no row holds two pairs) scores through a contiguous window instead;
    query blocks (48-token packed rows in three) against plain rows attending densely; score groups gather the
    scored tokens of several rows together."""
    rows = _pairs(13, seed=7)
    plain, packed, window = _loaders(rows, pairs=14, layout=layout, groups=groups)
    k = layout.max_pairs_per_row
    assert packed["input_ids"].shape[0] < 14 and packed["example_id"].shape == (packed["input_ids"].shape[0] * k,)
    assert sorted(i for i in packed["example_id"] if i >= 0) == list(range(13))  # every pair once, none dropped
    assert int(packed["attention_mask"].sum()) < int(plain["attention_mask"].sum())
    params = init_params(model, jax.random.key(1))
    if groups:  # never more positions than per row (R × the fullest row's); here, with one group, fewer
        n = packed["input_ids"].shape[0]
        per_row = -(-int(scored_mask(packed["loss_mask"], packed["predecessor"]).sum(1).max()) // 8) * 8
        assert window <= n // groups * per_row and (groups > 1 or window < n * per_row)
    got = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, packed), StepConfig(model, layout=layout,
                                                                               score_window=window,
                                                                               score_groups=groups))
    want = H.plain_pair_logprobs(params, jax.tree.map(jnp.asarray, plain), StepConfig(model.replace(attention_query_block=0)))
    for field in ("chosen_sums", "rejected_sums", "chosen_counts", "rejected_counts"):
        g, w = _by_id(getattr(got, field), packed["example_id"]), _by_id(getattr(want, field), plain["example_id"])
        assert g.keys() == w.keys()
        np.testing.assert_allclose([g[k] for k in w], [w[k] for k in w], atol=3e-5, err_msg=field)
    empty = np.asarray(packed["example_id"]) < 0  # empty slots contribute nothing
    assert np.all(np.asarray(got.chosen_counts)[empty] == 0) and np.all(np.asarray(got.rejected_sums)[empty] == 0)


@pytest.mark.parametrize("mode", ["dpo", "sft", "unlikelihood", "reward"])
def test_packed_loss_metrics_and_gradient_equal_the_plain_layout(mode):
    from dpo_jax.models.reward import as_reward_model

    rows = _pairs(11, seed=8)
    plain, packed, window = _loaders(rows, pairs=12)
    params, model = init_params(H.MODEL, jax.random.key(2)), H.MODEL
    if mode == "reward":
        model, params = as_reward_model(H.MODEL, params, None, jax.random.key(5))
    ref_c = {i: -30.0 + 2 * i for i in range(11)}
    ref_r = {i: -25.0 + i for i in range(11)}
    results = []
    for batch, layout, positions in ((plain, PAIRS, 0), (packed, PACKED, window)):
        ids = np.asarray(batch["example_id"])
        extra = {"ref_chosen_logps": np.asarray([ref_c.get(int(i), 0.0) for i in ids], np.float32),
                 "ref_rejected_logps": np.asarray([ref_r.get(int(i), 0.0) for i in ids], np.float32)}
        c = StepConfig(model, mode=mode, layout=layout, score_window=positions)
        b = {k: jnp.asarray(v) for k, v in {**batch, **extra}.items() if k in c.batch_keys()}
        (total, metrics), grads = H.loss_and_grads(params, b, c)
        results.append((total, metrics, grads))
    (t0, m0, g0), (t1, m1, g1) = results
    np.testing.assert_allclose(t1, t0, rtol=1e-5, atol=1e-5)
    assert m0.keys() == m1.keys()
    for key in m0:
        np.testing.assert_allclose(m1[key].total, m0[key].total, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(m1[key].count, m0[key].count, err_msg=key)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-4


def _plain_on_one_device_vs_packed_on_a_mesh(plain, packed, pairs, window, packed_model=H.MODEL, micro=2,
                                             groups=0):
    """Two SGD steps: the plain layout on one device against packed rows on a (2,2,2) mesh (2 micro-batches, or
    one with a score group per batch shard); the same loss, metrics and parameters."""
    history, finals = [], []
    for mesh, m, batch, devices, layout, positions, model, g in (
            ((1, 1, 1), 1, plain, jax.devices()[:1], PAIRS, 0, H.MODEL, 0),
            ((2, 2, 2), micro, packed, jax.devices()[:8], PACKED, window, packed_model, groups)):
        c = H.config(mesh=mesh, pairs=pairs, micro=m, optimizer_name="sgd", lr=0.5)
        e = H.engine(c, devices=devices, layout=layout, score_window=positions, model=model, score_groups=g)
        sc, sr, _, _ = (np.asarray(x) for x in e.reference_logps(e.state.params, batch))
        local = {**batch, "ref_chosen_logps": sc, "ref_rejected_logps": sr}
        state, out = e.state, []
        for _ in range(2):
            state, metrics = e.train_step(state, e.shard_batch(local))
            out.append({k: float(v.total / v.count) for k, v in metrics.items()})
        history.append(out)
        finals.append(jax.device_get(state.params))
    assert history[0][0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert history[0][0]["num_pairs"] == history[1][0]["num_pairs"] == int(np.sum(plain["example_mask"]))
    for step, (want, got) in enumerate(zip(*history)):
        # accuracy counts r_c > r_r: at step 0 every reward is 0 up to rounding, so it is compared after one update
        for key in ("loss", "rewards/margins", "grad_norm", "logps/chosen") + (("rewards/accuracies",) if step else ()):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert history[0][1]["loss"] < history[0][0]["loss"]


def _lengths(rows):
    return np.asarray([packed_length(r["chosen_input_ids"], r["chosen_loss_mask"], r["rejected_input_ids"],
                                     r["rejected_loss_mask"]) for r in rows])


def test_packed_engine_with_micro_batches_on_a_2x2x2_mesh_equals_plain_rows_on_one_device():
    rows = _pairs(24, seed=9)
    kw = dict(global_batch_pairs=24, shuffle=False, num_epochs=1, prefetch=0)
    plain = next(iter(PreferenceLoader(rows, seq_len=16, **kw)))
    loader = PreferenceLoader(rows, seq_len=32, layout=PACKED, lengths=_lengths(rows), rows_multiple=8, **kw)
    packed = next(iter(loader))
    assert packed["input_ids"].shape[0] % 8 == 0 and packed["input_ids"].shape[0] < 24
    _plain_on_one_device_vs_packed_on_a_mesh(plain, packed, 24, 0)


@pytest.mark.parametrize("micro,groups", [(2, 0), (1, 4)], ids=["two_micro_batches", "score_group_per_shard"])
def test_a_token_budget_batch_on_a_2x2x2_mesh_equals_plain_rows_of_its_pairs_on_one_device(micro, groups):
    """A token-budget batch holds however many pairs fill its rows; the loss averages over exactly those. The
    packed side's attention goes in query blocks (32-token rows in two), the plain side's is one dense T × T;
    without micro-batches, each of the 4 batch shards gathers its 2 rows' scored tokens together."""
    rows = _pairs(40, seed=11)
    packed = PreferenceLoader(rows, seq_len=32, layout=PACKED, lengths=_lengths(rows), rows_multiple=8,
                              global_batch_pairs=0, global_batch_tokens=8 * 32, shuffle=False, prefetch=0,
                              score_spans=_spans(rows), plan_steps=1, score_groups=groups)
    batch = packed.batch_at(0, 0)
    ids = [int(i) for i in batch["example_id"] if i >= 0]
    assert batch["input_ids"].shape == (8, 32) and 8 < len(ids) < 40 and packed.batches_in(0) > 1
    assert sorted(ids) == list(range(len(ids)))  # the epoch's first pairs
    plain = next(iter(PreferenceLoader([rows[i] for i in sorted(ids)], seq_len=16, global_batch_pairs=len(ids),
                                       shuffle=False, num_epochs=1, prefetch=0)))
    assert 0 < packed.score_window < 32 * 8 // max(groups, 1)  # the unembedding runs on the scored tokens only
    _plain_on_one_device_vs_packed_on_a_mesh(plain, batch, len(ids), packed.score_window,
                                             packed_model=H.MODEL.replace(attention_query_block=16), micro=micro,
                                             groups=groups)


def test_fill_batches_keeps_order_capacity_and_count_and_drops_nothing():
    assert fill_batches([5, 3, 7, 2, 4], 10, 3, 2) == [[[0, 1, 3], [2]], [[4], []]]
    assert fill_batches([1] * 7, 100, 3, 2) == [[[0, 1, 2], [3, 4, 5]], [[6], []]]  # at most K per row
    lengths = np.random.default_rng(0).integers(1, 60, 300)
    batches = fill_batches(lengths, 64, 5, 4)
    flat = [i for b in batches for r in b for i in r]
    assert sorted(flat) == list(range(300))
    assert [sorted(i for r in b for i in r) for b in batches] == \
        [list(range(min(i for r in b for i in r), max(i for r in b for i in r) + 1)) for b in batches]  # contiguous
    assert all(len(b) == 4 and all(sum(lengths[r]) <= 64 and len(r) <= 5 for r in b) for b in batches)
    assert batches == fill_batches(lengths, 64, 5, 4)
    with pytest.raises(ValueError, match="a pair of 65 tokens does not fit a packed row of 64"):
        fill_batches([3, 65], 64, 4, 2)
    with pytest.raises(ValueError, match="lookahead = 0: must be >= 1"):
        fill_batches([3], 64, 4, 2, lookahead=0)


@pytest.mark.parametrize("lookahead", [2, 16])
def test_fill_batches_with_lookahead_fills_gaps_overtakes_at_most_lookahead_and_drops_nothing(lookahead):
    # one row of 10: the second 6 and the 7 wait, 3 fills the gap; the third miss (4) closes the batch, the waiting
    # pairs open the next in their order
    assert fill_batches([6, 6, 7, 3, 4], 10, 3, 1, lookahead=3) == [[[0, 3]], [[1, 4]], [[2]]]
    assert fill_batches([6, 6, 7, 3, 4], 10, 3, 1) == [[[0]], [[1]], [[2, 3]], [[4]]]  # strict order
    lengths = np.random.default_rng(1).integers(1, 60, 400)
    batches = fill_batches(lengths, 64, 5, 4, lookahead)
    flat = [i for b in batches for r in b for i in r]
    assert sorted(flat) == list(range(400))
    assert all(len(b) == 4 and all(sum(lengths[r]) <= 64 and len(r) <= 5 for r in b) for b in batches)
    assert batches == fill_batches(lengths, 64, 5, 4, lookahead)
    placed: set[int] = set()
    for b in batches:  # after each batch, at most `lookahead` earlier pairs wait behind a placed one
        placed.update(i for r in b for i in r)
        assert len(set(range(max(placed))) - placed) <= lookahead
    assert len(batches) < len(fill_batches(lengths, 64, 5, 4))  # fewer, fuller batches than strict order


def test_score_groups_plan_the_fullest_group_of_every_host_and_refuse_a_fuller_batch():
    rows = _pairs(60, seed=13)
    spans = _spans(rows)
    kw = dict(seq_len=32, layout=PACKED, lengths=_lengths(rows), global_batch_pairs=0, global_batch_tokens=8 * 32,
              seed=3, prefetch=0, rows_multiple=2, score_spans=spans, plan_steps=1, num_epochs=1)
    hosts = [PreferenceLoader(rows, process_index=h, process_count=2, score_groups=4, **kw) for h in range(2)]
    per_row = PreferenceLoader(rows, process_index=0, process_count=2, **kw)
    most = 0  # brute force: global rows (host 0's 4, then host 1's), in 4 groups of 2
    for step in range(hosts[0].batches_in(0)):
        plans = hosts[0]._host_plans(0, step)
        sums = [int(spans[r].sum()) if r else 0 for host in plans for r in host + [[]] * (4 - len(host))]
        most = max(most, max(sums[i] + sums[i + 1] for i in range(0, 8, 2)))
    assert hosts[0].score_window == hosts[1].score_window == -(-most // 8) * 8
    assert hosts[0].score_groups == 4 and per_row.score_groups == 0 and per_row.score_window < hosts[0].score_window
    hosts[0].score_window = most - 1
    with pytest.raises(ValueError, match="a score group of batch .* has more scored tokens than the"):
        [hosts[0].batch_at(0, step) for step in range(hosts[0].batches_in(0))]


@pytest.mark.parametrize("lookahead", [1, 8])
def test_token_budget_loader_sees_every_pair_once_per_epoch_on_each_host_and_resumes_anywhere(lookahead):
    rows = _pairs(60, seed=12)
    kw = dict(seq_len=32, layout=PACKED, lengths=_lengths(rows), global_batch_pairs=0, global_batch_tokens=4 * 32,
              seed=5, prefetch=0, rows_multiple=2, pack_lookahead=lookahead)
    hosts = [PreferenceLoader(rows, process_index=h, process_count=2, **kw) for h in range(2)]
    assert hosts[0].planned_rows == 2  # 4 rows a step: 2 per host
    for epoch in range(2):
        n = hosts[0].batches_in(epoch)
        assert n == hosts[1].batches_in(epoch) and n > 60 * 12 // (4 * 32)  # pairs of ~12 tokens: ≥ 10 a batch
        seen = []
        for step in range(n):
            parts = [h.batch_at(epoch, step) for h in hosts]
            assert all(p["input_ids"].shape == (2, 32) and p["example_id"].shape == (8,) for p in parts)
            local = [[int(i) for i in p["example_id"] if i >= 0] for p in parts]
            assert sorted(local[0] + local[1]) == sorted(int(i) for i in hosts[0].global_indices(epoch, step))
            seen += local[0] + local[1]
        assert sorted(seen) == list(range(60))
    assert hosts[0].batches_in(0) != hosts[0].batches_in(1) or \
        hosts[0].global_indices(0, 0).tolist() != hosts[0].global_indices(1, 0).tolist()
    straight = PreferenceLoader(rows, **kw)
    for _ in range(7):
        next(straight)
    state = straight.state
    resumed = PreferenceLoader(rows, state=state, **kw)
    for _ in range(5):  # across the epoch boundary
        a, b = next(straight), next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="global_batch_tokens = 64 budgets packed rows; it needs "
                                         "config.data.layout = 'packed'"):
        PreferenceLoader(rows, seq_len=32, global_batch_pairs=0, global_batch_tokens=64)


def test_packed_loader_plans_one_row_count_and_sees_every_pair_once_per_epoch():
    rows = _pairs(40, seed=10)
    lengths = np.asarray([packed_length(r["chosen_input_ids"], r["chosen_loss_mask"], r["rejected_input_ids"],
                                        r["rejected_loss_mask"]) for r in rows])
    loader = PreferenceLoader(rows, seq_len=32, layout=PACKED, lengths=lengths, global_batch_pairs=8, seed=3,
                              prefetch=0, plan_steps=10, rows_multiple=2)
    shapes, seen = set(), []
    for _ in range(10):  # two epochs of 5 batches
        batch = next(loader)
        shapes.add(batch["input_ids"].shape)
        seen += [int(i) for i in batch["example_id"] if i >= 0]
        assert int(batch["example_mask"].sum()) == 8
    assert len(shapes) == 1 and next(iter(shapes))[0] == loader.planned_rows and loader.planned_rows % 2 == 0
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))
    again = PreferenceLoader(rows, seq_len=32, layout=PACKED, lengths=lengths, global_batch_pairs=8, seed=3,
                             prefetch=0, plan_steps=10, rows_multiple=2)
    for epoch, step in ((0, 3), (1, 2)):  # any batch is a pure function of (seed, epoch, step)
        a, b = loader.batch_at(epoch, step), again.batch_at(epoch, step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="scored tokens, more than the 2 score positions the step was built for"):
        PACKED.host_rows(rows[:4], 32, 0, score_window=2)


def test_a_packed_token_budget_tiny_run_resumes_exactly_after_sigkill(tmp_path):
    """`dpo-jax train` with packed rows and token-budget batches: killed after checkpoint 8, resumed, the same
    metric lines (the pairs per step vary)."""
    from dpo_jax.train import run as train_run
    from tests.test_runs import _cli, _config, _overrides, _train_lines, assert_same_lines, kill_and_resume

    cache = str(tmp_path / "cache")
    extra = {"data.layout": "packed", "data.max_pairs_per_row": 4, "train.steps": 12, "train.save_every": 4,
             "train.global_batch_tokens": 256, "train.log_every": 1}
    train_run.train(_config("dpo", _overrides(tmp_path / "straight", cache, **extra)))
    want = _train_lines(tmp_path / "straight")
    assert [r["step"] for r in want] == list(range(1, 13)) and want[-1]["loss"] < want[0]["loss"]
    assert len({r["num_pairs"] for r in want}) > 1
    overrides = _overrides(tmp_path / "killed", cache, **extra)
    kill_and_resume(_cli(overrides), "[train] step 9")
    assert_same_lines(_train_lines(tmp_path / "killed"), want)


def test_a_derived_token_budget_is_the_row_count_nearest_the_requested_pairs():
    """Hand cases of `budget_rows` (the packed layout's default batch): rows of 40 tokens."""
    ten = [10] * 64  # four pairs fill a row
    assert budget_rows(ten, 40, 8, 8, 1, 1) == 2  # 8 pairs: two full rows
    assert budget_rows(ten, 40, 8, 10, 1, 1) == 3  # 8 or 12 pairs are as near 10: ties take more rows
    assert budget_rows(ten, 40, 8, 8, 4, 1) == 4  # the mesh divides rows by 4: 16 pairs is the nearest it can do
    assert budget_rows(ten, 40, 2, 8, 1, 1) == 4  # at most 2 pairs a row
    assert budget_rows([40] * 64, 40, 8, 6, 2, 1) == 6  # a pair a row (fixed lengths): exactly the pairs
    assert budget_rows([30, 10] * 32, 40, 8, 6, 1, 1) == 3  # a 30 and a 10 share each row
    assert budget_rows([30, 10] * 32, 40, 8, 6, 4, 1) == 4  # 8 pairs on 4 rows, the mesh's least
    assert budget_rows([40] * 8, 40, 8, 64, 8, 1) == 8  # a split smaller than a batch: the rows that hold it all
    assert budget_rows([40] * 80, 40, 8, 64, 8, 1) == 64  # never more rows than a pair each
    with pytest.raises(ValueError, match="pairs = 0 and multiple = 1 must be >= 1"):
        budget_rows(ten, 40, 8, 0, 1, 1)
