"""Host-loaded weights placed on a device mesh by the model's logical axes, for a jitted pass outside an engine
(scoring, sampling, a frozen reference)."""

from __future__ import annotations

from typing import Any

import jax

from dpo_jax import sharding
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import logical_axes


def place_on_mesh(config: ModelConfig, params: Any, mesh: jax.sharding.Mesh, rules: Any) -> tuple[Any, Any]:
    """(params on the mesh, their NamedShardings)."""
    shardings = sharding.param_shardings(logical_axes(config), params, mesh, rules)
    return jax.device_put(params, shardings), shardings
