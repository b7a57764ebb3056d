"""The pure train and eval steps, jitted over a device mesh with explicit shardings and a donated state.

The batch is global arrays in a layout (dpo_jax/layout.py: a row per response, or one packed row per pair) plus
`example_mask` [B] (0 = padding example) and, for DPO with a reference, `ref_chosen_logps`/`ref_rejected_logps`
[B]; the layout turns rows into the two responses of every pair, and everything after `pair_logprobs` is
layout-independent.

Gradient accumulation scans over M micro-batches (the layout's split moves no data). Losses are sums over examples
(tokens for SFT) divided by the count over the whole global batch, so M micro-batches give exactly the gradient of
one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import losses
from dpo_jax.layout import PAIRS, Layout
from dpo_jax.logprobs import SequenceLogProbs, sequence_logprobs
from dpo_jax.models.config import ModelConfig
from dpo_jax.models import lora
from dpo_jax.models.decoder import Decoder, unembedding
from dpo_jax.rlhf import reward_model
from dpo_jax.sharding import batch_sharding
from dpo_jax.summaries import Mean
from dpo_jax.train.state import TrainState

MODES = ("dpo", "sft", "unlikelihood", "reward")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the step (hashable)."""

    model: ModelConfig
    mode: str = "dpo"  # dpo (any preference loss), sft (Preferred-FT: NLL of chosen), unlikelihood, reward (BT)
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    loss_kwargs: tuple[tuple[str, Any], ...] = ()
    unlikelihood_alpha: float = 1.0
    center_rewards_coefficient: float = 0.0  # reward mode: TRL's c·(r_c + r_r)² term
    micro_batches: int = 1
    num_blocks: int = 1  # host blocks in the global batch (= process count)
    chunk_size: int = 128
    layout: Layout = PAIRS  # how pairs are rows (dpo_jax/layout.py)
    # > 0: every row's scored tokens lie within this many positions (logprobs.py `window`); packed layout: every
    # row — or with score_groups, every group — has at most this many scored tokens (logprobs.py `positions`)
    score_window: int = 0
    # packed layout, > 0: the rows form this many groups of consecutive rows (the batch shards), each gathered as
    # one sequence (logprobs.py `rows_per_gather`); 0: each row alone. Planned by the loader with the window.
    score_groups: int = 0
    base_reference: bool = False  # LoRA: the reference is the same base with the adapters off, in the step
    seed: int = 0  # LoRA dropout: micro-batch m of step s drops with key fold_in(fold_in(key(seed), s), m)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"config.train.mode = {self.mode!r}; valid: {', '.join(MODES)}")
        if (self.mode == "reward") != (self.model.head == "score"):
            needs = "reward model (score head)" if self.mode == "reward" else "policy (language-model head)"
            raise ValueError(f"config.train.mode = {self.mode!r} needs a {needs}, but the model has a "
                             f"{self.model.head!r} head")
        if self.mode == "dpo":
            losses.validate_loss_args(self.loss_type, self.beta, self.label_smoothing, **dict(self.loss_kwargs))
        if self.score_groups and self.micro_batches > 1:
            raise ValueError("score_groups gathers whole-batch row groups; with micro-batches each row is its own")
        if self.base_reference and not self.model.lora_rank:
            raise ValueError("config.dpo.reference = 'base' is the base model with the LoRA adapters off; it needs "
                             "config.model.lora.rank > 0")

    @property
    def needs_reference(self) -> bool:
        return self.mode == "dpo" and not self.reference_free and not losses.ignores_reference(self.loss_type)

    def batch_keys(self) -> dict[str, int]:
        """Batch fields the step takes, with their ranks."""
        keys = {k: 2 for k in self.layout.row_keys} | {"example_mask": 1}
        if self.needs_reference and not self.base_reference:
            keys |= {"ref_chosen_logps": 1, "ref_rejected_logps": 1}
        if self.mode == "reward":
            keys["margin"] = 1
        return keys


def dropout_rngs(rng: jax.Array | None) -> dict[str, jax.Array] | None:
    """The `rngs` of a training forward pass: a dropout key turns on the LoRA adapters' dropout."""
    return None if rng is None else {"dropout": rng}


def policy_logprobs(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                    ) -> SequenceLogProbs:
    """Forward over all rows, then chunked float32 log-probs of the scored tokens."""
    hidden = Decoder(c.model).apply({"params": params}, batch["input_ids"], **c.layout.decoder_inputs(batch),
                                    rngs=dropout_rngs(rng))
    kernel, bias = unembedding(params, c.model)
    return sequence_logprobs(hidden, kernel, batch["input_ids"], batch["loss_mask"], bias=bias,
                             chunk_size=c.chunk_size, predecessor=c.layout.predecessor(batch),
                             **score_window(batch, c))


