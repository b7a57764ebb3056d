"""Metrics as (total, count) pairs.

A mean of means is wrong when micro-batches, hosts or padded batches carry different numbers of examples; sums and
counts add exactly, and the division happens once, on the host, when a metric is reported.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Mean(NamedTuple):
    """A running mean kept as its numerator and denominator (a pytree: it adds, psums and jits)."""

    total: Array
    count: Array

    @classmethod
    def of(cls, values: Array, mask: Array | None = None) -> "Mean":
        """The mean of `values` (over all axes), counting only where `mask` is nonzero."""
        values = jnp.asarray(values, jnp.float32)
        if mask is None:
            return cls(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), values.shape)
        return cls(jnp.sum(values * mask), jnp.sum(mask))


def merge(a: Mapping[str, Mean], b: Mapping[str, Mean]) -> dict[str, Mean]:
    """Adds two metric dicts key by key; the keys must agree."""
    if set(a) != set(b):
        raise ValueError(f"cannot merge metrics with different keys: {sorted(set(a) ^ set(b))}")
    return {k: Mean(a[k].total + b[k].total, a[k].count + b[k].count) for k in a}


def finalize(metrics: Mapping[str, Mean]) -> dict[str, float]:
    """Host-side means; a metric that counted nothing is NaN rather than a misleading 0."""
    out = {}
    for name, m in metrics.items():
        total, count = float(np.asarray(m.total)), float(np.asarray(m.count))
        out[name] = total / count if count else float("nan")
    return out
