"""Pure loss functions for preference optimisation and its baselines.

Everything here maps per-example (or per-token) log-probabilities to per-example losses; no model is involved,
so the math can be tested against published formulas in isolation and reused by every training mode.

Conventions (DPO paper, Eq. 7):
  c = log π(y_w|x) − log π_ref(y_w|x)      chosen log-ratio
  r = log π(y_l|x) − log π_ref(y_l|x)      rejected log-ratio
  h = c − r                                 the DPO "logit"
  implicit rewards β·c and β·r are reported under stop_gradient and never differentiated.
Log-probabilities are SUMS over response tokens unless a loss is registered as length-normalised, in which case
all four inputs are divided by the response length first (as TRL does), and the rewards use the normalised values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax.summaries import Mean

Array = jax.Array

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


class LogRatios(NamedTuple):
    """Per-example log-ratios against the reference; what every pairwise loss is a function of."""

    chosen: Array  # c, [B]
    rejected: Array  # r, [B]
    policy_chosen: Array  # log π(y_w|x), [B] (needed by the losses that sort policy and reference separately)
    policy_rejected: Array
    ref_chosen: Array
    ref_rejected: Array
    mask: Array  # [B] float32, 1 = a real example, 0 = padding: losses over the batch (sorts, means) skip padding

    @property
    def h(self) -> Array:
        return self.chosen - self.rejected


@dataclasses.dataclass(frozen=True)
class _LossSpec:
    fn: Callable[..., Array]
    uses_label_smoothing: bool
    length_normalized: bool
    ignores_reference: bool
    max_label_smoothing: float
    kwarg_defaults: Mapping[str, Any]


_REGISTRY: dict[str, _LossSpec] = {}


def _register(
    name: str,
    *,
    label_smoothing: bool = False,
    length_normalized: bool = False,
    ignores_reference: bool = False,
    max_label_smoothing: float = 1.0,
    **kwarg_defaults: Any,
) -> Callable[[Callable[..., Array]], Callable[..., Array]]:
    def wrap(fn: Callable[..., Array]) -> Callable[..., Array]:
        _REGISTRY[name] = _LossSpec(
            fn, label_smoothing, length_normalized, ignores_reference, max_label_smoothing, kwarg_defaults
        )
        return fn

    return wrap


def loss_types() -> tuple[str, ...]:
    """Names accepted by `preference_loss(loss_type=...)`."""
    return tuple(sorted(_REGISTRY))


def is_length_normalized(loss_type: str) -> bool:
    """Whether `loss_type` consumes length-averaged log-probs (the caller must then pass lengths)."""
    return _spec(loss_type).length_normalized


def ignores_reference(loss_type: str) -> bool:
    """Whether `loss_type` never reads reference log-probs (SimPO): no reference pass is needed."""
    return _spec(loss_type).ignores_reference


def _spec(loss_type: str) -> _LossSpec:
    try:
        return _REGISTRY[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(loss_types())}") from None


def _smoothed_sigmoid(z: Array, eps: float) -> Array:
    """−(1−ε)·logσ(z) − ε·logσ(−z): the sigmoid loss against a label that is right with probability 1−ε."""
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


@_register("sigmoid", label_smoothing=True)
def _sigmoid(lr: LogRatios, beta: float, eps: float) -> Array:
    """DPO (Rafailov et al. 2023, Eq. 7): −logσ(β·h).

    With label smoothing ε it is conservative DPO (cDPO, Mitchell 2023): −(1−ε)·logσ(β·h) − ε·logσ(−β·h).
    """
    return _smoothed_sigmoid(beta * lr.h, eps)


@_register("robust", label_smoothing=True, max_label_smoothing=0.5)
def _robust(lr: LogRatios, beta: float, eps: float) -> Array:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8), unbiased under label-flip rate ε < 1/2:

    [−(1−ε)·logσ(β·h) + ε·logσ(−β·h)] / (1 − 2ε)
    """
    z = beta * lr.h
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@_register("hinge")
def _hinge(lr: LogRatios, beta: float, eps: float) -> Array:
    """SLiC-HF calibration loss (Zhao et al. 2023) on the DPO logit: max(0, 1 − β·h)."""
    return jax.nn.relu(1.0 - beta * lr.h)


@_register("ipo")
def _ipo(lr: LogRatios, beta: float, eps: float) -> Array:
    """IPO (Azar et al. 2023, Eq. 17), β playing τ: (h − 1/(2β))², on summed log-probs (the authors' code)."""
    return jnp.square(lr.h - 1.0 / (2.0 * beta))


