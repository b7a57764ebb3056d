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


def fill_batches(lengths, capacity: int, max_per_row: int, rows: int) -> list[list[list[int]]]:
    """Token-budget batches: the pairs, in the given order, into batches of `rows` rows of `capacity` tokens —
    each pair into the first row of the open batch with room for it and fewer than `max_per_row` pairs; a pair
    that fits none closes the batch and opens the next. Returns batches of rows of indices into `lengths`;
    deterministic, every index placed exactly once, consecutive pairs stay in consecutive batches."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a pair of {int(lengths.max())} tokens does not fit a packed row of {capacity}")
    batches: list[list[list[int]]] = []
    room = np.zeros(rows, np.int64)
    count = np.full(rows, max_per_row, np.int64)  # a full count marks an unopened row in a closed batch
    for i, n in enumerate(lengths.tolist()):
        fits = (room >= n) & (count < max_per_row)
        if not fits.any():
            batches.append([[] for _ in range(rows)])
            room[:], count[:] = capacity, 0
            fits = room >= n
        r = int(np.argmax(fits))
        batches[-1][r].append(i)
        room[r] -= n
        count[r] += 1
    return batches
