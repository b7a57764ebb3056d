"""Deterministic, host-sharded, resumable loader of fixed-shape preference batches.

Batch `k` of epoch `e` is a pure function of (seed, e, k): the epoch's permutation is drawn from
`default_rng([seed, e])`, the global batch is its k-th slice of `global_batch_pairs` examples, and host `h` of `P`
reads only the h-th `global_batch_pairs / P` of them. Resuming from `LoaderState(epoch, step)` therefore yields
exactly the batches an uninterrupted run would have seen, on any number of restarts.

Host-local batch (b = global_batch_pairs / P pairs, T = the smallest bucket that fits the *global* batch, so every
host agrees on the shape):
  input_ids, loss_mask, attention_mask  [2b, T] int32, chosen rows first then rejected
  example_id [b] int32 (-1 for padding), example_mask [b] int32 (0 for padding)
With layout="shared_prompt" each pair is one packed row (data/packing.py): input_ids, loss_mask, attention_mask,
segment_ids, positions, predecessor [b, T], T then bounding the packed length (prompt + chosen + rejected).
The last batch of an epoch is completed with padding examples (all-zero masks): nothing is dropped, and padding
never counts in metrics. A background thread prepares batches ahead so the accelerator does not wait on Python.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from dpo_jax.data.packing import ROW_FIELDS, pack_pair, scored_span

Batch = dict[str, np.ndarray]
LAYOUTS = ("pairs", "shared_prompt")


class LoaderState(NamedTuple):
    """Where the next batch comes from; a small pytree saved in checkpoints."""

    epoch: np.ndarray  # int64 scalar
    step: np.ndarray  # int64 scalar, batch index within the epoch

    @classmethod
    def start(cls) -> "LoaderState":
        return cls(np.asarray(0, np.int64), np.asarray(0, np.int64))


class PreferenceLoader:
    def __init__(
        self,
        source: Any,
        *,
        global_batch_pairs: int,
        seq_len: int | Sequence[int],
        seed: int = 0,
        shuffle: bool = True,
        lengths: np.ndarray | None = None,
        pad_id: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        data_parallel_size: int = 1,
        num_epochs: int | None = None,
        prefetch: int = 2,
        state: LoaderState | None = None,
        layout: str = "pairs",
        score_window: int = 0,
    ):
        """source: random access (`len`, `source[i]` -> dict of TokenizedPair fields), e.g. a TFDS data source.
        seq_len: a fixed T, or buckets (sorted ascending; each batch takes the smallest that fits its longest
        sequence — `lengths[i]` = max(chosen, rejected) length of example i is then required).
        data_parallel_size: the product of the mesh's batch axes; the global batch must divide by it.
        layout: "pairs" (a row per response) or "shared_prompt" (a packed row per pair; `lengths` are then the
        packed lengths).
        score_window: > 0 promises the step that every row's scored tokens lie within this many positions (the
        split's longest scored span, from the prepared metadata); each batch is checked against it."""
        if layout not in LAYOUTS:
            raise ValueError(f"config.data.layout = {layout!r}; valid: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("the dataset is empty (after skipping bad examples)")
        if global_batch_pairs < 1:
            raise ValueError(f"global_batch_pairs must be >= 1, got {global_batch_pairs}")
        for name, divisor in (("data-parallel size (product of the mesh's batch axes)", data_parallel_size),
                              ("process count", process_count)):
            if global_batch_pairs % divisor:
                raise ValueError(f"global batch of {global_batch_pairs} pairs is not divisible by the {name} "
                                 f"{divisor}; use a multiple of {divisor}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.buckets = sorted({seq_len} if isinstance(seq_len, int) else set(seq_len))
        self.lengths = None if lengths is None else np.asarray(lengths)
        if len(self.buckets) > 1 and self.lengths is None:
            raise ValueError("seq_len buckets need `lengths` (per-example max sequence length)")
        if self.lengths is not None:
            if len(self.lengths) != self.num_examples:
                raise ValueError(f"lengths has {len(self.lengths)} entries for {self.num_examples} examples")
            if self.lengths.max() > self.buckets[-1]:
                raise ValueError(f"an example has {self.lengths.max()} tokens, more than the largest seq_len "
                                 f"{self.buckets[-1]}; raise seq_len or lower data.max_length")
        self.score_window = score_window
        self.global_batch = global_batch_pairs
        self.local_batch = global_batch_pairs // process_count
        self.process_index = process_index
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.num_epochs, self.prefetch = num_epochs, prefetch
        self.batches_per_epoch = -(-self.num_examples // global_batch_pairs)
        self._state = state or LoaderState.start()
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ----- the pure part ------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples) if self.shuffle \
                else np.arange(self.num_examples)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Source indices of the global batch (epoch, step); -1 marks padding examples."""
        chunk = self._permutation(epoch)[step * self.global_batch:(step + 1) * self.global_batch]
        return np.concatenate([chunk, np.full(self.global_batch - len(chunk), -1, chunk.dtype)])

    def batch_at(self, epoch: int, step: int) -> Batch:
        """This host's part of global batch (epoch, step)."""
        indices = self.global_indices(epoch, step)
        real = indices[indices >= 0]
        if len(self.buckets) == 1:
            t = self.buckets[0]
        else:
            longest = int(self.lengths[real].max())
            t = next(b for b in self.buckets if b >= longest)
        local = indices[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
        if self.layout == "shared_prompt":
            return self._packed_batch(local, t)
        b = self.local_batch
        out = {
            "input_ids": np.full((2 * b, t), self.pad_id, np.int32),
            "loss_mask": np.zeros((2 * b, t), np.int32),
            "attention_mask": np.zeros((2 * b, t), np.int32),
            "example_id": np.full((b,), -1, np.int32),
            "example_mask": np.zeros((b,), np.int32),
        }
        for row, index in enumerate(local):
            if index < 0:
                continue
            ex = self.source[int(index)]
            out["example_id"][row] = int(ex["example_id"])
            out["example_mask"][row] = 1
            for offset, side in ((0, "chosen"), (b, "rejected")):
                ids, mask = np.asarray(ex[f"{side}_input_ids"]), np.asarray(ex[f"{side}_loss_mask"])
                if len(ids) > t:
                    raise ValueError(f"example {int(ex['example_id'])} has {len(ids)} tokens, more than seq_len "
                                     f"{t}; raise seq_len or lower data.max_length")
                self._check_span(ex, scored_span(mask))
                out["input_ids"][row + offset, :len(ids)] = ids
                out["loss_mask"][row + offset, :len(ids)] = mask
                out["attention_mask"][row + offset, :len(ids)] = 1
        return out

    def _packed_batch(self, local: np.ndarray, t: int) -> Batch:
        b = self.local_batch
        out = {k: np.zeros((b, t), np.int32) for k in ROW_FIELDS}
        out["input_ids"][:] = self.pad_id
        out["predecessor"][:] = -1
        out["example_id"] = np.full((b,), -1, np.int32)
        out["example_mask"] = np.zeros((b,), np.int32)
        for row, index in enumerate(local):
            if index < 0:
                continue
            ex = self.source[int(index)]
            packed = pack_pair(ex["chosen_input_ids"], ex["chosen_loss_mask"], ex["rejected_input_ids"],
                               ex["rejected_loss_mask"])
            n = len(packed["input_ids"])
            if n > t:
                raise ValueError(f"example {int(ex['example_id'])} packs to {n} tokens, more than seq_len {t}; "
                                 "raise seq_len or lower data.max_length")
            self._check_span(ex, scored_span(packed["loss_mask"], packed["predecessor"]))
            for key, value in packed.items():
                out[key][row, :n] = value
            out["attention_mask"][row, :n] = 1
            out["example_id"][row] = int(ex["example_id"])
            out["example_mask"][row] = 1
        return out

    def _check_span(self, ex, span: int) -> None:
        if self.score_window and span > self.score_window:
            raise ValueError(f"example {int(ex['example_id'])} has {span} positions from its first to its last "
                             f"scored token, more than the score window {self.score_window} the step was built "
                             "for; the prepared data's metadata does not match it (delete the data cache)")

    def _advance(self, state: LoaderState) -> LoaderState:
        epoch, step = int(state.epoch), int(state.step) + 1
        if step == self.batches_per_epoch:
            epoch, step = epoch + 1, 0
        return LoaderState(np.asarray(epoch, np.int64), np.asarray(step, np.int64))

    def _done(self, state: LoaderState) -> bool:
        return self.num_epochs is not None and int(state.epoch) >= self.num_epochs

    # ----- iteration with prefetch ----------------------------------------------------------------------------------

    @property
    def state(self) -> LoaderState:
        """The position of the next batch `next()` will return (save this with the train state)."""
        return self._state

    def _put(self, item) -> bool:
        """Blocks until the queue takes `item` or close() is called (then False): never hangs a closing loader."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, state: LoaderState) -> None:
        try:
            while not self._stop.is_set() and not self._done(state):
                item = (self.batch_at(int(state.epoch), int(state.step)), self._advance(state))
                if not self._put(item):
                    return
                state = item[1]
            self._put(None)
        except BaseException as e:  # surfaced to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._done(self._state):
            raise StopIteration
        if self.prefetch <= 0:
            batch, self._state = self.batch_at(int(self._state.epoch), int(self._state.step)), \
                self._advance(self._state)
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, args=(self._state,), daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (also done on garbage collection)."""
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> "PreferenceLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

