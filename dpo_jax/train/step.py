"""The pure train and eval steps, jitted over a device mesh with explicit shardings and a donated state.

Batch layout (global arrays): `input_ids`, `loss_mask`, `attention_mask` [2B, T] made of P host blocks in process
order, each block = that host's chosen rows then its rejected rows (P = 1: all chosen rows, then all rejected);
`example_mask` [B] (0 = padding example) and, for DPO with a reference, `ref_chosen_logps`/`ref_rejected_logps`
[B], in the same block order. Pairs are matched inside each block, so host-local batches never need reordering.

Gradient accumulation scans over M micro-batches: pair i of each block goes to micro-batch i mod M, so every
device holds rows of every micro-batch and the scan moves no data. Losses are sums over examples (tokens for SFT)
divided by the count over the whole global batch, so M micro-batches give exactly the gradient of one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import losses
from dpo_jax.logprobs import SequenceLogProbs, sequence_logprobs
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, unembedding
from dpo_jax.sharding import batch_sharding
from dpo_jax.summaries import Mean
from dpo_jax.train.state import TrainState

MODES = ("dpo", "sft", "unlikelihood")
ROW_KEYS = ("input_ids", "loss_mask", "attention_mask")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the step (hashable)."""

    model: ModelConfig
    mode: str = "dpo"  # dpo (any preference loss), sft (Preferred-FT: NLL of chosen), unlikelihood
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    loss_kwargs: tuple[tuple[str, Any], ...] = ()
    unlikelihood_alpha: float = 1.0
    micro_batches: int = 1
    num_blocks: int = 1  # host blocks in the global batch (= process count)
    chunk_size: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"config.train.mode = {self.mode!r}; valid: {', '.join(MODES)}")
        if self.mode == "dpo":
            losses.validate_loss_args(self.loss_type, self.beta, self.label_smoothing, **dict(self.loss_kwargs))

    @property
    def needs_reference(self) -> bool:
        return self.mode == "dpo" and not self.reference_free and \
            not losses._spec(self.loss_type).ignores_reference

    def batch_keys(self) -> dict[str, int]:
        """Batch fields the step takes, with their ranks."""
        keys = {k: 2 for k in ROW_KEYS} | {"example_mask": 1}
        if self.needs_reference:
            keys |= {"ref_chosen_logps": 1, "ref_rejected_logps": 1}
        return keys


def split_pairs(x: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """[2B, ...] in block layout -> (chosen [B, ...], rejected [B, ...]), both in block order."""
    y = x.reshape(num_blocks, 2, -1, *x.shape[1:])
    return y[:, 0].reshape(-1, *x.shape[1:]), y[:, 1].reshape(-1, *x.shape[1:])


def _micro_rows(x: jax.Array, m: int, p: int) -> jax.Array:
    """[2B, ...] -> [M, 2B/M, ...]; micro-batch k takes pairs i ≡ k (mod M) of every block, itself in block layout."""
    y = x.reshape(p, 2, -1, m, *x.shape[1:])
    return jnp.moveaxis(y, 3, 0).reshape(m, -1, *x.shape[1:])


def _micro_pairs(x: jax.Array, m: int, p: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] with the same assignment as `_micro_rows`."""
    y = x.reshape(p, -1, m, *x.shape[1:])
    return jnp.moveaxis(y, 2, 0).reshape(m, -1, *x.shape[1:])


def to_micro_batches(batch: dict[str, jax.Array], m: int, p: int) -> dict[str, jax.Array]:
    return {k: (_micro_rows if k in ROW_KEYS else _micro_pairs)(v, m, p) for k, v in batch.items()}


def policy_logprobs(params: Any, batch: dict[str, jax.Array], c: StepConfig) -> SequenceLogProbs:
    """Forward over all rows, then chunked float32 log-probs of the scored tokens."""
    hidden = Decoder(c.model).apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
    kernel, bias = unembedding(params, c.model)
    return sequence_logprobs(hidden, kernel, batch["input_ids"], batch["loss_mask"], bias=bias,
                             chunk_size=c.chunk_size)


def loss_denominator(batch: dict[str, jax.Array], c: StepConfig) -> jax.Array:
    """What the summed loss is divided by: real examples (DPO, unlikelihood) or real chosen tokens (SFT)."""
    if c.mode == "sft":
        chosen_mask, _ = split_pairs(batch["loss_mask"], c.num_blocks)
        return jnp.maximum(jnp.sum(chosen_mask[:, 1:] * batch["example_mask"][:, None]), 1.0)
    return jnp.maximum(jnp.sum(batch["example_mask"]).astype(jnp.float32), 1.0)


def loss_sum_and_metrics(params: Any, batch: dict[str, jax.Array], c: StepConfig) -> tuple[jax.Array, dict]:
    """Σ of per-example (SFT: per-token) losses over real examples, and metric sums. Pure."""
    lp = policy_logprobs(params, batch, c)
    p = c.num_blocks
    pc, pr = split_pairs(lp.sums, p)
    mask = batch["example_mask"].astype(jnp.float32)
    if c.mode == "dpo":
        ref_c = batch.get("ref_chosen_logps")
        ref_r = batch.get("ref_rejected_logps")
        lc, lr = split_pairs(lp.counts, p)
        per_example, cr, rr = losses.preference_loss(
            pc, pr, ref_c, ref_r, loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing,
            reference_free=c.reference_free, chosen_lengths=lc, rejected_lengths=lr, **dict(c.loss_kwargs))
        return jnp.sum(per_example * mask), losses.preference_metrics(per_example, cr, rr, pc, pr, mask)
    tok_c, tok_r = split_pairs(lp.token_logps, p)
    mask_c, mask_r = split_pairs(batch["loss_mask"], p)
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


def _accumulate(params: Any, batch: dict[str, jax.Array], c: StepConfig, with_grad: bool,
                constrain: Callable[[Any], Any]):
    denom = loss_denominator(batch, c)

    def one(mb):
        if not with_grad:
            return None, loss_sum_and_metrics(params, mb, c)[1]
        (_, metrics), grads = jax.value_and_grad(
            lambda p: (lambda t, m: (t / denom, m))(*loss_sum_and_metrics(p, mb, c)), has_aux=True)(params)
        return grads, metrics

    if c.micro_batches == 1:
        return one(batch)
    micro = constrain(to_micro_batches(batch, c.micro_batches, c.num_blocks))
    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, one(mb)), None

    (grads, metrics), _ = jax.lax.scan(body, init, micro)
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
        grads, metrics = _accumulate(state.params, batch, c, True, constrain)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["grad_norm"] = Mean(optax.tree.norm(grads), one)
        metrics["learning_rate"] = Mean(jnp.asarray(schedule(state.step), jnp.float32), one)
        metrics["num_tokens"] = Mean(jnp.sum(batch["attention_mask"]).astype(jnp.float32), one)
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
    keys = {k: 2 for k in ROW_KEYS}
    shardings = {k: batch_sharding(mesh, rules, n) for k, n in keys.items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def reference(params, batch):
        lp = policy_logprobs(params, {k: batch[k] for k in ROW_KEYS}, c)
        (sc, sr), (nc, nr) = split_pairs(lp.sums, c.num_blocks), split_pairs(lp.counts, c.num_blocks)
        return sc, sr, nc, nr

    jitted = jax.jit(reference, in_shardings=(param_shardings, shardings), out_shardings=replicated)
    return lambda params, batch: jitted(params, {k: batch[k] for k in ROW_KEYS})