def score_window(batch: dict[str, jax.Array], c: StepConfig) -> dict[str, Any]:
    """Where the unembedding runs (sequence_logprobs' `window` or `positions`), {} for every position."""
    rows, t = batch["input_ids"].shape
    if c.layout.rows_per_pair == 0 and c.layout.max_pairs_per_row > 1:  # several pairs' scored tokens, gathered
        if c.score_groups and rows % c.score_groups:
            raise ValueError(f"{rows} packed rows do not split into {c.score_groups} score groups")
        g = rows // c.score_groups if c.score_groups else 1
        if not c.score_window or c.score_window >= g * t:
            return {}
        scored = c.layout.scored(batch).reshape(rows // g, g * t)
        first = jnp.argsort(jnp.logical_not(scored), axis=1, stable=True)[:, :c.score_window].astype(jnp.int32)
        return {"positions": jnp.where(jnp.take_along_axis(scored, first, axis=1), first, -1),
                "rows_per_gather": g}
    if not c.score_window or c.score_window >= t:
        return {}
    return {"window": (jnp.argmax(c.layout.scored(batch), axis=1).astype(jnp.int32), c.score_window)}


class PairLogProbs(NamedTuple):
    """Per pair: log π(y|x) sums and scored-token counts [B], masked token log-probs and scored masks [B, T]
    (counts are the masks' sums: one rule for which tokens are scored)."""

    chosen_sums: jax.Array
    rejected_sums: jax.Array
    chosen_counts: jax.Array
    rejected_counts: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array


def response_masks(batch: dict[str, jax.Array], c: StepConfig) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scored-token masks [B, T], float32, in pair order."""
    return c.layout.responses(c.layout.scored(batch).astype(jnp.float32), batch, c.num_blocks)


def pair_logprobs(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                  ) -> PairLogProbs:
    """The policy's log-probs of both responses of every pair, whatever the batch layout."""
    lp = policy_logprobs(params, batch, c, rng)
    mask_c, mask_r = response_masks(batch, c)
    tc, tr = c.layout.responses(lp.token_logps, batch, c.num_blocks)
    return PairLogProbs(jnp.sum(tc, -1), jnp.sum(tr, -1), jnp.sum(mask_c, -1), jnp.sum(mask_r, -1), tc, tr,
                        mask_c, mask_r)


def loss_denominator(batch: dict[str, jax.Array], c: StepConfig) -> jax.Array:
    """What the summed loss is divided by: real examples (DPO, unlikelihood) or real chosen tokens (SFT)."""
    if c.mode == "sft":
        chosen_mask, _ = response_masks(batch, c)
        return jnp.maximum(jnp.sum(chosen_mask * batch["example_mask"][:, None]), 1.0)
    return jnp.maximum(jnp.sum(batch["example_mask"]).astype(jnp.float32), 1.0)


def loss_sum_and_metrics(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                         ) -> tuple[jax.Array, dict]:
    """Σ of per-example (SFT: per-token) losses over real examples, and metric sums. Pure (`rng`: dropout)."""
    if c.mode == "reward":
        return _reward_loss_sum(params, batch, c, rng)
    lp = pair_logprobs(params, batch, c, rng)
    pc, pr = lp.chosen_sums, lp.rejected_sums
    mask = batch["example_mask"].astype(jnp.float32)
    if c.mode == "dpo":
        ref_c = batch.get("ref_chosen_logps")
        ref_r = batch.get("ref_rejected_logps")
        if c.base_reference and c.needs_reference:  # adapters off: the frozen base, no second copy of the weights
            ref = pair_logprobs(jax.lax.stop_gradient(lora.base_params(params)), batch,
                                dataclasses.replace(c, model=lora.base_config(c.model), base_reference=False))
            ref_c, ref_r = jax.lax.stop_gradient(ref.chosen_sums), jax.lax.stop_gradient(ref.rejected_sums)
        lc, lr = lp.chosen_counts, lp.rejected_counts
        per_example, cr, rr = losses.preference_loss(
            pc, pr, ref_c, ref_r, loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing,
            reference_free=c.reference_free, chosen_lengths=lc, rejected_lengths=lr, example_mask=mask,
            **dict(c.loss_kwargs))
        return jnp.sum(per_example * mask), losses.preference_metrics(per_example, cr, rr, pc, pr, mask)
    tok_c, tok_r = lp.chosen_tokens, lp.rejected_tokens
    mask_c, mask_r = lp.chosen_mask, lp.rejected_mask
    mask_c = mask_c * mask[:, None]
    metrics = {"logps/chosen": Mean.of(jax.lax.stop_gradient(pc), mask),
               "logps/rejected": Mean.of(jax.lax.stop_gradient(pr), mask)}
    if c.mode == "sft":
        nll, count = losses.nll_loss(tok_c, mask_c)
        total = jnp.sum(nll)
        metrics["loss"] = Mean(jax.lax.stop_gradient(total), jnp.sum(count))
        return total, metrics
    per_example = losses.unlikelihood_loss(tok_c, mask_c, tok_r, mask_r * mask[:, None],
                                           alpha=c.unlikelihood_alpha)
    total = jnp.sum(per_example * mask)
    metrics["loss"] = Mean.of(jax.lax.stop_gradient(per_example), mask)
    return total, metrics


def _reward_loss_sum(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None
                     ) -> tuple[jax.Array, dict]:
    rc, rr = reward_model.pair_rewards(params, batch, c.model, c.layout, c.num_blocks, dropout_rngs(rng))
    mask = batch["example_mask"].astype(jnp.float32)
    per_example, _ = losses.bradley_terry_loss(rc, rr, batch["margin"], c.center_rewards_coefficient)
    return jnp.sum(per_example * mask), reward_model.reward_metrics(per_example, rc, rr, mask)


def _accumulate(params: Any, batch: dict[str, jax.Array], c: StepConfig, with_grad: bool,
                constrain: Callable[[Any], Any], rng: jax.Array | None = None):
    """(gradients of the trained parameters — the adapters of a LoRA model, else all —, metric sums). `rng`: the
    step's dropout key (micro-batch m uses fold_in(rng, m)), None for no dropout."""
    denom = loss_denominator(batch, c)
    frozen, trained = lora.trainable(params, c.model)

    def one(mb, m):
        key = None if rng is None else jax.random.fold_in(rng, m)
        if not with_grad:
            return None, loss_sum_and_metrics(params, mb, c)[1]
        (_, metrics), grads = jax.value_and_grad(
            lambda t: (lambda total, sums: (total / denom, sums))(*loss_sum_and_metrics(
                lora.combine(frozen, t, c.model), mb, c, key)), has_aux=True)(trained)
        return grads, metrics

    if c.micro_batches == 1:
        return one(batch, 0)
    micro = constrain(c.layout.micro_batches(batch, c.micro_batches, c.num_blocks))
    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), 0)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, one(*xs)), None

    (grads, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(c.micro_batches)))
    return grads, metrics


