"""The `data` config section and the function that turns it into loaders: files -> TFDS caches -> batches."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from dpo_jax.compile_cache import default_cache_dir
from dpo_jax.data import storage
from dpo_jax.data.formats import FORMATS, detect_format, iter_rows
from dpo_jax.data.layout import get_layout, rounded_max
from dpo_jax.data.loader import LoaderState, PreferenceLoader
from dpo_jax.data.packing import budget_rows
from dpo_jax.data.tokenize import TRUNCATION_MODES, Lengths



def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_path = ""  # a local file or directory (JSONL, JSONL.gz, parquet)
    c.eval_path = ""  # optional
    c.format = "auto"  # auto (detected from the fields) or one of FORMATS
    c.tokenizer = ""  # a local HF tokenizer directory
    c.max_length = 512
    c.max_prompt_length = 256
    c.truncation_mode = "auto"  # auto: keep_end for HH, keep_start otherwise (the authors' choice); skip: drop
    #                             examples whose prompt would have to be cut
    c.seq_buckets = ()  # sorted row lengths to pad to; empty: one length (see layout)
    # packed (default): several shared-prompt pairs per row (first-fit decreasing, attention kept inside each pair),
    # rows as long as the split's longest packed pair rounded up to 16 (or seq_buckets' one length), the row count
    # planned once for the run; shared_prompt: one row per pair, prompt + chosen + rejected, the prompt computed
    # once; pairs: a row per response (max_length long unless seq_buckets are given). All three compute the same
    # log-probs (tested); they differ in how many positions are padding.
    c.layout = "packed"
    c.max_pairs_per_row = 8  # packed: at most this many pairs share a row (static: per-pair arrays are rows x this)
    # token-budget batches (train.global_batch_tokens): a pair that fits no row of the open batch waits for the next
    # one while later pairs fill the gaps; the batch closes when this many wait (1: strictly in order). 16 fills
    # ~93 % of HH-shaped rows (1: ~83 %), a pair then at most a few batches late (docs/PERFORMANCE.md).
    c.pack_lookahead = 16
    c.on_bad_example = "skip"  # or "error"
    c.shp_min_score_ratio = 2.0
    c.shuffle = True
    c.prefetch = 2
    c.cache_dir = ""  # empty: default_cache_dir()
    return c


def resolve_format(config: ml_collections.ConfigDict) -> str:
    if config.format != "auto":
        if config.format not in FORMATS:
            raise ValueError(f"config.data.format = {config.format!r}; valid: auto, {', '.join(FORMATS)}")
        return config.format
    where, row = next(iter_rows(config.train_path))
    return detect_format(row, where)


def resolve_lengths(config: ml_collections.ConfigDict, data_format: str) -> Lengths:
    mode = config.truncation_mode
    if mode == "auto":
        mode = "keep_end" if data_format == "hh" else "keep_start"
    elif mode not in TRUNCATION_MODES:
        raise ValueError(f"config.data.truncation_mode = {mode!r}; valid: auto, {', '.join(TRUNCATION_MODES)}")
    return Lengths(config.max_length, config.max_prompt_length, mode)


def format_report(split: str, report: dict[str, Any]) -> str:
    """One line per split: kept examples, skipped by reason, adjustments."""
    def counts(d):
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    skipped = {**report["skipped_reading"], **report["skipped_tokenizing"]}
    return (f"{split}: {report['examples']} examples; skipped {sum(skipped.values())} ({counts(skipped)}); "
            f"adjusted: {counts(report['adjusted'])}")


def build_loaders(
    config: ml_collections.ConfigDict,
    *,
    global_batch_pairs: int,
    seed: int,
    data_parallel_size: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    train_state: LoaderState | None = None,
    tokenizer: Any = None,
    micro_batches: int = 1,
    steps: int = 0,
    global_batch_tokens: int = 0,
    exact_pairs: bool = False,
) -> dict[str, PreferenceLoader]:
    """{'train': loader (endless, resumable from `train_state`), 'eval': one pass (if eval_path is set)}.
    global_batch_tokens > 0: token-budget batches for both splits (packed layout; loader.py) — one row count, so
    one compiled shape serves training and evaluation. 0 with the packed layout: a budget derived from the train
    split's lengths (`packing.budget_rows`: on average `global_batch_pairs` pairs a step), unless `exact_pairs`
    (exactly `global_batch_pairs` pairs a step, rows planned for the fullest batch). The train loader records
    which in `budget` ("explicit", "derived" or "" for exact pairs)."""
    if not config.train_path:
        raise ValueError("config.data.train_path is empty: point it at a local data file or directory")
    layout = get_layout(config.layout, config.max_pairs_per_row)
    if config.pack_lookahead < 1:
        raise ValueError(f"config.data.pack_lookahead = {config.pack_lookahead}: must be >= 1 (1: strict order)")
    if layout.rows_per_pair == 0 and len(tuple(config.seq_buckets)) > 1:
        raise ValueError(f"config.data.layout = {config.layout!r} packs pairs into rows of one length, but "
                         f"config.data.seq_buckets = {tuple(config.seq_buckets)} gives several: give one length "
                         "(the row length) or use data.layout = 'shared_prompt' with buckets")
    data_format = resolve_format(config)
    lengths = resolve_lengths(config, data_format)
    if tokenizer is None:
        if not config.tokenizer:
            raise ValueError("config.data.tokenizer is empty: point it at a local HF tokenizer directory")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    splits = {"train": config.train_path, **({"eval": config.eval_path} if config.eval_path else {})}
    prepared = storage.prepare(splits, tokenizer, lengths, config.cache_dir or default_cache_dir(),
                               format=data_format, on_bad_example=config.on_bad_example,
                               shp_min_score_ratio=config.shp_min_score_ratio)
    for split, p in prepared.items():
        print(f"data {format_report(split, p.report)}", flush=True)
    common = dict(global_batch_pairs=global_batch_pairs, seed=seed, pad_id=tokenizer.pad_token_id or 0,
                  process_index=process_index, process_count=process_count, data_parallel_size=data_parallel_size,
                  prefetch=config.prefetch, layout=layout, global_batch_tokens=global_batch_tokens,
                  pack_lookahead=config.pack_lookahead,
                  # packed rows' scored tokens gathered per batch shard (StepConfig.score_groups); not with
                  # micro-batches, whose rows interleave
                  score_groups=data_parallel_size if micro_batches == 1 and data_parallel_size % process_count == 0
                  else 0,
                  rows_multiple=max(data_parallel_size * micro_batches // process_count, micro_batches))

    if global_batch_tokens and exact_pairs:
        raise ValueError(f"config.train.exact_pairs = True asks for {global_batch_pairs} pairs a step, but "
                         f"config.train.global_batch_tokens = {global_batch_tokens} asks for a token budget: set one")

    def seq_len_of(split: str) -> tuple[np.ndarray, Any]:
        lengths = layout.row_lengths(prepared[split])
        return lengths, tuple(config.seq_buckets) or layout.default_seq_len(lengths, config.max_length)

    budget = "explicit" if global_batch_tokens else ""
    if layout.rows_per_pair == 0 and not global_batch_tokens and not exact_pairs:
        lengths, seq_len = seq_len_of("train")
        row_len = seq_len if isinstance(seq_len, int) else seq_len[0]
        rows = budget_rows(lengths, row_len, layout.max_pairs_per_row, global_batch_pairs,
                           common["rows_multiple"] * process_count, config.pack_lookahead)
        common["global_batch_tokens"], budget = rows * row_len, "derived"

    def split_loader(split: str, **kwargs) -> PreferenceLoader:
        p = prepared[split]
        lengths, seq_len = seq_len_of(split)
        spans = layout.score_spans(p)
        return PreferenceLoader(p.source, lengths=lengths, seq_len=seq_len, score_window=rounded_max(spans),
                                score_spans=spans, **common, **kwargs)

    loaders = {"train": split_loader("train", shuffle=config.shuffle, state=train_state, plan_steps=steps)}
    loaders["train"].budget = budget
    if "eval" in prepared:
        loaders["eval"] = split_loader("eval", shuffle=False, num_epochs=1)
    if layout.rows_per_pair == 0:
        # No planned row may hold K pairs (at fixed lengths: one): a smaller K is the same batches with smaller
        # per-pair arrays, and K = 1 lets the step use a contiguous score window (the shared-prompt layout's cost).
        most = max(loader.pairs_per_row for loader in loaders.values())
        for loader in loaders.values():
            loader.use_pairs_per_row(most)
        # The reference pass reads the train split in file order (`one_pass`): batches the shuffled plan never saw,
        # whose fullest score group can hold more scored tokens. One step serves both, so the train loader's window
        # covers that pass too — else the pass would gather too few positions and drop scored tokens silently.
        train = loaders["train"]
        train.score_window = max(train.score_window, train.one_pass(prefetch=0).score_window)
    return loaders

