"""The pure train and eval steps, jitted over a device mesh with explicit shardings and a donated state.

The batch is global arrays in a layout (data/layout.py) plus `example_mask` [B] (0 = padding example), the
mode's own fields and, when the mode reads a reference, `ref_chosen_logps`/`ref_rejected_logps` [B]. What the step
computes is the mode's (train/modes.py) on the forward passes of train/forward.py; nothing here branches on the
mode or the layout.

Gradient accumulation scans over M micro-batches (the layout's split moves no data). Losses are sums over examples
(tokens for SFT) divided by the count over the whole global batch, so M micro-batches give exactly the gradient of
one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.models import lora
from dpo_jax.sharding import batch_sharding, on_mesh
from dpo_jax.summaries import Mean
from dpo_jax.train import modes
from dpo_jax.train.forward import pair_logprobs
from dpo_jax.train.state import TrainState
from dpo_jax.train.step_config import StepConfig

__all__ = ["StepConfig", "loss_sum_and_metrics", "make_reference_step", "make_steps", "pair_logprobs"]


def loss_sum_and_metrics(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None = None
                         ) -> tuple[jax.Array, dict]:
    """Σ of per-example (per-token for SFT) losses over real examples, and metric sums: the mode's loss
    (train/modes.py). Pure (`rng`: dropout)."""
    return modes.get_mode(c.mode).loss(params, batch, c, rng)


def _accumulate(params: Any, batch: dict[str, jax.Array], c: StepConfig, with_grad: bool,
                constrain: Callable[[Any], Any], rng: jax.Array | None = None):
    """(gradients of the trained parameters — the adapters of a LoRA model, else all —, metric sums). `rng`: the
    step's dropout key (micro-batch m uses fold_in(rng, m)), None for no dropout."""
    denom = modes.denominator(batch, c)
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

    train = jax.jit(on_mesh(train_step, mesh), in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_shardings = {k: batch_sharding(mesh, rules, n) for k, n in c.batch_keys(train=False).items()}
    evaluate = jax.jit(on_mesh(eval_step, mesh), in_shardings=(state_shardings.params, eval_shardings),
                       out_shardings=replicated)
    return train, evaluate


def make_reference_step(c: StepConfig, mesh: Mesh, rules: Any, param_shardings: Any) -> Callable:
    """Jitted reference forward (never under grad): a batch (its layout's row fields are read) -> (chosen sums,
    rejected sums, chosen counts, rejected counts), each [B] float32 in block order; `.lower` for compiling ahead."""
    shardings = {k: batch_sharding(mesh, rules, 2) for k in c.layout.row_keys}
    replicated = NamedSharding(mesh, PartitionSpec())

    def reference(params, batch):
        lp = pair_logprobs(params, batch, c)
        return lp.chosen_sums, lp.rejected_sums, lp.chosen_counts, lp.rejected_counts

    jitted = jax.jit(on_mesh(reference, mesh), in_shardings=(param_shardings, shardings), out_shardings=replicated)

    def rows_only(batch):
        return {k: batch[k] for k in c.layout.row_keys}

    def reference_step(params, batch):
        return jitted(params, rows_only(batch))

    reference_step.lower = lambda params, batch: jitted.lower(params, rows_only(batch))  # compiling ahead, plan
    return reference_step
