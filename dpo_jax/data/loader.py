"""Deterministic, host-sharded, resumable loader of fixed-shape preference batches.

Batch `k` of epoch `e` is a pure function of (seed, e, k): the epoch's permutation is drawn from
`default_rng([seed, e])`, the global batch is its k-th slice of `global_batch_pairs` examples, and host `h` of `P`
reads only the h-th `global_batch_pairs / P` of them. Resuming from `LoaderState(epoch, step)` therefore yields
exactly the batches an uninterrupted run would have seen, on any number of restarts.

Host-local batch: b = global_batch_pairs / P pairs as rows of T tokens in the layout's fields (dpo_jax/data/layout.py:
a row per response, or one packed row per pair), T the smallest bucket that fits the *global* batch so every host
agrees on the shape; example_id [b] int32 (-1 for padding) and example_mask [b] int32 (0 for padding).
The last batch of an epoch is completed with padding examples (all-zero masks): nothing is dropped, and padding
never counts in metrics. A background thread prepares batches ahead so the accelerator does not wait on Python.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from dpo_jax.data.layout import Layout, get_layout
from dpo_jax.data.packing import fill_batches

Batch = dict[str, np.ndarray]


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
        layout: Layout | str = "pairs",
        score_window: int = 0,
        rows_multiple: int = 1,
        plan_steps: int = 0,
        global_batch_tokens: int = 0,
        score_spans: np.ndarray | None = None,
        pack_lookahead: int = 1,
        score_groups: int = 0,
    ):
        """source: random access (`len`, `source[i]` -> dict of TokenizedPair fields), e.g. a TFDS data source.
        seq_len: a fixed T, or buckets (sorted ascending; each batch takes the smallest that fits its longest
        sequence — `lengths[i]` = max(chosen, rejected) length of example i is then required).
        data_parallel_size: the product of the mesh's batch axes; the global batch must divide by it.
        layout: how pairs become rows (dpo_jax/data/layout.py; a name or a Layout); `lengths` are its row lengths.
        score_window: > 0 promises the step that every row's scored tokens lie within this many positions (the
        split's longest scored span, from the prepared metadata); each batch is checked against it.
        Packed layout (several pairs per row): every batch gets the same row count — the most any batch of the
        epochs that `plan_steps` steps reach (at least one; all epochs of a finite loader) needs on any host
        (first-fit decreasing into rows of seq_len), rounded up to `rows_multiple` (what the mesh and the
        micro-batches divide); a later batch that needs more rows gets them (a new shape, so a recompile — never
        a dropped pair).
        global_batch_tokens > 0 (packed layout only): token-budget batches instead of `global_batch_pairs` — every
        batch is ceil(global_batch_tokens / seq_len) rows (rounded up to `rows_multiple` per host), filled with the
        epoch's permutation in order by `packing.fill_batches` (a pair that fits no row waits while up to
        `pack_lookahead` later ones fill the gaps); the number of pairs, and of batches per epoch, then varies.
        Host h takes the h-th block of rows.
        score_spans (packed layout): per example, its packed pair's first-to-last scored span; the planned
        batches' most scored tokens in a row (rounded up to 8) become `score_window` — a gather size, not a span,
        in this layout (0 without spans: every position). score_groups = G > 0: the step gathers each of G
        groups of consecutive rows of the global batch together (StepConfig.score_groups: one per batch shard),
        so the window is the most scored tokens in a group; 0 (or K = 1): per row."""
        self._arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.layout = get_layout(layout) if isinstance(layout, str) else layout
        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("the dataset is empty (after skipping bad examples)")
        if global_batch_pairs < 1 and not global_batch_tokens:
            raise ValueError(f"global_batch_pairs must be >= 1, got {global_batch_pairs}")
        for name, divisor in (("data-parallel size (product of the mesh's batch axes)", data_parallel_size),
                              ("process count", process_count)):
            if global_batch_pairs % divisor and not global_batch_tokens:
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
        self.score_window = score_window  # the packed layout plans its own (_plan)
        self.score_groups = 0  # what the step must use: set by _plan_window (packed, K > 1)
        self.pairs_per_row = 1
        self.rows_multiple, self.planned_rows = max(int(rows_multiple), 1), None
        self.global_batch = global_batch_pairs
        self.local_batch = global_batch_pairs // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.num_epochs, self.prefetch = num_epochs, prefetch
        self.batches_per_epoch = -(-self.num_examples // max(global_batch_pairs, 1))  # pair-count batches
        self._state = state or LoaderState.start()
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.global_batch_tokens, self._epoch_plan = int(global_batch_tokens), None
        self.pack_lookahead = int(pack_lookahead)
        # where the batch comes from (pipeline.build_loaders marks a "derived" budget): "" for pair counts
        self.budget = "explicit" if global_batch_tokens else ""
        self.score_spans = None if score_spans is None else np.asarray(score_spans)
        if self.global_batch_tokens and self.layout.rows_per_pair != 0:
            raise ValueError(f"config.train.global_batch_tokens = {self.global_batch_tokens} budgets packed rows; "
                             f"it needs config.data.layout = 'packed' (got {self.layout.name!r})")
        if self.layout.rows_per_pair == 0:
            self._plan(num_epochs, plan_steps)

    def _plan(self, num_epochs: int | None, plan_steps: int) -> None:
        """The packed layout's static shape (see __init__): the row count and the most scored tokens a row of the
        planned batches holds (bounded by its pairs' scored spans: the step gathers that many score positions)."""
        if self.lengths is None or len(self.buckets) != 1:
            raise ValueError("the packed layout needs the examples' packed lengths and one seq_len (no buckets)")
        if self.global_batch_tokens < 0:
            raise ValueError(f"config.train.global_batch_tokens = {self.global_batch_tokens}: must be >= 0")
        if self.global_batch_tokens:
            per_host = -(-self.global_batch_tokens // (self.buckets[0] * self.process_count))
            self.planned_rows = -(-per_host // self.rows_multiple) * self.rows_multiple
        batches, epoch = [], 0
        while (epoch < num_epochs) if num_epochs else (epoch == 0 or len(batches) < plan_steps):
            batches += [self._host_plans(epoch, step) for step in range(self.batches_in(epoch))]
            epoch += 1
        rows = [row for batch in batches for host in batch for row in host]
        self.pairs_per_row = max(len(row) for row in rows)  # the most any planned row holds (<= K)
        if not self.global_batch_tokens:
            need = max(1, *(len(host) for batch in batches for host in batch))
            self.planned_rows = -(-need // self.rows_multiple) * self.rows_multiple
        self._planned = batches
        self._plan_window()

    def _plan_window(self) -> None:
        """score_window of the planned batches: the most scored tokens in a row, or in a score group."""
        grouped = self.score_spans is not None and self.layout.max_pairs_per_row > 1
        self.score_groups = self._arguments["score_groups"] if grouped else 0
        if self.score_spans is None:
            self.score_window = 0
            return
        if self.score_groups:
            most = max(self._group_most(batch, self.planned_rows) for batch in self._planned)
            positions = self.planned_rows * self.process_count // self.score_groups * self.buckets[0]
        else:
            most = max(int(self.score_spans[row].sum()) for batch in self._planned for host in batch for row in host
                       if row)
            positions = self.buckets[0]
        self.score_window = min(-(-most // 8) * 8, positions - 1)  # a row's position 0 is never scored

    def _group_most(self, batch: list[list[list[int]]], rows: int) -> int:
        """The most scored tokens in one of the score groups of a global batch (per host, `rows` rows)."""
        spans = [int(self.score_spans[row].sum()) if row else 0
                 for host in batch for row in host + [[]] * (rows - len(host))]
        if len(spans) % self.score_groups:
            raise ValueError(f"{len(spans)} packed rows do not split into {self.score_groups} score groups")
        return int(np.asarray(spans).reshape(self.score_groups, -1).sum(1).max())

    def _host_plans(self, epoch: int, step: int) -> list[list[list[int]]]:
        """Per host, the rows of global batch (epoch, step) as source indices (the same answer on every host)."""
        if self.global_batch_tokens:
            rows = self._batches(epoch)[step]
            return [rows[h * self.planned_rows:(h + 1) * self.planned_rows] for h in range(self.process_count)]
        indices = self.global_indices(epoch, step)
        hosts = [indices[h * self.local_batch:(h + 1) * self.local_batch] for h in range(self.process_count)]
        return [[[int(h[h >= 0][i]) for i in row] for row in self.layout.plan_rows(self.lengths[h[h >= 0]],
                                                                                    self.buckets[0])]
                for h in hosts]

    def _batches(self, epoch: int) -> list[list[list[int]]]:
        """Token-budget mode: epoch `epoch`'s batches, each `planned_rows · processes` rows of source indices."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            perm = self._permutation(epoch)
            rows = self.planned_rows * self.process_count
            plan = fill_batches(self.lengths[perm], self.buckets[0], self.layout.max_pairs_per_row, rows,
                                self.pack_lookahead)
            self._epoch_plan = (epoch, [[[int(perm[i]) for i in row] for row in batch] for batch in plan])
        return self._epoch_plan[1]

    def use_pairs_per_row(self, k: int) -> None:
        """Shrinks the packed layout's K to k >= `pairs_per_row`, before iterating: no planned row holds more than k
        pairs, so the plans (first fit with a cap never reached) are the same and only the per-pair arrays shrink."""
        if not self.pairs_per_row <= k <= self.layout.max_pairs_per_row or self._thread is not None:
            raise ValueError(f"K = {k}: must lie in [{self.pairs_per_row}, {self.layout.max_pairs_per_row}] and be "
                             "set before the loader starts")
        self.layout = self._arguments["layout"] = get_layout(self.layout.name, k)
        self._plan_window()  # K = 1: the contiguous per-row window

    def batches_in(self, epoch: int) -> int:
        """Batches in epoch `epoch` (varies with the epoch only for token-budget batches)."""
        return len(self._batches(epoch)) if self.global_batch_tokens else self.batches_per_epoch

    def mean_pairs(self, epoch: int = 0) -> float:
        """Real pairs per batch of epoch `epoch`, on average (its last, remainder batch included)."""
        return self.num_examples / self.batches_in(epoch)

    # ----- the pure part ------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples) if self.shuffle \
                else np.arange(self.num_examples)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Source indices of the global batch (epoch, step); -1 marks padding examples."""
        if self.global_batch_tokens:
            return np.asarray([i for row in self._batches(epoch)[step] for i in row], np.int64)
        chunk = self._permutation(epoch)[step * self.global_batch:(step + 1) * self.global_batch]
        return np.concatenate([chunk, np.full(self.global_batch - len(chunk), -1, chunk.dtype)])

    def batch_at(self, epoch: int, step: int) -> Batch:
        """This host's part of global batch (epoch, step)."""
        if self.layout.rows_per_pair == 0:  # packed: the rows were planned (_host_plans), the layout fills them
            plans = self._host_plans(epoch, step)
            need = max(1, *(len(host) for host in plans))  # past the planned epochs a batch may need more rows
            rows, mine = max(self.planned_rows, -(-need // self.rows_multiple) * self.rows_multiple), \
                plans[self.process_index]
            if self.score_groups and self._group_most(plans, rows) > self.score_window:
                raise ValueError(f"a score group of batch {step} of epoch {epoch} has more scored tokens than the "
                                 f"{self.score_window} score positions the step was built for (planned over the "
                                 "batches train.steps reaches; raising train.steps on resume can exceed it: start "
                                 "the run with the final train.steps)")
            sizes = np.cumsum([0] + [len(row) for row in mine])
            plan = [list(range(a, b)) for a, b in zip(sizes[:-1], sizes[1:])]
            return self._finish([self.source[i] for row in mine for i in row], self.buckets[0], rows, plan)
        indices = self.global_indices(epoch, step)
        real = indices[indices >= 0]
        if len(self.buckets) == 1:
            t = self.buckets[0]
        else:
            longest = int(self.lengths[real].max())
            t = next(b for b in self.buckets if b >= longest)
        local = indices[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
        return self._finish([None if i < 0 else self.source[int(i)] for i in local], t, None)

    def _finish(self, examples: list, t: int, rows: int | None, plan: list[list[int]] | None = None) -> Batch:
        return host_batch(self.layout, examples, t, self.pad_id, self.score_window, rows, plan)

    def one_pass(self, prefetch: int = 2) -> "PreferenceLoader":
        """A fresh, unshuffled single pass over this loader's split with the same batch geometry (evaluation and
        the reference pass)."""
        return PreferenceLoader(**{**self._arguments, "shuffle": False, "num_epochs": 1, "state": None,
                                   "prefetch": prefetch})

    def _advance(self, state: LoaderState) -> LoaderState:
        epoch, step = int(state.epoch), int(state.step) + 1
        if step == self.batches_in(epoch):
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


def host_batch(layout, examples: list, seq_len: int, pad_id: int, score_window: int = 0, rows: int | None = None,
               plan: list[list[int]] | None = None) -> Batch:
    """A host's batch: the examples' rows in the layout, then the per-pair fields in the layout's pair order (None:
    a padding example). All-None examples give the batch's shapes and dtypes without data (`dpo-jax plan`)."""
    extra = {} if plan is None else {"plan": plan}
    out = layout.host_rows(examples, seq_len, pad_id, score_window, rows=rows, **extra)
    if "pair_order" in out:  # the layout's per-pair order (packed: row-major slots)
        examples = [None if i < 0 else examples[i] for i in out.pop("pair_order")]
    out["example_id"] = np.asarray([-1 if ex is None else int(ex["example_id"]) for ex in examples], np.int32)
    out["example_mask"] = np.asarray([ex is not None for ex in examples], np.int32)
    out["margin"] = np.asarray([0.0 if ex is None else float(ex.get("margin", 0.0)) for ex in examples], np.float32)
    return out
