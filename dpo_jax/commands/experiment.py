"""`dpo-jax experiment NAME [--config FILE[:ARG]] [--config.KEY=VALUE ...]`: a paper experiment, end to end.

An experiment is a module with `main(config)` and a config module with `default_config()` (experiments/)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = {  # name: (config module, experiment module)
    "sentiment": ("dpo_jax.experiments.sentiment_config", "dpo_jax.experiments.sentiment"),
}


def resolve(name: str) -> tuple[ModuleType, ModuleType]:
    """(config module, experiment module) of experiment `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"dpo-jax experiment: name one of {', '.join(EXPERIMENTS)}")
    config_module, module = EXPERIMENTS[name]
    return importlib.import_module(config_module), importlib.import_module(module)
