"""Batch layouts: how preference pairs become model rows. Everything that depends on the layout is here, once.

`pairs` — a row per response. A host block of b pairs is its b chosen rows then its b rejected rows; the global
batch is the P host blocks in process order, so pairs are matched inside each block and host-local batches never
need reordering. Fields [2b, T]: input_ids, loss_mask, attention_mask.

`shared_prompt` — one packed row per pair, prompt + chosen + rejected with the prompt computed once (packing.py).
Fields [b, T]: input_ids, loss_mask, attention_mask, segment_ids, positions, predecessor. The chosen/rejected
split is by segment instead of by row.

Both: example_id and example_mask [b] (-1 / 0 for padding examples). Which tokens are scored is the one rule in
`logprobs.scored_mask`. Gradient accumulation splits a batch into M micro-batches by giving pair i of every host
block to micro-batch i mod M, so every device keeps rows of every micro-batch and the split moves no data.
Everything the step computes after `responses` is layout-independent; room is left for packing several pairs per
row (a third layout) behind the same methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.data.packing import CHOSEN, PROMPT, REJECTED, first_fit_decreasing, pack_pair, pack_row
from dpo_jax.logprobs import scored_mask
from dpo_jax.models.decoder import SEGMENT_STRIDE

Batch = dict[str, Any]


def _check(example: dict, tokens: int, span: int, seq_len: int, score_window: int, what: str) -> None:
    if tokens > seq_len:
        raise ValueError(f"example {int(example['example_id'])} {what} {tokens} tokens, more than seq_len {seq_len}; "
                         "raise seq_len or lower data.max_length")
    if score_window and span > score_window:
        raise ValueError(f"example {int(example['example_id'])} has {span} positions from its first to its last "
                         f"scored token, more than the score window {score_window} the step was built for; the "
                         "prepared data's metadata does not match it (delete the data cache)")


def scored_span(loss_mask, predecessor=None) -> int:
    """Positions from a row's first scored token to its last, inclusive (0 if none): what a score window (the
    unembedding's positions, logprobs.py) must cover."""
    where = np.flatnonzero(scored_mask(np.asarray(loss_mask), None if predecessor is None else
                                       np.asarray(predecessor)))
    return int(where[-1] - where[0] + 1) if len(where) else 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """The interface; `LAYOUTS` holds the instances. Frozen and field-less: hashable, a static jit argument."""

    name: ClassVar[str]
    row_keys: ClassVar[tuple[str, ...]]  # the [rows, T] fields the model reads
    rows_per_pair: ClassVar[int]

    def rows(self, pairs: int) -> int:
        """Sequences the model runs for `pairs` preference pairs."""
        return self.rows_per_pair * pairs

    # ----- host side (numpy): examples -> rows ----------------------------------------------------------------------

    def row_lengths(self, prepared) -> np.ndarray:
        """Per example, the longest row it makes (what buckets and seq_len must fit)."""
        raise NotImplementedError

    def score_spans(self, prepared) -> np.ndarray:
        """Per example, its rows' longest first-to-last scored span (what a score window must cover)."""
        raise NotImplementedError

    def default_seq_len(self, row_lengths: np.ndarray, max_length: int) -> int:
        """The static row length when no buckets are configured."""
        raise NotImplementedError

    def host_rows(self, examples: Sequence[dict | None], seq_len: int, pad_id: int, score_window: int = 0,
                  rows: int | None = None) -> Batch:
        """[rows, seq_len] numpy fields for b example slots (None: a padding example, all masks 0). A layout that
        reorders the pairs (packed) adds `pair_order`: the examples' indices in per-pair order, -1 for empty slots;
        `rows` is its planned row count (at least)."""
        raise NotImplementedError

    # ----- device side (jax): rows -> the two responses --------------------------------------------------------------

    def decoder_inputs(self, batch: Batch) -> dict[str, Any]:
        """Keyword arguments of `Decoder.__call__` besides input_ids."""
        raise NotImplementedError

    def predecessor(self, batch: Batch) -> jax.Array | None:
        """Where each token is predicted from (None: the previous position)."""
        return None

    def scored(self, batch: Batch) -> jax.Array:
        """[rows, T] bool: the tokens whose log-prob counts."""
        return scored_mask(batch["loss_mask"], self.predecessor(batch))

    def responses(self, x: jax.Array, batch: Batch, num_blocks: int) -> tuple[jax.Array, jax.Array]:
        """A per-token [rows, T] array that is 0 off scored tokens -> (chosen, rejected) [B, T] in pair order."""
        raise NotImplementedError

    def sequences(self, x: jax.Array, valid: jax.Array, batch: Batch, num_blocks: int
                  ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """A per-token [rows, T] array and a [rows, T] bool -> ((x, valid) of the chosen sequence, (x, valid) of the
        rejected one), each [B, T] in pair order, `valid` kept only on that sequence's own tokens (prompt and
        response): what a reward model reads its score from."""
        raise NotImplementedError

    def micro_batches(self, batch: Batch, m: int, num_blocks: int) -> Batch:
        """Every field [rows or B, ...] -> [M, ... / M, ...]: micro-batch k holds pairs i ≡ k (mod M) of each block."""
        raise NotImplementedError


def _split_blocks(x: jax.Array, m: int, num_blocks: int, sides: int) -> jax.Array:
    """[P·sides·n·M, ...] (each host block = `sides` groups of n·M) -> [M, P·sides·n, ...], same nesting inside."""
    y = x.reshape(num_blocks, sides, -1, m, *x.shape[1:])
    return jnp.moveaxis(y, 3, 0).reshape(m, -1, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class PairRows(Layout):
    name: ClassVar[str] = "pairs"
    row_keys: ClassVar[tuple[str, ...]] = ("input_ids", "loss_mask", "attention_mask")
    rows_per_pair: ClassVar[int] = 2

    def row_lengths(self, prepared) -> np.ndarray:
        return prepared.lengths

    def score_spans(self, prepared) -> np.ndarray:
        return prepared.score_spans

    def default_seq_len(self, row_lengths: np.ndarray, max_length: int) -> int:
        return max_length

    def host_rows(self, examples, seq_len, pad_id, score_window=0, rows=None) -> Batch:
        b = len(examples)
        out = {"input_ids": np.full((2 * b, seq_len), pad_id, np.int32),
               "loss_mask": np.zeros((2 * b, seq_len), np.int32),
               "attention_mask": np.zeros((2 * b, seq_len), np.int32)}
        for row, ex in enumerate(examples):
            if ex is None:
                continue
            for offset, side in ((0, "chosen"), (b, "rejected")):
                ids, mask = np.asarray(ex[f"{side}_input_ids"]), np.asarray(ex[f"{side}_loss_mask"])
                _check(ex, len(ids), scored_span(mask), seq_len, score_window, "has")
                out["input_ids"][row + offset, :len(ids)] = ids
                out["loss_mask"][row + offset, :len(ids)] = mask
                out["attention_mask"][row + offset, :len(ids)] = 1
        return out

    def decoder_inputs(self, batch):
        return {"attention_mask": batch["attention_mask"]}

    def responses(self, x, batch, num_blocks):
        y = x.reshape(num_blocks, 2, -1, *x.shape[1:])
        return y[:, 0].reshape(-1, *x.shape[1:]), y[:, 1].reshape(-1, *x.shape[1:])

    def sequences(self, x, valid, batch, num_blocks):
        (xc, xr), (vc, vr) = self.responses(x, batch, num_blocks), self.responses(valid, batch, num_blocks)
        return (xc, vc), (xr, vr)

    def micro_batches(self, batch, m, num_blocks):
        return {k: _split_blocks(v, m, num_blocks, 2 if k in self.row_keys else 1) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class SharedPrompt(Layout):
    name: ClassVar[str] = "shared_prompt"
    row_keys: ClassVar[tuple[str, ...]] = ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions",
                                           "predecessor")
    rows_per_pair: ClassVar[int] = 1

    def row_lengths(self, prepared) -> np.ndarray:
        return prepared.packed_lengths

    def score_spans(self, prepared) -> np.ndarray:
        return prepared.packed_score_spans

    def default_seq_len(self, row_lengths: np.ndarray, max_length: int) -> int:
        return rounded_max(row_lengths)

    def host_rows(self, examples, seq_len, pad_id, score_window=0, rows=None) -> Batch:
        b = len(examples)
        out = {k: np.zeros((b, seq_len), np.int32) for k in self.row_keys}
        out["input_ids"][:] = pad_id
        out["predecessor"][:] = -1
        for row, ex in enumerate(examples):
            if ex is None:
                continue
            packed = pack_pair(ex["chosen_input_ids"], ex["chosen_loss_mask"], ex["rejected_input_ids"],
                               ex["rejected_loss_mask"])
            n = len(packed["input_ids"])
            _check(ex, n, scored_span(packed["loss_mask"], packed["predecessor"]), seq_len, score_window,
                   "packs to")
            for key, value in packed.items():
                out[key][row, :n] = value
            out["attention_mask"][row, :n] = 1
        return out

    def decoder_inputs(self, batch):
        return {"positions": batch["positions"], "segment_ids": batch["segment_ids"],
                "attention_mask": batch["attention_mask"], "shared_segment": PROMPT}

    def predecessor(self, batch):
        return batch["predecessor"]

    def responses(self, x, batch, num_blocks):
        segments = batch["segment_ids"]
        return x * (segments == CHOSEN), x * (segments == REJECTED)

    def sequences(self, x, valid, batch, num_blocks):
        segments = batch["segment_ids"]
        return tuple((x, valid & ((segments == PROMPT) | (segments == side))) for side in (CHOSEN, REJECTED))

    def micro_batches(self, batch, m, num_blocks):
        return {k: _split_blocks(v, m, num_blocks, 1) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class PackedPairs(SharedPrompt):
    """Several shared-prompt pairs one after another per row (packing.py: first-fit decreasing), attention kept
    inside each pair by the segment ids' group (SEGMENT_STRIDE · slot + role). Rows [R, T]; every per-pair field is
    [R·K] in slot order (row r, slot k at r·K + k; empty slots are padding examples), so the per-pair arrays the
    step computes are [R·K, T]: `responses` masks the row to one slot's tokens — R·K·T floats, small next to the
    model — and everything after it is the same as in the other layouts."""

    name: ClassVar[str] = "packed"
    rows_per_pair: ClassVar[int] = 0  # rows are planned by the loader, not a multiple of the pairs
    max_pairs_per_row: int = 8  # K, static: the step's per-pair arrays are [rows · K]

    def rows(self, pairs: int) -> int:
        raise ValueError("the packed layout's row count is planned by the loader, not derived from the pairs")

    def plan_rows(self, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
        """Which of these pairs (their packed lengths) share a row."""
        return first_fit_decreasing(lengths, seq_len, self.max_pairs_per_row)

    def host_rows(self, examples, seq_len, pad_id, score_window=0, rows=None, plan=None) -> Batch:
        """`plan`: which examples share a row (token-budget batches, planned by the loader); default
        first-fit decreasing."""
        k = self.max_pairs_per_row
        real = [i for i, ex in enumerate(examples) if ex is not None]
        packed = {i: pack_pair(examples[i]["chosen_input_ids"], examples[i]["chosen_loss_mask"],
                               examples[i]["rejected_input_ids"], examples[i]["rejected_loss_mask"]) for i in real}
        if plan is None:
            plan = [[real[j] for j in row] for row in self.plan_rows([len(packed[i]["input_ids"]) for i in real],
                                                                      seq_len)]
        plan = [row for row in plan if row]
        rows = max(rows or 0, len(plan), 1)
        out = {key: np.zeros((rows, seq_len), np.int32) for key in self.row_keys}
        out["input_ids"][:] = pad_id
        out["predecessor"][:] = -1
        order = np.full(rows * k, -1, np.int64)
        for r, members in enumerate(plan):
            row = pack_row([packed[i] for i in members])
            n = len(row["input_ids"])
            for key, value in row.items():
                out[key][r, :n] = value
            out["attention_mask"][r, :n] = 1
            order[r * k:r * k + len(members)] = members
        most = int(scored_mask(out["loss_mask"], out["predecessor"]).sum(1).max())
        if score_window and most > score_window:
            raise ValueError(f"a packed row has {most} scored tokens, more than the {score_window} score positions "
                             "the step was built for (planned over the batches train.steps reaches; raising "
                             "train.steps on resume can exceed it: start the run with the final train.steps)")
        out["pair_order"] = order
        return out

    def _slot_roles(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """([R, K, T] bool: the token belongs to slot k, [R, 1, T] its role)."""
        segments = batch["segment_ids"]
        slot = jnp.arange(self.max_pairs_per_row)[None, :, None]
        return (segments // SEGMENT_STRIDE)[:, None, :] == slot, (segments % SEGMENT_STRIDE)[:, None, :]

    def responses(self, x, batch, num_blocks):
        in_slot, role = self._slot_roles(batch)
        return tuple((x[:, None, :] * (in_slot & (role == side))).reshape(-1, x.shape[-1])
                     for side in (CHOSEN, REJECTED))

    def sequences(self, x, valid, batch, num_blocks):
        in_slot, role = self._slot_roles(batch)
        flat = lambda y: y.reshape(-1, x.shape[-1])  # noqa: E731
        wide = flat(jnp.broadcast_to(x[:, None, :], in_slot.shape))
        return tuple((wide, flat(valid[:, None, :] & in_slot & ((role == PROMPT) | (role == side))))
                     for side in (CHOSEN, REJECTED))

    def micro_batches(self, batch, m, num_blocks):
        k = self.max_pairs_per_row
        out = {}
        for key, v in batch.items():
            if key in self.row_keys:
                out[key] = _split_blocks(v, m, num_blocks, 1)
            else:  # per pair [R·K] -> per row [R, K], split with the rows, back to [M, R/M·K]
                y = _split_blocks(v.reshape(-1, k, *v.shape[1:]), m, num_blocks, 1)
                out[key] = y.reshape(m, -1, *v.shape[1:])
        return out


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (PairRows(), SharedPrompt(), PackedPairs())}
PAIRS = LAYOUTS["pairs"]


def get_layout(name: str, max_pairs_per_row: int | None = None) -> Layout:
    """A layout by name; `max_pairs_per_row` sets the packed layout's K."""
    if name not in LAYOUTS:
        raise ValueError(f"config.data.layout = {name!r}; valid: {', '.join(LAYOUTS)}")
    if name == PackedPairs.name and max_pairs_per_row is not None:
        if max_pairs_per_row < 1:
            raise ValueError(f"config.data.max_pairs_per_row = {max_pairs_per_row}: must be >= 1")
        return PackedPairs(max_pairs_per_row=int(max_pairs_per_row))
    return LAYOUTS[name]


def rounded_max(lengths: np.ndarray, multiple: int = 16) -> int:
    """One static length for a split: its longest row or scored span, rounded up (at least `multiple`)."""
    return int(max(-(-int(np.max(lengths)) // multiple), 1) * multiple)
