"""Training modes, registered like loss types: each declares in one place what the step needs to know about it — its
model head, extra batch fields, what its summed loss is divided by, whether it reads reference log-probs, its
config checks — and the function `(params, batch, step config, dropout key) -> (Σ loss, metric sums)`.

A mode's loss returns the SUM of per-example (per-token with `per_token`) losses over the real examples and metric
`Mean`s; the step divides by `denominator` over the whole global batch, so micro-batches and hosts add up exactly.
PPO is not a mode: its update runs in its own engine (rlhf/ppo.py) behind the same Trainer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dpo_jax import losses
from dpo_jax.models import lora
from dpo_jax.summaries import Mean
from dpo_jax.train.forward import pair_logprobs, pair_rewards, response_masks

if TYPE_CHECKING:
    from dpo_jax.train.step_config import StepConfig

LossFn = Callable[[Any, dict, "StepConfig", "jax.Array | None"], "tuple[jax.Array, dict[str, Mean]]"]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    loss: LossFn
    head: str  # the model it trains: "lm" (a policy) or "score" (a reward model)
    batch_keys: Mapping[str, int]  # fields beyond the layout's rows and example_mask, with their ranks
    per_token: bool  # the loss is a mean over real chosen tokens (SFT), else over real examples
    uses_reference: Callable[["StepConfig"], bool]  # whether the step reads reference log-probs
    validate: Callable[["StepConfig"], None]  # raises ValueError naming the config key
    both_rows: bool = False  # per_token over both rows' tokens (language modelling), not the chosen rows' only
    online: bool = False  # its pairs are sampled from the policy during training (the data gives the prompts)


_REGISTRY: dict[str, Mode] = {}


def register_mode(name: str, *, head: str = "lm", batch_keys: Mapping[str, int] | None = None,
                  per_token: bool = False, uses_reference: Callable[["StepConfig"], bool] = lambda c: False,
                  validate: Callable[["StepConfig"], None] = lambda c: None, both_rows: bool = False,
                  online: bool = False) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        _REGISTRY[name] = Mode(name, fn, head, dict(batch_keys or {}), per_token, uses_reference, validate,
                               both_rows, online)
        return fn
    return wrap


def mode_names() -> tuple[str, ...]:
    """Values accepted by config.train.mode."""
    return tuple(_REGISTRY)


def get_mode(name: str) -> Mode:
    if name not in _REGISTRY:
        raise ValueError(f"config.train.mode = {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def denominator(batch: dict[str, jax.Array], c: StepConfig) -> jax.Array:
    """What the summed loss is divided by: real examples, or real chosen (both_rows: all) tokens for a per-token
    mode."""
    mode = get_mode(c.mode)
    if mode.per_token:
        chosen_mask, rejected_mask = response_masks(batch, c)
        scored = chosen_mask + rejected_mask if mode.both_rows else chosen_mask
        return jnp.maximum(jnp.sum(scored * batch["example_mask"][:, None]), 1.0)
    return jnp.maximum(jnp.sum(batch["example_mask"]).astype(jnp.float32), 1.0)


def _dpo_uses_reference(c: StepConfig) -> bool:
    return not c.reference_free and not losses.ignores_reference(c.loss_type)


def _dpo_validate(c: StepConfig) -> None:
    losses.validate_loss_args(c.loss_type, c.beta, c.label_smoothing, **dict(c.loss_kwargs))


def _dpo_terms(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """(Σ loss, metrics, the policy's pair log-probs, the reference's chosen and rejected sums)."""
    lp = pair_logprobs(params, batch, c, rng)
    mask = batch["example_mask"].astype(jnp.float32)
    ref_c, ref_r = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
    if c.base_reference and c.needs_reference:  # adapters off: the frozen base, no second copy of the weights
        ref = pair_logprobs(jax.lax.stop_gradient(lora.base_params(params)), batch,
                            dataclasses.replace(c, model=lora.base_config(c.model), base_reference=False))
        ref_c, ref_r = jax.lax.stop_gradient(ref.chosen_sums), jax.lax.stop_gradient(ref.rejected_sums)
    per_example, cr, rr = losses.preference_loss(
        lp.chosen_sums, lp.rejected_sums, ref_c, ref_r, loss_type=c.loss_type, beta=c.beta,
        label_smoothing=c.label_smoothing, reference_free=c.reference_free, chosen_lengths=lp.chosen_counts,
        rejected_lengths=lp.rejected_counts, example_mask=mask, **dict(c.loss_kwargs))
    metrics = losses.preference_metrics(per_example, cr, rr, lp.chosen_sums, lp.rejected_sums, mask)
    return jnp.sum(per_example * mask), metrics, lp, ref_c, ref_r


@register_mode("dpo", uses_reference=_dpo_uses_reference, validate=_dpo_validate)
def _dpo(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """Any registered preference loss (losses.py) on the pair's log-probs and the reference's."""
    total, metrics, *_ = _dpo_terms(params, batch, c, rng)
    return total, metrics


def _online_validate(c: StepConfig) -> None:
    _dpo_validate(c)
    if not _dpo_uses_reference(c):
        raise ValueError(f"config.train.mode = 'online_dpo' reports the policy's KL to the reference; "
                         f"config.dpo.loss_type = {c.loss_type!r} (or reference_free) has none: use a loss with a "
                         "reference")


@register_mode("online_dpo", uses_reference=_dpo_uses_reference, validate=_online_validate, online=True,
               batch_keys={"scores_mean": 1, "scores_margin": 1, "contain_eos": 1})
def _online_dpo(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """DPO on pairs the policy sampled this step (best vs worst of k, formed by rlhf/online_dpo.py), with TRL's
    online-DPO metrics: the sampled pair's KL(π‖π_ref) estimate Σ log π − log π_ref (the mean of its two
    sequences), entropy −Σ log π, the scores (all k samples' mean; best − worst), β·KL as the non-score reward."""
    total, metrics, lp, ref_c, ref_r = _dpo_terms(params, batch, c, rng)
    if "scores_mean" not in batch:  # the eval step, on the data's own pairs: DPO's metrics only
        return total, metrics
    mask = batch["example_mask"].astype(jnp.float32)
    stop = jax.lax.stop_gradient
    kl = stop((lp.chosen_sums - ref_c + lp.rejected_sums - ref_r) / 2)
    scores = batch["scores_mean"]
    return total, {**metrics, "objective/kl": Mean.of(kl, mask),
                   "objective/entropy": Mean.of(stop(-(lp.chosen_sums + lp.rejected_sums) / 2), mask),
                   "objective/non_score_reward": Mean.of(-c.beta * kl, mask),
                   "objective/rlhf_reward": Mean.of(scores - c.beta * kl, mask),
                   "objective/scores": Mean.of(scores, mask),
                   "objective/scores_margin": Mean.of(batch["scores_margin"], mask),
                   "val/contain_eos_token": Mean.of(batch["contain_eos"], mask)}


def _logps_metrics(lp, mask: jax.Array) -> dict[str, Mean]:
    return {"logps/chosen": Mean.of(jax.lax.stop_gradient(lp.chosen_sums), mask),
            "logps/rejected": Mean.of(jax.lax.stop_gradient(lp.rejected_sums), mask)}


@register_mode("sft", per_token=True)
def _sft(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """Preferred-FT: the negative log-likelihood of the chosen responses, per token."""
    lp = pair_logprobs(params, batch, c, rng)
    mask = batch["example_mask"].astype(jnp.float32)
    nll, count = losses.nll_loss(lp.chosen_tokens, lp.chosen_mask * mask[:, None])
    total = jnp.sum(nll)
    return total, {**_logps_metrics(lp, mask), "loss": Mean(jax.lax.stop_gradient(total), jnp.sum(count))}


@register_mode("lm", per_token=True, both_rows=True)
def _lm(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """Language modelling on unpaired text, two texts to a "pair": the negative log-likelihood of both rows' scored
    tokens, per token. SFT on plain text without SFT's idle second row (the sentiment experiment's π_SFT)."""
    lp = pair_logprobs(params, batch, c, rng)
    mask = batch["example_mask"].astype(jnp.float32)[:, None]
    (nll_c, count_c), (nll_r, count_r) = (losses.nll_loss(lp.chosen_tokens, lp.chosen_mask * mask),
                                          losses.nll_loss(lp.rejected_tokens, lp.rejected_mask * mask))
    total = jnp.sum(nll_c) + jnp.sum(nll_r)
    return total, {**_logps_metrics(lp, mask[:, 0]),
                   "loss": Mean(jax.lax.stop_gradient(total), jnp.sum(count_c) + jnp.sum(count_r))}


@register_mode("unlikelihood")
def _unlikelihood(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """The chosen response's likelihood up, the rejected one's down (weighted by unlikelihood_alpha)."""
    lp = pair_logprobs(params, batch, c, rng)
    mask = batch["example_mask"].astype(jnp.float32)
    per_example = losses.unlikelihood_loss(lp.chosen_tokens, lp.chosen_mask * mask[:, None], lp.rejected_tokens,
                                           lp.rejected_mask * mask[:, None], alpha=c.unlikelihood_alpha)
    return jnp.sum(per_example * mask), {**_logps_metrics(lp, mask),
                                         "loss": Mean.of(jax.lax.stop_gradient(per_example), mask)}


@register_mode("reward", head="score", batch_keys={"margin": 1})
def _reward(params: Any, batch: dict[str, jax.Array], c: StepConfig, rng: jax.Array | None):
    """A Bradley-Terry reward model on the pairs; metrics under TRL RewardTrainer's names (loss, accuracy, margin,
    mean_reward) plus the mean chosen and rejected rewards."""
    chosen, rejected = pair_rewards(params, batch, c, rng)
    mask = batch["example_mask"].astype(jnp.float32)
    per_example, _ = losses.bradley_terry_loss(chosen, rejected, batch["margin"], c.center_rewards_coefficient)
    values = {"loss": per_example, "accuracy": (chosen > rejected).astype(jnp.float32),
              "margin": chosen - rejected, "mean_reward": (chosen + rejected) / 2, "rewards/chosen": chosen,
              "rewards/rejected": rejected}
    return jnp.sum(per_example * mask), {k: Mean.of(jax.lax.stop_gradient(v), mask) for k, v in values.items()}
