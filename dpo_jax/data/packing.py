"""The shared-prompt row: prompt once, then the chosen and the rejected response, in one sequence.

DPO scores two responses to the same prompt. The plain layout runs the prompt twice (one row per response); here
one row holds `prompt + chosen + rejected`, the rejected tokens attend to the prompt and themselves but not to the
chosen tokens (segment ids with the prompt as the shared segment), their positions restart where the prompt ends,
and the rejected response's first token is predicted from the prompt's last position (`predecessor`). The model
computes exactly the two log-probabilities of the plain layout on len(prompt) fewer tokens per pair.

The shared part is the longest common prefix of the two tokenized sequences over which neither is scored, so a
tokenizer that merged the prompt's last token differently into each response still packs correctly.
"""

from __future__ import annotations

import numpy as np

PADDING, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


def shared_prefix_length(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> int:
    """Length of the common, unscored prefix of the chosen and the rejected sequence."""
    n = min(len(chosen_ids), len(rejected_ids))
    same = (np.asarray(chosen_ids[:n]) == np.asarray(rejected_ids[:n])) & (np.asarray(chosen_mask[:n]) == 0) & \
        (np.asarray(rejected_mask[:n]) == 0)
    return int(n if same.all() else np.argmin(same))


def packed_length(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> int:
    shared = shared_prefix_length(chosen_ids, chosen_mask, rejected_ids, rejected_mask)
    return len(chosen_ids) + len(rejected_ids) - shared


def pack_pair(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> dict[str, np.ndarray]:
    """1-D arrays of one packed row: input_ids, loss_mask, segment_ids, positions, predecessor (-1: none)."""
    chosen_ids, rejected_ids = np.asarray(chosen_ids), np.asarray(rejected_ids)
    shared = shared_prefix_length(chosen_ids, chosen_mask, rejected_ids, rejected_mask)
    nc, nr = len(chosen_ids), len(rejected_ids) - shared
    predecessor = np.arange(-1, nc + nr - 1)
    if nr:
        predecessor[nc] = shared - 1  # the rejected response continues the prompt, not the chosen response
    return {
        "input_ids": np.concatenate([chosen_ids, rejected_ids[shared:]]),
        "loss_mask": np.concatenate([np.asarray(chosen_mask), np.asarray(rejected_mask)[shared:]]),
        "segment_ids": np.concatenate([np.full(shared, PROMPT), np.full(nc - shared, CHOSEN),
                                       np.full(nr, REJECTED)]),
        "positions": np.concatenate([np.arange(nc), np.arange(shared, shared + nr)]),
        "predecessor": predecessor,
    }


# ----- several pairs per row (the `packed` layout) -----------------------------------------------------------------

def first_fit_decreasing(lengths, capacity: int, max_per_row: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows: longest first (ties by index), each into the first row with room for
    it and fewer than `max_per_row` items, else a new row. Deterministic; every index is placed exactly once."""
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a pair of {int(lengths.max())} tokens does not fit a packed row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        slot = next((r for r in range(len(rows)) if room[r] >= n and len(rows[r]) < max_per_row), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    return rows


def pack_row(pairs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several `pack_pair` results one after another in one row: group g's segment ids are shifted by
    SEGMENT_STRIDE·g (attention stays inside a group), positions restart per pair, predecessors are offset."""
    from dpo_jax.models.decoder import SEGMENT_STRIDE

    out, offset = [], 0
    for g, p in enumerate(pairs):
        pred = np.asarray(p["predecessor"])
        out.append({**p, "segment_ids": np.asarray(p["segment_ids"]) + SEGMENT_STRIDE * g,
                    "predecessor": np.where(pred >= 0, pred + offset, -1)})
        offset += len(p["input_ids"])
    return {k: np.concatenate([o[k] for o in out]) for k in pairs[0]} if pairs else {}


def fill_batches(lengths, capacity: int, max_per_row: int, rows: int, lookahead: int = 1) -> list[list[list[int]]]:
    """Token-budget batches: the pairs, in the given order, into batches of `rows` rows of `capacity` tokens —
    each pair into the first row of the open batch with room for it and fewer than `max_per_row` pairs. A pair that
    fits no row waits for the next batch while the pairs after it go on filling the gaps; the batch closes when
    `lookahead` pairs wait (1: the first misfit closes it — strict order). Waiting pairs come first in the next
    batch, so at most `lookahead` pairs are ever overtaken. Returns batches of rows of indices into `lengths`;
    deterministic, every index placed exactly once."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a pair of {int(lengths.max())} tokens does not fit a packed row of {capacity}")
    if lookahead < 1:
        raise ValueError(f"lookahead = {lookahead}: must be >= 1")
    batches: list[list[list[int]]] = []
    waiting: list[int] = []  # pairs set aside, in order (never more than `lookahead`)
    upcoming = iter(range(len(lengths)))
    following = next(upcoming, None)
    while waiting or following is not None:
        batch = [[] for _ in range(rows)]
        room = np.full(rows, capacity, np.int64)
        count = np.zeros(rows, np.int64)
        aside: list[int] = []
        examined = 0  # of `waiting`
        while len(aside) < lookahead:
            if examined < len(waiting):
                i, examined = waiting[examined], examined + 1
            elif following is not None:
                i, following = following, next(upcoming, None)
            else:
                break
            fits = (room >= lengths[i]) & (count < max_per_row)
            if not fits.any():
                aside.append(i)
                continue
            r = int(np.argmax(fits))
            batch[r].append(i)
            room[r] -= lengths[i]
            count[r] += 1
        waiting = sorted(aside + waiting[examined:])
        batches.append(batch)
    return batches


def budget_rows(lengths, capacity: int, max_per_row: int, pairs: int, multiple: int, lookahead: int,
                sample: int = 4096) -> int:
    """Rows per global batch for a requested `pairs` per step: the multiple of `multiple` (what the mesh and the
    micro-batches divide) whose token-budget batches (`fill_batches`) carry on average the nearest to `pairs` pairs
    on a fixed sample of the split (ties: the larger), at most the rows of one pair each. Deterministic: a pure
    function of its arguments, so a resumed run derives the same budget."""
    lengths = np.asarray(lengths, np.int64)
    if pairs < 1 or multiple < 1:
        raise ValueError(f"budget_rows: pairs = {pairs} and multiple = {multiple} must be >= 1")
    if len(lengths) > sample:
        lengths = lengths[np.sort(np.random.default_rng(0).permutation(len(lengths))[:sample])]
    most = -(-pairs // multiple)  # in multiples: one pair a row can always carry `pairs`
    full = pairs * float(lengths.mean()) / capacity / multiple  # if every row were full
    best = None
    for k in range(max(1, min(int(full), -(-len(lengths) // multiple))), most + 1):
        batches = fill_batches(lengths, capacity, max_per_row, k * multiple, lookahead)
        whole = batches[:-1] or batches  # the epoch's last batch is a remainder
        carried = sum(len(row) for batch in whole for row in batch) / len(whole)
        gap = abs(carried - pairs)
        if best is None or gap <= best[0]:
            best = (gap, k)
        if carried >= pairs or len(batches) == 1:  # more rows carry more pairs (or none: one batch holds all)
            break
    return best[1] * multiple
