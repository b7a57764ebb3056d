"""The compile clock counts JAX's own compile events: a first call compiles, a second does not."""

import jax
import jax.numpy as jnp

from dpo_jax.compile_clock import CompileClock


def test_compiling_is_counted_once_and_within_the_wall_time():
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)
    x = jnp.ones((64, 64))
    with CompileClock() as first:
        f(x).block_until_ready()
    with CompileClock() as second:
        f(x).block_until_ready()
    assert 0 < first.compile_seconds <= first.seconds
    assert second.compile_seconds == 0.0