def make_steps(
    c: StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    rules: Any,
    state_shardings: TrainState,
) -> tuple[Callable, Callable]:
    """(train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> metrics), both jitted once."""
    batch_shardings = {k: batch_sharding(mesh, rules, n) for k, n in c.batch_keys().items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_axes = batch_sharding(mesh, rules).spec[0]

    def constrain(micro):  # keep each micro-batch sharded over the batch axes
        return {k: jax.lax.with_sharding_constraint(
            v, NamedSharding(mesh, PartitionSpec(None, batch_axes, *([None] * (v.ndim - 2))))) for k, v in
            micro.items()}

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(c.seed), state.step) if c.model.lora_dropout else None
        grads, metrics = _accumulate(state.params, batch, c, True, constrain, rng)
        frozen, trained = lora.trainable(state.params, c.model)  # LoRA: the base never reaches the optimizer
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        params = lora.combine(frozen, optax.apply_updates(trained, updates), c.model)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["grad_norm"] = Mean(optax.tree.norm(grads), one)
        metrics["learning_rate"] = Mean(jnp.asarray(schedule(state.step), jnp.float32), one)
        metrics["num_tokens"] = Mean(jnp.sum(batch["attention_mask"]).astype(jnp.float32), one)
        metrics["num_pairs"] = Mean(jnp.sum(batch["example_mask"]).astype(jnp.float32), one)  # varies: token budget
        return TrainState(state.step + 1, params, opt_state), metrics

    def eval_step(params, batch):
        return _accumulate(params, batch, c, False, constrain)[1]

    train = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings), out_shardings=replicated)
    return train, evaluate


def make_reference_step(c: StepConfig, mesh: Mesh, rules: Any, param_shardings: Any) -> Callable:
    """Jitted reference forward (never under grad): batch -> (chosen sums, rejected sums, chosen counts,
    rejected counts), each [B] float32 in block order."""
    shardings = {k: batch_sharding(mesh, rules, 2) for k in c.layout.row_keys}
    replicated = NamedSharding(mesh, PartitionSpec())

    def reference(params, batch):
        lp = pair_logprobs(params, batch, c)
        return lp.chosen_sums, lp.rejected_sums, lp.chosen_counts, lp.rejected_counts

    jitted = jax.jit(reference, in_shardings=(param_shardings, shardings), out_shardings=replicated)
    return lambda params, batch: jitted(params, {k: batch[k] for k in c.layout.row_keys})
