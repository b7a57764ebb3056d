"""A train run's step time, estimated from the TPU compiler's own counts — never measured.

The roofline of the compiler's counts: its FLOPs (at least flops.py's) at the bf16 peak, its bytes accessed at
the HBM bandwidth, or the bytes its collectives bring each chip at the ICI bandwidth, whichever is longest
(chips.roofline_seconds). The compiler counts a loop body once, and a step has up to three loops: the scanned layers, the log-prob chunks, the micro-batches. So:

- **scanned** (the default for a scanned model with an even layer count): the program itself, F1; the same
  program with its layer scan unrolled by 2 (two layers per loop body), F2; and, when a row has several log-prob
  chunks, the program with chunks twice as long, FW. A step is m·[F1 + (L − 1)·(F2 − F1) + (K − 1)·(FW − F1)] for
  the train step (m micro-batches: its loop body is one; the optimizer update is then counted m times, a small
  overcount) and the same with m = 1 for the forward-only passes.
- **variants** (unscanned models, odd layer counts, when an unrolled copy does not fit, or when the scanned
  count fails the check against flops.py, `beyond_flops_check`): small unscanned
  variants — (1 layer, C), (2 layers, C), (1 layer, 2C) — of one micro-batch, halved until they fit, extrapolated
  alike. The compiler may partition such a small model differently from the run's.

Every program compiled for its counts has the TPU compiler's windowed matmul loops turned off
(`programs.COUNTING_OPTIONS`): they are loops too, counted once per matmul, and on a pod mesh they are everywhere.

The check exists because of one case: Llama-3-8B on two v5p-64 slices (data-parallel over DCN, FSDP within) counted
2.14x flops.py's train-step FLOPs the scanned way — the copy with two layers per loop body counted each layer's
backward twice (1.22e13 FLOPs per layer and chip against 0.80e13 expected with full remat), while its forward pass
and the unscanned variants both came out as expected (1.00x, 1.27x). A copy compiled to be counted is partitioned
by the compiler on its own, and it need not match the run's program; the check against an independent count is
what catches that.

The compiler's `optimal_seconds` is reported per program but not used: in the libtpu tested it is negative for
1B-parameter programs.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from dpo_jax.compile_target import compiling_for
from dpo_jax.models.config import ModelConfig
from dpo_jax.plan.chips import chip_of
from dpo_jax.plan.programs import CountingOutOfMemory, loop_free_cost
from dpo_jax.data.layout import get_layout
from dpo_jax.plan.run_plan import ProgramPlan, compile_programs, planned_batch, planned_engine, planned_model, \
    planned_shape, programs_of
from dpo_jax.train.engine import check_batch_layout
from dpo_jax.sharding import data_parallel_size, make_mesh

Counts = dict[str, tuple[float, float, float]]  # program -> (FLOPs, bytes accessed, collective bytes) per device


def plan_programs(c: ml_collections.ConfigDict, devices: list[Any], with_estimate: bool = True
                  ) -> tuple[dict[str, ProgramPlan], dict[str, Any]]:
    """Every program of the run compiled on `devices`, with the time estimate unless with_estimate is False
    (`--fit`'s memory probes: `add_estimate` later, for the candidates that fit)."""
    plans, info = compile_programs(c, devices)
    if with_estimate:
        add_estimate(plans, c, devices)
    return plans, info


def add_estimate(plans: dict[str, ProgramPlan], c: ml_collections.ConfigDict, devices: list[Any]) -> None:
    """Fills the plans' estimates when every program compiled (the module docstring)."""
    if any(p.compiled.error for p in plans.values()):
        return
    mesh = make_mesh(c.mesh, devices)
    chip = chip_of(devices[0])
    model = planned_model(c)
    dp = data_parallel_size(mesh, c.mesh.rules)
    method = "scanned" if model.scan_layers and model.num_layers % 2 == 0 else "variants"
    if method == "scanned":
        try:
            totals = scanned_estimate(c, model, mesh, dp)
            if beyond_flops_check(totals, plans, len(devices)) or negative_counts(totals):
                method = "variants"  # a copy was partitioned otherwise than the program (module docstring)
        except CountingOutOfMemory:  # two layers unrolled keep more alive: fall back
            method = "variants"
    if method == "variants":
        totals = variant_estimate(c, model, mesh, dp)
    for name, counts in totals.items():
        plans[name].set_estimate(method, counts, len(devices), chip)


# The compiler's FLOPs over flops.py's that a program may show: remat recomputes the forward (4/3 with full remat)
# and the attention kernel's backward recomputes its scores (1.46 measured at 32k tokens); forward-only passes ~1.
FLOPS_CHECK = {"train_step": (0.8, 1.6)}
FORWARD_FLOPS_CHECK = (0.8, 1.25)


def negative_counts(totals: Counts) -> list[str]:
    """The programs whose extrapolated FLOPs, bytes or collective bytes came out below 0: a copy counted less than
    the program itself (seen for collective bytes: Mistral-7B LoRA at 8k on a v6e-8, -0.68 s)."""
    return [name for name, counts in totals.items() if min(counts) < 0]


def beyond_flops_check(totals: Counts, plans: dict[str, ProgramPlan], devices: int) -> list[str]:
    """The programs whose counted FLOPs fall outside FLOPS_CHECK against flops.py's (`name: ratio`)."""
    out = []
    for name, (flops, _, _) in totals.items():
        ours = plans[name].model_flops / devices
        low, high = FLOPS_CHECK.get(name, FORWARD_FLOPS_CHECK)
        if ours and not low <= flops / ours <= high:
            out.append(f"{name}: {flops / ours:.2f}")
    return out


def _chunking(c: ml_collections.ConfigDict, dp: int) -> tuple[int, int]:
    """(C, K): log-prob chunk length and chunks per row."""
    seq_len = planned_shape(c, dp).seq_len
    chunk = min(c.train.logprob_chunk_size, seq_len)
    return chunk, -(-seq_len // chunk)


def _counts(c: ml_collections.ConfigDict, model: ModelConfig, mesh, dp: int) -> Counts:
    with compiling_for("tpu"):
        engine = planned_engine(c, model, mesh)
        batch = planned_batch(c, planned_shape(c, dp))
        return {name: loop_free_cost(jitted.lower, *args)
                for name, (jitted, args) in programs_of(c, engine, batch).items()}


def scanned_estimate(c: ml_collections.ConfigDict, model: ModelConfig, mesh, dp: int) -> Counts:
    """{program: (FLOPs, bytes, collective bytes)} per device and step from the scanned program and its unrolled /
    wide-chunk copies (the module docstring). CountingOutOfMemory when one does not fit."""
    chunk, chunks = _chunking(c, dp)
    program_counts = _counts(c, model, mesh, dp)
    unrolled = _counts(c, model.replace(scan_unroll=2), mesh, dp)
    wide = None
    if chunks > 1:
        wide_config = copy.deepcopy(c)
        wide_config.train.logprob_chunk_size = 2 * chunk
        wide = _counts(wide_config, model, mesh, dp)

    def total(name: str, i: int) -> float:
        base = program_counts[name][i]
        per_layer = unrolled[name][i] - base
        per_chunk = wide[name][i] - base if wide is not None else 0.0
        loops = c.train.micro_batches if name == "train_step" else 1
        return loops * (base + (model.num_layers - 1) * per_layer + (chunks - 1) * per_chunk)

    return {name: tuple(total(name, i) for i in range(3)) for name in program_counts}


def _variant(c: ml_collections.ConfigDict, chunk: int, parts: int) -> ml_collections.ConfigDict:
    """The config of 1/parts of the batch run as a whole batch, its log-prob chunks `chunk` long."""
    variant = copy.deepcopy(c)
    variant.train.micro_batches = 1
    variant.train.global_batch_pairs = c.train.global_batch_pairs // parts
    variant.train.global_batch_tokens = c.train.global_batch_tokens // parts
    variant.train.logprob_chunk_size = chunk
    if variant.train.global_batch_pairs * parts != c.train.global_batch_pairs or not variant.train.global_batch_pairs:
        raise ValueError(f"the batch of {c.train.global_batch_pairs} pairs does not split into {parts} parts")
    return variant


def variant_estimate(c: ml_collections.ConfigDict, model: ModelConfig, mesh, dp: int) -> Counts:
    """{program: (FLOPs, bytes, collective bytes)} per device and step from unscanned variants of one micro-batch — or of a smaller
    part of the batch, halved until a variant fits the chip."""
    chunk, chunks = _chunking(c, dp)
    parts = c.train.micro_batches
    while True:  # unscanned layers keep more alive than the scanned run: a variant may need a smaller batch
        try:
            costs = {(layers, size): _counts(_variant(c, size, parts), model.replace(num_layers=layers,
                                                                                   scan_layers=False), mesh, dp)
                     for layers, size in ((1, chunk), (2, chunk)) + (((1, 2 * chunk),) if chunks > 1 else ())}
            break
        except CountingOutOfMemory as e:
            try:  # half as much again must still split over the data-parallel devices (the engine's check)
                check_batch_layout(_variant(c, chunk, 2 * parts), mesh,
                                   get_layout(c.data.layout, c.data.max_pairs_per_row).rows_per_pair)
            except ValueError:
                raise RuntimeError(f"no estimate: even the smallest batch variant does not fit ({e})") from None
            parts *= 2

    def total(name: str, i: int) -> float:
        base = costs[1, chunk][name][i]
        per_layer = costs[2, chunk][name][i] - base
        per_chunk = costs[1, 2 * chunk][name][i] - base if chunks > 1 else 0.0
        return parts * (base + (model.num_layers - 1) * per_layer + (chunks - 1) * per_chunk)

    return {name: tuple(total(name, i) for i in range(3)) for name in costs[1, chunk]}