@_register("ipo_mean", length_normalized=True)
def _ipo_mean(lr: LogRatios, beta: float, eps: float) -> Array:
    """IPO as TRL computes it: (h − 1/(2β))² with every log-prob divided by its response length."""
    return jnp.square(lr.h - 1.0 / (2.0 * beta))


@_register("exo_pair", label_smoothing=True)
def _exo_pair(lr: LogRatios, beta: float, eps: float) -> Array:
    """EXO, pairwise (Ji et al. 2024, Eq. 16): the reverse KL from the model's pair distribution to (1−ε, ε):

    σ(β·h)·[logσ(β·h) − log(1−ε)] + σ(−β·h)·[logσ(−β·h) − log ε].   ε = 0 means the paper's ε = 1e−3.
    """
    eps = eps or 1e-3
    z = beta * lr.h
    return sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps)) + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps))


@_register("nca_pair")
def _nca_pair(lr: LogRatios, beta: float, eps: float) -> Array:
    """NCA, pairwise (Chen et al. 2024, Eq. 11): −logσ(β·c) − ½·logσ(−β·c) − ½·logσ(−β·r)."""
    zc, zr = beta * lr.chosen, beta * lr.rejected
    return -log_sigmoid(zc) - 0.5 * log_sigmoid(-zc) - 0.5 * log_sigmoid(-zr)


@_register("bco_pair", delta=None)
def _bco_pair(lr: LogRatios, beta: float, eps: float, delta: Array | float | None) -> Array:
    """BCO, pairwise (Jung et al. 2024): −logσ(β·c − δ) − logσ(−(β·r − δ)).

    δ is the reward shift; the paper (and TRL) keep a running mean of the rewards across steps. Pass it as
    `delta=` (loss_kwargs); without it, δ is this batch's mean reward over chosen and rejected of the real
    examples, under stop_gradient.
    """
    zc, zr = beta * lr.chosen, beta * lr.rejected
    if delta is None:
        delta = jax.lax.stop_gradient(jnp.sum((zc + zr) * lr.mask) / jnp.maximum(2.0 * jnp.sum(lr.mask), 1.0))
    return -log_sigmoid(zc - delta) - log_sigmoid(-(zr - delta))


@_register("sppo_hard")
def _sppo_hard(lr: LogRatios, beta: float, eps: float) -> Array:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P = 1 / 0): (c − 1/(2β))² + (r + 1/(2β))²."""
    half = 0.5 / beta
    return jnp.square(lr.chosen - half) + jnp.square(lr.rejected + half)


@_register("apo_zero")
def _apo_zero(lr: LogRatios, beta: float, eps: float) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): (1 − σ(β·c)) + σ(β·r). Raises chosen, lowers rejected."""
    return sigmoid(-beta * lr.chosen) + sigmoid(beta * lr.rejected)


