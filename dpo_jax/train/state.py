"""TrainState and the optax optimizer built from config; the state is created directly sharded."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dpo_jax import sharding

OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The DPO paper's recipe: RMSprop, lr 1e-6, 150 linear warmup steps then constant, grad-norm clip 10."""
    c = ml_collections.ConfigDict()
    c.name = "rmsprop"
    c.learning_rate = 1e-6
    c.warmup_steps = 150
    c.schedule = "constant"  # after warmup: constant, cosine or linear decay to 0 at total_steps
    c.total_steps = 0  # needed by cosine/linear
    c.weight_decay = 0.0  # adamw
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8  # adam, adamw
    c.rmsprop_decay, c.rmsprop_eps = 0.99, 1e-8  # torch.optim.RMSprop defaults (the authors' optimizer)
    c.momentum = 0.0  # sgd / rmsprop
    c.clip_grad_norm = 10.0  # 0 disables
    return c


def learning_rate_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
    if c.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule = {c.schedule!r}; valid: {', '.join(SCHEDULES)}")
    warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps) if c.warmup_steps else None
    if c.schedule == "constant":
        after = optax.constant_schedule(c.learning_rate)
    else:
        decay_steps = c.total_steps - c.warmup_steps
        if decay_steps <= 0:
            raise ValueError(f"config.optimizer.schedule = {c.schedule!r} needs total_steps > warmup_steps "
                             f"(got {c.total_steps} and {c.warmup_steps})")
        after = (optax.cosine_decay_schedule(c.learning_rate, decay_steps) if c.schedule == "cosine"
                 else optax.linear_schedule(c.learning_rate, 0.0, decay_steps))
    return after if warmup is None else optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(c: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(c)
    if c.name == "rmsprop":
        # eps outside the sqrt, as torch.optim.RMSprop: g / (sqrt(v) + eps)
        opt = optax.rmsprop(schedule, decay=c.rmsprop_decay, eps=c.rmsprop_eps, eps_in_sqrt=False,
                            momentum=c.momentum or None)
    elif c.name == "adamw":
        opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    elif c.name == "adam":
        opt = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.name == "sgd":
        opt = optax.sgd(schedule, momentum=c.momentum or None)
    else:
        raise ValueError(f"config.optimizer.name = {c.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if c.clip_grad_norm:
        opt = optax.chain(optax.clip_by_global_norm(c.clip_grad_norm), opt)
    return opt, schedule


def _state_init(init_params: Callable[..., Any], optimizer: optax.GradientTransformation,
                trained: Callable[[Any], Any]) -> Callable[..., TrainState]:
    def init(*a) -> TrainState:
        params = init_params(*a)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trained(params)))

    return init


def create_state(
    init_params: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    shardings_for: Callable[[Any], Any],
    *args: Any,
    trained: Callable[[Any], Any] = lambda params: params,
    abstract: bool = False,
) -> TrainState:
    """Builds the state inside one jit whose out_shardings come from `shardings_for(abstract_state)`, so every
    array is born on its devices. `init_params(*args)` makes the params: a random init (no args), or the identity
    on loaded params (passed as `args`, donated, so they are resharded rather than copied). The optimizer state
    covers `trained(params)` (a LoRA model's adapters). abstract: only the state's shapes, dtypes and shardings
    (jax.ShapeDtypeStruct), nothing allocated: what `dpo-jax plan` compiles against."""
    init = _state_init(init_params, optimizer, trained)
    shapes = jax.eval_shape(init, *args)
    if abstract:
        return sharding.abstract(shapes, shardings_for(shapes))
    return jax.jit(init, out_shardings=shardings_for(shapes), donate_argnums=tuple(range(len(args))))(*args)
