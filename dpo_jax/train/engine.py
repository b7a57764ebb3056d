"""Assembles the engine from config: mesh, shardings, the sharded train state, and the jitted steps."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from dpo_jax import sharding
from dpo_jax.data.layout import PAIRS, Layout
from dpo_jax.flops import train_step_flops
from dpo_jax.models import lora
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import logical_axes
from dpo_jax.models.reward import make_scorer
from dpo_jax.train.state import TrainState, create_state, default_optimizer_config, make_optimizer
from dpo_jax.train.step import StepConfig, make_reference_step, make_steps

REFERENCE_MODES = ("precompute", "per_batch", "base")


def default_train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "dpo"  # dpo | sft (Preferred-FT) | unlikelihood | reward (a Bradley-Terry reward model)
    c.global_batch_pairs = 64  # pairs per optimizer step (the paper: 64)
    # Packed layout only. > 0: each step is ceil(this / row length) packed rows filled with pairs in the epoch's
    # order, give or take data.pack_lookahead; the pairs per step vary, losses and metrics average over the real
    # ones. 0 (default): such a budget derived from the train split's lengths so that a step carries
    # global_batch_pairs pairs on average (data/packing.py budget_rows; 26-44 % less time end to end than exact
    # pairs on the bench's HH-shaped data, docs/PERFORMANCE.md).
    c.global_batch_tokens = 0
    c.exact_pairs = False  # True: exactly global_batch_pairs a step, rows planned for the fullest batch (the paper's)
    c.micro_batches = 1  # gradient accumulation: global batch = micro_batches x micro-batch
    c.seed = 0
    c.logprob_chunk_size = 128
    return c


def default_dpo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loss_type = "sigmoid"
    c.beta = 0.1
    c.label_smoothing = 0.0
    c.reference_free = False
    c.loss_kwargs = ml_collections.ConfigDict()  # e.g. tau for discopop, gamma for simpo
    # precompute: one cached pass, no reference on device during training; per_batch: a resident copy run on each
    # batch; base (LoRA): the same base weights with the adapters off, run inside each step — no copy, no tables
    c.reference = "precompute"
    # TR-DPO: every N > 0 steps π_ref <- alpha * π + (1 - alpha) * π_ref (alpha = 1: a hard copy); needs per_batch
    c.ref_sync_every = 0
    c.ref_sync_alpha = 1.0
    c.unlikelihood_alpha = 1.0
    return c


def default_reward_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.center_rewards_coefficient = 0.0  # TRL's c·mean((r_c + r_r)²): pulls the rewards toward zero mean
    return c


def default_engine_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mesh = sharding.default_mesh_config()
    c.train = default_train_config()
    c.dpo = default_dpo_config()
    c.reward = default_reward_config()
    c.optimizer = default_optimizer_config()
    return c


def step_config(c: ml_collections.ConfigDict, model: ModelConfig, layout: Layout = PAIRS,
                score_window: int = 0, score_groups: int = 0) -> StepConfig:
    if c.dpo.reference not in REFERENCE_MODES:
        raise ValueError(f"config.dpo.reference = {c.dpo.reference!r}; valid: {', '.join(REFERENCE_MODES)}")
    return StepConfig(
        model=model, mode=c.train.mode, loss_type=c.dpo.loss_type, beta=c.dpo.beta,
        label_smoothing=c.dpo.label_smoothing, reference_free=c.dpo.reference_free,
        loss_kwargs=tuple(sorted(c.dpo.loss_kwargs.to_dict().items())), unlikelihood_alpha=c.dpo.unlikelihood_alpha,
        center_rewards_coefficient=c.reward.center_rewards_coefficient, micro_batches=c.train.micro_batches,
        num_blocks=jax.process_count(), chunk_size=c.train.logprob_chunk_size,
        layout=layout, score_window=score_window, score_groups=score_groups,
        base_reference=c.dpo.reference == "base", seed=c.train.seed)


class Engine(NamedTuple):
    """The DPO-family engine (every registered mode): the sharded state and its jitted steps. Implements the
    Trainer's engine protocol (train/trainer.py `TrainEngine`)."""

    config: StepConfig
    mesh: jax.sharding.Mesh
    rules: Any
    param_shardings: Any
    state_shardings: TrainState
    state: TrainState
    train_step: Callable
    eval_step: Callable
    reference_step: Callable
    schedule: optax.Schedule
    score: Callable | None  # a reward model's scoring pass (models/reward.py make_scorer); None for a policy

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def kind(self) -> str:
        """What its checkpoints record: the mode (a checkpoint of another mode is refused on resume)."""
        return self.config.mode

    def abstract_batch(self, local: dict) -> dict:
        """Stand-ins for the step's batch of this host batch's shapes (reference fields added when the step reads
        them): what compiling ahead needs. Nothing is placed on a device."""
        if self.config.needs_reference and not self.config.base_reference:
            zeros = np.zeros(len(local["example_id"]), np.float32)
            local = {**local, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        keys = self.config.batch_keys()
        return sharding.abstract_global_batch({k: v for k, v in local.items() if k in keys}, self.mesh, self.rules)

    def shard_batch(self, local: dict) -> dict:
        """Host-local numpy batch -> global sharded arrays, keeping only the fields the step takes."""
        keys = self.config.batch_keys()
        return sharding.global_batch({k: v for k, v in local.items() if k in keys}, self.mesh, self.rules)

    def step_flops(self, local: dict) -> float:
        """Model FLOPs of one train step on this host batch (all hosts; padding included: it is computed)."""
        rows = local["input_ids"].shape[0] * jax.process_count()
        c = self.config
        scored = c.score_window * c.score_groups // rows if c.score_groups else c.score_window  # per row
        return train_step_flops(c.model, rows, local["input_ids"].shape[1], scored)

    def reference_logps(self, params: Any, local: dict) -> tuple[jax.Array, ...]:
        """A host-local batch's (chosen sums, rejected sums, chosen counts, rejected counts) under `params`, each
        [global B] in block order: the reference pass."""
        rows = {k: local[k] for k in self.config.layout.row_keys}
        return self.reference_step(params, sharding.global_batch(rows, self.mesh, self.rules))


def check_batch_layout(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rows_per_pair: int) -> None:
    """The global batch must split into data-parallel shards, hosts and micro-batches evenly: its pairs, not
    just its rows."""
    b, m = c.train.global_batch_pairs, c.train.micro_batches
    dp = sharding.data_parallel_size(mesh, c.mesh.rules)
    if rows_per_pair == 0:  # packed rows: the loader plans a row count that divides (loader.rows_multiple)
        return
    if b % dp:  # per-pair fields (example ids, masks, margins, reference log-probs) shard over it like rows
        raise ValueError(f"config.train.global_batch_pairs = {b} does not divide over the data-parallel size {dp} "
                         f"(mesh data x fsdp; each pair's fields are sharded like its rows); use a multiple of {dp} "
                         "pairs, or a larger config.mesh.tensor")
    per_host = b // jax.process_count()
    if b % jax.process_count() or per_host % m:
        raise ValueError(f"config.train.global_batch_pairs = {b} must divide by processes ({jax.process_count()}) "
                         f"x micro_batches ({m})")
    if (b // m) % dp:
        raise ValueError(f"each micro-batch has {b // m} pairs, not divisible by the data-parallel size {dp}; "
                         "lower config.train.micro_batches or the mesh's data x fsdp")


def build_engine(
    c: ml_collections.ConfigDict,
    model: ModelConfig,
    init_params: Callable[..., Any],
    *init_args: Any,
    devices: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    layout: Layout = PAIRS,
    score_window: int = 0,
    score_groups: int = 0,
    abstract_state: bool = False,
) -> Engine:
    """Mesh -> shardings (checked before compiling) -> state created sharded -> jitted steps.
    abstract_state: the state as shape/dtype/sharding stand-ins, nothing allocated or loaded (`dpo-jax plan`: the
    devices may be a TPU topology's abstract ones).
    mesh: an already built mesh (else one from config.mesh over `devices`, default all).
    layout, score_window and score_groups: see StepConfig (from the loaders: the data's layout and longest scored
    span)."""
    mesh = mesh if mesh is not None else sharding.make_mesh(c.mesh, devices)
    sc = step_config(c, model, layout, score_window, score_groups)
    check_batch_layout(c, mesh, layout.rows_per_pair)
    rules = c.mesh.rules
    optimizer, schedule = make_optimizer(c.optimizer)
    abstract_params = jax.eval_shape(init_params, *init_args)
    p_shardings = sharding.param_shardings(logical_axes(model), abstract_params, mesh, rules)
    shardings_for = lambda abstract: sharding.state_shardings(abstract, p_shardings, abstract_params,  # noqa
                                                              mesh)
    state = create_state(init_params, optimizer, shardings_for, *init_args,
                         trained=lambda params: lora.trainable(params, model)[1], abstract=abstract_state)
    s_shardings = jax.tree.map(lambda x: x.sharding, state)  # born with (or, abstract, given) its shardings
    train_step, eval_step = make_steps(sc, optimizer, schedule, mesh, rules, s_shardings)
    reference_step = make_reference_step(sc, mesh, rules, p_shardings)
    score = make_scorer(model, mesh, rules, p_shardings) if model.head == "score" else None
    return Engine(sc, mesh, rules, p_shardings, s_shardings, state, train_step, eval_step, reference_step, schedule,
                  score)
