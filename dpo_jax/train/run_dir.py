"""A run directory, the same for every command that trains (`train`, `ppo`, and whatever comes next): its
checkpoints, its logs and its config files, and the one way a run resumes.

Resume: the latest checkpoint's state is restored onto the initial state's shardings (whose buffers are then freed),
and every log (metrics.jsonl, samples.jsonl) is cut back to the restored step, on process 0 only, so the files read
as if the run had never stopped. Config files are written only after a checkpoint accepted the run, so a run refused
by its checkpoint never overwrites that run's files.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from dpo_jax import distributed, sharding
from dpo_jax.data.loader import LoaderState
from dpo_jax.metrics import MetricWriter, truncate_jsonl
from dpo_jax.models.config import ModelConfig
from dpo_jax.train.checkpoint import RunCheckpoints


class RunDirectory:
    def __init__(self, path: str, *, keep_checkpoints: int, tensorboard: bool = True):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.is_main = distributed.is_main_process()
        self.checkpoints = RunCheckpoints(os.path.join(self.path, "checkpoints"), keep=keep_checkpoints)
        self.latest = self.checkpoints.latest_step()  # None: a fresh run
        self._tensorboard, self._writer = tensorboard, None

    @property
    def writer(self) -> MetricWriter:
        """The run's metric and sample logs (opened on first use: a run refused by its checkpoint writes nothing)."""
        if self._writer is None:
            self._writer = MetricWriter(self.path, enabled=self.is_main, tensorboard=self._tensorboard)
        return self._writer

    def restore_extra(self, *, model: ModelConfig, kind: str) -> tuple[LoaderState, dict | None] | None:
        """(loader position, partial logging window) of the latest checkpoint, after checking it was written for
        this model and kind of run (before anything is built for it); None for a fresh run."""
        if self.latest is None:
            return None
        return self.checkpoints.restore_extra(self.latest, model=model, mode=kind)

    def resume(self, initial_state: Any) -> Any:
        """The latest checkpoint's state on `initial_state`'s shardings (`initial_state` is freed), with the logs
        cut back to its step; `initial_state` itself for a fresh run."""
        if self.latest is None:
            return initial_state
        state = self.checkpoints.restore_state(self.latest, sharding.abstract(initial_state))
        jax.tree.map(lambda x: x.delete(), initial_state)
        if self.is_main:
            for log in (self.writer.metrics_path, self.writer.samples_path):
                truncate_jsonl(log, self.latest)
            print(f"resumed from {self.checkpoints.directory}/{self.latest}", flush=True)
        return state

    def write_configs(self, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        """config.json (the whole run config) and model_config.json, which `dpo-jax export` reads back."""
        if not self.is_main:
            return
        with open(os.path.join(self.path, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        with open(os.path.join(self.path, "model_config.json"), "w") as f:
            f.write(model.to_json())

    def close(self) -> None:
        self.checkpoints.close()
        if self._writer is not None:
            self._writer.close()
