"""Run checkpoints with orbax: the train state plus the small host-side state needed for an exact resume.

A checkpoint holds `state` (params, optimizer state, step; restored directly onto its shardings) and `extra` (JSON:
loader position, the partial logging window, the model config and mode it was written for). Saves are
asynchronous; orbax writes into a temporary directory and commits it atomically, so a checkpoint half-written by
a killed process is never picked up. Restoring refuses a checkpoint written for another model or mode.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpo_jax.data.loader import LoaderState
from dpo_jax.models.config import ModelConfig
from dpo_jax.summaries import Mean


class CheckpointMismatch(ValueError):
    pass


def _identity(model: ModelConfig, mode: str) -> dict[str, Any]:
    """What must agree between a checkpoint and the run restoring it (compute dtype and remat may change)."""
    keep = model.replace(dtype="float32", remat_policy="none", attention_impl=None, attention_query_block=0)
    return {"model": keep.to_json(), "mode": mode}


class RunCheckpoints:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "extra", "reference"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, loader: LoaderState, window: dict[str, Mean] | None,
             model: ModelConfig, mode: str, reference: Any = None) -> None:
        """reference: a reference that moves during training (TR-DPO), saved beside the state."""
        extra = {
            "loader": {"epoch": int(loader.epoch), "step": int(loader.step)},
            "window": None if window is None else {k: [float(v.total), float(v.count)] for k, v in window.items()},
            **_identity(model, mode),
        }
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not saved:
            raise RuntimeError(f"orbax did not save step {step} in {self.directory} (latest: {self.latest_step()})")

    def restore_extra(self, step: int, *, model: ModelConfig, mode: str) -> tuple[LoaderState, dict | None]:
        """(loader state, logging window) of checkpoint `step`, after checking it was written for this model and
        mode (before anything is built for it)."""
        extra = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
        want = _identity(model, mode)
        if extra.get("mode") != mode:
            raise CheckpointMismatch(f"{self.directory}/{step}: checkpoint was written in mode {extra.get('mode')!r}"
                                     f", this run is {mode!r}; use a new run directory")
        if extra.get("model") != want["model"]:
            raise CheckpointMismatch(f"{self.directory}/{step}: checkpoint was written for a different model "
                                     f"({_model_diff(extra.get('model'), want['model'])}); use a new run directory")
        loader = LoaderState(np.asarray(extra["loader"]["epoch"], np.int64),
                             np.asarray(extra["loader"]["step"], np.int64))
        window = None if extra["window"] is None else {
            k: Mean(jax.numpy.asarray(t, jax.numpy.float32), jax.numpy.asarray(c, jax.numpy.float32))
            for k, (t, c) in extra["window"].items()}
        return loader, window

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state of checkpoint `step`, restored directly onto `abstract_state`'s shardings."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state

    def restore_reference(self, step: int, abstract_params: Any) -> Any:
        """The moving reference saved with checkpoint `step` (TR-DPO), onto `abstract_params`' shardings."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "reference")):
            raise CheckpointMismatch(f"{self.directory}/{step}: no reference saved with this checkpoint, but this run "
                                     "moves its reference (config.dpo.ref_sync_every > 0); use a new run directory")
        return self.manager.restore(step, args=ocp.args.Composite(
            reference=ocp.args.StandardRestore(abstract_params))).reference

    def restore(self, step: int, abstract_state: Any, *, model: ModelConfig, mode: str):
        """(state, loader state, logging window) of checkpoint `step`, after checking it fits this run."""
        loader, window = self.restore_extra(step, model=model, mode=mode)
        return self.restore_state(step, abstract_state), loader, window

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has agreed to stop and save at `step` (JAX's preemption sync point)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _model_diff(saved: str | None, want: str) -> str:
    import json

    if saved is None:
        return "no model recorded"
    a, b = json.loads(saved), json.loads(want)
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4])
