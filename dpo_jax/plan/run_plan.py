"""A train run (DPO and every registered mode, full fine-tuning or LoRA) planned on a TPU topology: what `train`
would build — model, mesh and rules, layout, batch shapes, optimizer, remat, micro-batches — built by the same
functions on abstract devices, with abstract parameters, then every jitted program the run executes compiled.

Shapes come from the config alone (no data read), at the most the config allows: rows of `data.seq_buckets`'
largest length, else `data.max_length` (pairs layout) or 2 x max_length rounded up to 16 (a prompt and two
responses: shared_prompt, packed); packed batches of one pair per row (or the token budget's rows); the whole row
scored. A run's real shapes are these or smaller.

Time estimates are plan/estimate.py's, from these compiled programs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax.compile_target import compiling_for
from dpo_jax.data.layout import get_layout
from dpo_jax.data.loader import host_batch
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.flops import train_step_flops
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import init_params
from dpo_jax.plan.chips import Chip, chip_of, collective_seconds, roofline_seconds
from dpo_jax.plan.programs import Compiled, compile_program, per_device_bytes
from dpo_jax.sharding import data_parallel_size, make_mesh
from dpo_jax.train.engine import Engine, build_engine
from dpo_jax.train.model_source import for_mode, model_loader, tokenizer_dir


class _NoTokenizer:
    """Stands in for a tokenizer where only a pad id is read (a reward model's head): ids do not change shapes."""

    pad_token_id, eos_token_id = 0, 0


def section_model(section: ml_collections.ConfigDict, data: ml_collections.ConfigDict
                  ) -> tuple[ModelConfig, ml_collections.ConfigDict]:
    """A model section's ModelConfig without reading weights: a preset's, an HF directory's config.json (a
    directory with only config.json will do), a dpo_jax checkpoint's config, or a random init's (vocabulary from the
    tokenizer); and the section as read (a preset's source is `random`)."""
    m = copy.deepcopy(section)
    if m.get("preset"):
        m.source = "random"
    vocab = len(load_tokenizer(data, tokenizer_dir(m))) if m.source == "random" and not m.get("preset") else 0
    return model_loader(m, vocab)[0], m


def planned_model(c: ml_collections.ConfigDict) -> ModelConfig:
    """The train run's ModelConfig (its mode's head) without reading weights (`section_model`)."""
    config, m = section_model(c.model, c.data)
    return for_mode(m, c.train.mode, config, lambda: None, _NoTokenizer())[0]


@dataclasses.dataclass(frozen=True)
class BatchShape:
    pairs: int  # example slots per step (packed: rows x max pairs per row)
    rows: int
    seq_len: int


def planned_shape(c: ml_collections.ConfigDict, dp: int) -> BatchShape:
    """The largest global batch the config allows (see the module docstring)."""
    layout = get_layout(c.data.layout, c.data.max_pairs_per_row)
    m = c.train.micro_batches
    buckets = tuple(c.data.seq_buckets)
    if buckets:
        seq_len = max(buckets)
    elif layout.rows_per_pair == 2:
        seq_len = c.data.max_length
    else:
        seq_len = -(-2 * c.data.max_length // 16) * 16
    if layout.rows_per_pair:
        pairs = c.train.global_batch_pairs
        rows = layout.rows(pairs)
    else:
        multiple = dp * m  # the loader's rows_multiple on one process
        rows = -(-c.train.global_batch_tokens // seq_len) if c.train.global_batch_tokens else c.train.global_batch_pairs
        rows = -(-rows // multiple) * multiple
        pairs = rows * layout.max_pairs_per_row
    return BatchShape(pairs, rows, seq_len)


def planned_batch(c: ml_collections.ConfigDict, shape: BatchShape) -> dict[str, np.ndarray]:
    """A host batch of the shape's fields, dtypes and sizes (all padding), from the loader's own batch builder."""
    layout = get_layout(c.data.layout, c.data.max_pairs_per_row)
    slots = [None] * (shape.pairs if layout.rows_per_pair else 0)
    return host_batch(layout, slots, shape.seq_len, 0, rows=shape.rows if not layout.rows_per_pair else None)


def planned_engine(c: ml_collections.ConfigDict, model: ModelConfig, mesh: jax.sharding.Mesh) -> Engine:
    """`build_engine` as `train` calls it, with an abstract state: nothing is allocated or loaded."""
    layout = get_layout(c.data.layout, c.data.max_pairs_per_row)
    return build_engine(c, model, lambda: init_params(model, jax.random.key(c.model.seed)), mesh=mesh,
                        layout=layout, abstract_state=True)


def programs_of(c: ml_collections.ConfigDict, engine: Engine, batch: dict[str, np.ndarray]) -> dict[str, tuple]:
    """{name: (jitted, abstract args)}: every program a `train` run executes with this config."""
    full = engine.abstract_batch(batch)
    out = {"train_step": (engine.train_step, (engine.state, full))}
    if c.data.eval_path:
        out["eval_step"] = (engine.eval_step, (engine.state.params, full))
    if engine.config.needs_reference and not engine.config.base_reference:
        rows = {k: full[k] for k in engine.config.layout.row_keys}
        out["reference_step"] = (engine.reference_step, (engine.state.params, rows))
    return out


def _resident_bytes(c: ml_collections.ConfigDict, engine: Engine) -> dict[str, int]:
    """Per program, what else the run holds on each device while it executes: the optimizer state (outside the
    train step) and a per-batch reference's resident weights."""
    params = per_device_bytes(engine.state.params)
    optimizer = per_device_bytes(engine.state) - params
    reference = params if c.dpo.reference == "per_batch" and engine.config.needs_reference else 0
    return {"train_step": reference, "eval_step": optimizer + reference, "reference_step": optimizer}


def _model_flops(model: ModelConfig, shape: BatchShape) -> dict[str, float]:
    """flops.py's FLOPs per step (all devices) of each program: the train step, forward-only passes a third."""
    train = train_step_flops(model, shape.rows, shape.seq_len)
    return {"train_step": train, "eval_step": train / 3, "reference_step": train / 3}


@dataclasses.dataclass
class ProgramPlan:
    name: str
    compiled: Compiled
    resident_bytes: int
    hbm_bytes: int
    model_flops: float  # per step, all devices (flops.py)
    estimated_flops: float = 0.0  # per step, all devices (the compiler's, counted past its loops: estimate.py)
    estimated_bytes: float = 0.0  # bytes accessed per step, all devices, likewise
    estimated_collective_bytes: float = 0.0  # bytes the collectives bring, per step, all devices, likewise
    collective_seconds: float = 0.0  # the roofline's collective term (chips.collective_seconds)
    estimated_step_seconds: float = 0.0
    tokens: int = 0
    estimate_method: str = ""  # "scanned" or "variants" (plan/estimate.py)

    @property
    def total_bytes(self) -> int:
        return self.compiled.peak_bytes + self.resident_bytes

    @property
    def fits(self) -> bool:
        return not self.compiled.error and self.total_bytes <= self.hbm_bytes

    def set_estimate(self, method: str, counts: tuple[float, float, float], devices: int, chip: Chip) -> None:
        """The estimate from the compiler's per-device counts per step (FLOPs, bytes accessed, collective bytes
        received), counted past its loops by `method` (plan/estimate.py)."""
        flops, bytes_accessed, collective_bytes = counts
        self.estimate_method = method
        self.estimated_flops, self.estimated_bytes = flops * devices, bytes_accessed * devices
        self.estimated_collective_bytes = collective_bytes * devices
        self.collective_seconds = collective_seconds(collective_bytes, chip)
        self.estimated_step_seconds = roofline_seconds(flops, bytes_accessed, self.model_flops / devices, chip,
                                                       collective_bytes)

    def to_json(self, devices: int, chip: Chip) -> dict[str, Any]:
        seconds = self.estimated_step_seconds
        compiled = dataclasses.asdict(self.compiled)
        return {
            "fits": self.fits, "hbm_bytes": self.hbm_bytes, "resident_bytes": self.resident_bytes,
            "total_bytes": self.total_bytes, **compiled,
            "model_flops": self.model_flops, "estimated_flops": self.estimated_flops,
            "estimated_bytes": self.estimated_bytes, "estimated_collective_bytes": self.estimated_collective_bytes,
            "estimated_collective_seconds": self.collective_seconds,
            "estimated_step_seconds": seconds, "estimate_method": self.estimate_method,
            "tokens_per_second": self.tokens / seconds if seconds else 0.0,
            "estimated_mfu": self.model_flops / (seconds * devices * chip.peak_tflops * 1e12) if seconds else 0.0,
        }


def compile_programs(c: ml_collections.ConfigDict, devices: list[Any]) -> tuple[dict[str, ProgramPlan], dict[str, Any]]:
    """Every program of the run compiled on `devices` (abstract TPU devices, or real ones): memory and the
    compiler's counts, no time estimate yet (plan/estimate.py). Returns (plans, the run's shapes)."""
    chip = chip_of(devices[0])
    model = planned_model(c)
    mesh = make_mesh(c.mesh, devices)
    dp = data_parallel_size(mesh, c.mesh.rules)
    shape = planned_shape(c, dp)
    with compiling_for("tpu"):
        engine = planned_engine(c, model, mesh)
    programs = programs_of(c, engine, planned_batch(c, shape))
    resident = _resident_bytes(c, engine)
    model_flops = _model_flops(model, shape)
    plans = {}
    for name, (jitted, args) in programs.items():
        with compiling_for("tpu"):
            compiled = compile_program(jitted.lower, *args)
        plans[name] = ProgramPlan(name, compiled, resident[name], chip.hbm_bytes, model_flops[name],
                                  tokens=shape.rows * shape.seq_len)
    info = {"devices": len(devices), "chip": chip.name, "device_kind": devices[0].device_kind,
            "hbm_bytes": chip.hbm_bytes, "peak_tflops_per_device": chip.peak_tflops,
            "mesh": dict(mesh.shape), "model": {"family": model.family, "layers": model.num_layers,
                                                "hidden_size": model.hidden_size, "vocab_size": model.vocab_size,
                                                "parameters": parameter_count(engine),
                                                "lora_rank": model.lora_rank, "dtype": model.dtype,
                                                "param_dtype": model.param_dtype,
                                                "remat_policy": model.remat_policy},
            "batch": dataclasses.asdict(shape), "micro_batches": c.train.micro_batches,
            "layout": c.data.layout, "mode": c.train.mode}
    return plans, info


def parameter_count(engine: Engine) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(engine.state.params)))