@_register("apo_down")
def _apo_down(lr: LogRatios, beta: float, eps: float) -> Array:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(β·c) + (1 − σ(β·(c − r))). Lowers both, rejected more."""
    return sigmoid(beta * lr.chosen) + sigmoid(-beta * lr.h)


def _sorted_difference(a: Array, b: Array, mask: Array) -> Array:
    """sort(a) − sort(b) over the real examples (mask 1), as a per-example array: example j gets
    a_j − (the b of the same rank as a_j), 0 for padding. Summed over examples it is Σ_k sort(a)_k − sort(b)_k,
    and padding never takes part in either sort."""
    real = mask > 0
    rank = jnp.argsort(jnp.argsort(jnp.where(real, a, jnp.inf), stable=True), stable=True)
    b_sorted = jnp.sort(jnp.where(real, b, jnp.inf))
    return jnp.where(real, a - jnp.where(real, b_sorted[rank], 0.0), 0.0)


@_register("aot", label_smoothing=True)
def _aot(lr: LogRatios, beta: float, eps: float) -> Array:
    """AOT, paired (Melnyk et al. 2024): the sigmoid loss on δ = sort(π_w − π_l) − sort(ref_w − ref_l).

    Sorting runs over the real examples of the batch given: the global batch under a sharded jit, each
    micro-batch under accumulation. Example j carries the term of its own policy margin's rank.
    """
    delta = _sorted_difference(lr.policy_chosen - lr.policy_rejected, lr.ref_chosen - lr.ref_rejected, lr.mask)
    return _smoothed_sigmoid(beta * delta, eps)


@_register("aot_unpaired", label_smoothing=True)
def _aot_unpaired(lr: LogRatios, beta: float, eps: float) -> Array:
    """AOT, unpaired (Melnyk et al. 2024; TRL's `aot_pair`): the sigmoid loss on δ = sort(c) − sort(r), over the
    real examples; example j carries the term of its own chosen log-ratio's rank."""
    delta = _sorted_difference(lr.chosen, lr.rejected, lr.mask)
    return _smoothed_sigmoid(beta * delta, eps)


@_register("discopop", tau=0.05)
def _discopop(lr: LogRatios, beta: float, eps: float, tau: float) -> Array:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5), z = β·h, m = σ(z/τ):

    (1 − m)·(−logσ(z)) + m·exp(−z).   The second term is evaluated as exp(−z + logσ(z/τ)), which is the same
    number but cannot overflow to inf·0 for τ < 1.
    """
    z = beta * lr.h
    return sigmoid(-z / tau) * -log_sigmoid(z) + jnp.exp(-z + log_sigmoid(z / tau))


@_register("simpo", label_smoothing=True, length_normalized=True, ignores_reference=True, gamma=0.5)
def _simpo(lr: LogRatios, beta: float, eps: float, gamma: float) -> Array:
    """SimPO (Meng et al. 2024, Eq. 6): −logσ(β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ).

    Reference-free by definition (reference log-probs are ignored); γ is the target reward margin (loss_kwargs
    `gamma`, TRL's `simpo_gamma`). Label smoothing as in TRL's CPO trainer. Rewards are β·mean log π.
    """
    return _smoothed_sigmoid(beta * lr.h - gamma, eps)


def validate_loss_args(loss_type: str, beta: float, label_smoothing: float = 0.0, **loss_kwargs: Any) -> dict:
    """Checks a loss configuration without computing anything; returns the loss kwargs with defaults filled in.

    Raises ValueError naming the bad argument, so a config can be checked before any compilation.
    """
    spec = _spec(loss_type)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing and not spec.uses_label_smoothing:
        with_ls = [n for n, s in sorted(_REGISTRY.items()) if s.uses_label_smoothing]
        raise ValueError(
            f"loss_type {loss_type!r} does not use label_smoothing (got {label_smoothing}); "
            f"loss types that do: {', '.join(with_ls)}"
        )
    if not label_smoothing < spec.max_label_smoothing:
        raise ValueError(
            f"loss_type {loss_type!r} needs label_smoothing < {spec.max_label_smoothing}, got {label_smoothing}"
        )
    unknown = set(loss_kwargs) - set(spec.kwarg_defaults)
    if unknown:
        valid = ", ".join(sorted(spec.kwarg_defaults)) or "none"
        raise ValueError(f"loss_type {loss_type!r} got unknown loss_kwargs {sorted(unknown)}; valid: {valid}")
    return {**spec.kwarg_defaults, **loss_kwargs}


def preference_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None,
    ref_rejected_logps: Array | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    example_mask: Array | None = None,
    **loss_kwargs: Any,
) -> tuple[Array, Array, Array]:
    """Per-example pairwise preference losses and implicit rewards.

    Inputs are per-example summed response log-probs, shape [B]. Returns (losses[B], chosen_rewards[B],
    rejected_rewards[B]), all float32; rewards are β·(policy − reference) under stop_gradient.
    `reference_free=True` treats the reference log-ratio as 0. Length-normalised losses (`ipo_mean`, `simpo`)
    need `chosen_lengths`/`rejected_lengths` (response token counts; a zero length is treated as 1).
    `example_mask` [B] (1 = real, 0 = padding; default all real): losses that look across the batch (`aot`,
    `aot_unpaired`, `bco_pair`) sort and average over the real examples only, and padding examples' losses are 0.
    Loss-specific options go in `loss_kwargs` (see `loss_types()` and each loss's docstring).

    With `reference_free` the rewards are β·log π (the reference log-ratio taken as 0, so they are β(π − 0)),
    which is what TRL reports; the DPO authors' code reports β(π − π_ref) with whatever reference log-probs it has.
    """
    spec = _spec(loss_type)
    kwargs = validate_loss_args(loss_type, beta, label_smoothing, **loss_kwargs)

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    if reference_free or spec.ignores_reference:
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs unless reference_free=True")
        rc, rr = f32(ref_chosen_logps), f32(ref_rejected_logps)

    if spec.length_normalized:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"loss_type {loss_type!r} averages log-probs over the response: pass chosen_lengths and "
                "rejected_lengths (response token counts)"
            )
        lc = jnp.maximum(f32(chosen_lengths), 1.0)
        lr_ = jnp.maximum(f32(rejected_lengths), 1.0)
        pc, pr, rc, rr = pc / lc, pr / lr_, rc / lc, rr / lr_

    mask = jnp.ones_like(pc) if example_mask is None else f32(example_mask)
    ratios = LogRatios(pc - rc, pr - rr, pc, pr, rc, rr, mask)
    losses = jnp.where(mask > 0, spec.fn(ratios, beta, label_smoothing, **kwargs), 0.0)
    chosen_rewards = jax.lax.stop_gradient(beta * ratios.chosen)
    rejected_rewards = jax.lax.stop_gradient(beta * ratios.rejected)
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(
    losses: Array,
    chosen_rewards: Array,
    rejected_rewards: Array,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    example_mask: Array | None = None,
) -> dict[str, Mean]:
    """TRL-named metrics as (sum, count) pairs, so they average exactly over micro-batches and hosts.

    `example_mask` [B] (1 = real example) lets padded examples in a fixed-shape batch drop out.
    `rewards/*` are the rewards `preference_loss` returns: β(log π − log π_ref), and under `reference_free` (or a
    reference-free loss such as SimPO) β·log π — the reference taken as 0, as TRL reports them.
    """
    margins = chosen_rewards - rejected_rewards
    values = {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": margins,
        "logps/chosen": policy_chosen_logps,
        "logps/rejected": policy_rejected_logps,
    }
    return {name: Mean.of(jax.lax.stop_gradient(v), example_mask) for name, v in values.items()}


def nll_loss(token_logps: Array, loss_mask: Array) -> tuple[Array, Array]:
    """SFT / Preferred-FT negative log-likelihood: per-example (Σ −log p over masked tokens, token count).

    Returned as sums so the caller picks the normalisation (per token over the global batch, as HF does).
    """
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_logps.astype(jnp.float32) * mask, axis=-1), jnp.sum(mask, axis=-1)


def log1m_exp(logp: Array, max_prob: float = 1.0 - 1e-6) -> Array:
    """log(1 − exp(logp)) computed stably; p is capped at `max_prob` so log(1 − p) stays finite."""
    logp = jnp.minimum(logp, math.log(max_prob))
    return jnp.where(logp > -math.log(2.0), jnp.log(-jnp.expm1(logp)), jnp.log1p(-jnp.exp(logp)))


def unlikelihood_loss(
    chosen_token_logps: Array,
    chosen_mask: Array,
    rejected_token_logps: Array,
    rejected_mask: Array,
    *,
    alpha: float = 1.0,
) -> Array:
    """The DPO paper's Unlikelihood baseline (Welleck et al. 2019), per example:

    −Σ_t log p(y_w,t | ·) − α·Σ_t log(1 − p(y_l,t | ·)), token-wise over the masked response tokens.
    """
    chosen_nll, _ = nll_loss(chosen_token_logps, chosen_mask)
    unlikely = jnp.sum(log1m_exp(rejected_token_logps.astype(jnp.float32)) * rejected_mask, axis=-1)
    return chosen_nll - alpha * unlikely


def bradley_terry_loss(
    chosen_scores: Array, rejected_scores: Array, margin: Array | float = 0.0, center_coefficient: float = 0.0
) -> tuple[Array, Array]:
    """Reward-model loss of the RLHF baseline: −logσ(r_w − r_l − margin) + c·(r_w + r_l)² and accuracy
    1[r_w > r_l], per example.

    `margin` is the optional preference-strength margin of Llama 2 (0 gives the plain Bradley-Terry NLL); c is TRL's
    `center_rewards_coefficient` (its batch mean of (r_w + r_l)² is the mean of this per-example term), which pulls
    the rewards toward zero mean, since Bradley-Terry alone fixes them only up to a constant.
    """
    rw, rl = jnp.asarray(chosen_scores, jnp.float32), jnp.asarray(rejected_scores, jnp.float32)
    loss = -log_sigmoid(rw - rl - margin)
    if center_coefficient:
        loss = loss + center_coefficient * jnp.square(rw + rl)
    return loss, (rw > rl).astype(jnp.float32)
