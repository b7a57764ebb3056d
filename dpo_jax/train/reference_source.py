"""The reference log-probs a DPO step reads, behind one interface: `attach(host batch, split)`.

`ReferenceTables` (config.dpo.reference = precompute): one cached pass per split before training, looked up by
example id — no reference weights on device while training. `PerBatchReference` (per_batch): the reference stays
resident and runs its jitted pass on each batch. `NO_REFERENCE`: SFT, unlikelihood and reference-free losses.

`prepare_reference` picks one for a run and records, in the run directory's reference.json, what the tables were
computed from (reference weights' source, tokenized data, settings) so that a changed input recomputes them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import distributed, reference
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.pipeline import default_cache_dir
from dpo_jax.train.engine import Engine
from dpo_jax.train.model_source import model_loader, source_identity


class NoReference:
    params = None

    def attach(self, local: dict, split: str, state: Any = None) -> dict:
        return local


NO_REFERENCE = NoReference()


class ReferenceTables:
    params = None

    def __init__(self, tables: dict[str, reference.ReferenceTable]):
        self.tables = tables

    def attach(self, local: dict, split: str, state: Any = None) -> dict:
        return {**local, **self.tables[split].lookup(local["example_id"])}


class PerBatchReference:
    def __init__(self, engine: Engine, params: Any):
        self.engine, self.params = engine, params

    def attach(self, local: dict, split: str, state: Any = None) -> dict:
        sc, sr, _, _ = (np.asarray(x) for x in self.engine.reference_logps(self.params, local))
        b, p = len(local["example_id"]), jax.process_index()
        return {**local, "ref_chosen_logps": sc[p * b:(p + 1) * b], "ref_rejected_logps": sr[p * b:(p + 1) * b]}


class SyncedReference:
    """TR-DPO (Gorbatovski et al. 2024): a resident reference moved toward the policy, π_ref ← α·π + (1 − α)·π_ref,
    before the step after every `every`-th update (α = 1: a hard copy). Attaches like `PerBatchReference`, given
    the train state (the Trainer's rollout hook); every = 0: never moved. `synced` is the step of the last move."""

    def __init__(self, inner: PerBatchReference, every: int, alpha: float):
        if every < 0 or not 0 < alpha <= 1:
            raise ValueError(f"config.dpo.ref_sync_every = {every} must be >= 0 and config.dpo.ref_sync_alpha = "
                             f"{alpha} in (0, 1]")
        self.inner, self.every, self.synced = inner, every, 0
        self._move = jax.jit(lambda ref, policy: jax.tree.map(
            lambda r, p: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
            ref, policy), donate_argnums=0)

    @property
    def params(self) -> Any:
        return self.inner.params

    def sync(self, policy_params: Any, step: int) -> None:
        self.inner.params = self._move(self.inner.params, policy_params)
        self.synced = step

    def attach(self, local: dict, split: str, state: Any = None) -> dict:
        if state is not None and self.every and split == "train":
            step = int(jax.device_get(state.step))
            if step and step % self.every == 0 and step != self.synced:
                self.sync(state.params, step)
        return self.inner.attach(local, split)


def reference_model_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model section that loads the separate reference (config.reference.path)."""
    return ml_collections.ConfigDict({**c.model.to_dict(), "source": c.reference.source or c.model.source,
                                      "path": c.reference.path})


def _reference_params(c, engine: Engine, initial_params, load_initial: Callable) -> tuple[Any, bool]:
    """(reference params on the engine's shardings, whether they are the policy's own initial buffers)."""
    if c.reference.path:
        _, load = model_loader(reference_model_config(c), engine.config.model.vocab_size)
        return jax.device_put(load(), engine.param_shardings), False
    if initial_params is not None:
        return initial_params, True
    return jax.device_put(load_initial(), engine.param_shardings), False  # resumed: rebuild the initial policy


def data_identity(loader: PreferenceLoader) -> str:
    """The tokenized split's TFDS identity (its config name fingerprints data, tokenizer and lengths)."""
    info = getattr(loader.source, "dataset_info", None)
    return f"{getattr(info, 'full_name', 'in-memory')}:{getattr(loader.source, 'split', '')}:{len(loader.source)}"


def prepare_reference(c: ml_collections.ConfigDict, engine: Engine, loaders: dict[str, PreferenceLoader],
                      initial_params: Any, load_initial: Callable, run_dir: str):
    """The run's reference source. initial_params: the policy's initial weights on device (None when resumed);
    the tables are computed on them before the first update, so no second copy exists."""
    if not engine.config.needs_reference or engine.config.base_reference:  # base: computed inside the step
        return NO_REFERENCE
    if c.dpo.reference == "per_batch":
        params, shared = _reference_params(c, engine, initial_params, load_initial)
        return PerBatchReference(engine, jax.tree.map(jnp.copy, params) if shared else params)  # policy's: donated

    settings = {"chunk": c.train.logprob_chunk_size, "model": engine.config.model.to_json(),
                "score_window": engine.config.score_window, "score_groups": engine.config.score_groups}
    ref_model = reference_model_config(c) if c.reference.path else c.model
    identity = {"reference": source_identity(ref_model),
                "data": {split: data_identity(loader) for split, loader in loaders.items()}, "settings": settings}
    record = os.path.join(run_dir, "reference.json")
    if os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f)
        paths = saved.get("paths", {})
        changed = [k for k in identity if saved.get("identity", {}).get(k) != identity[k]]
        if not changed and set(paths) == set(loaders) and all(os.path.isfile(p) for p in paths.values()):
            return ReferenceTables({s: reference.ReferenceTable.load(p) for s, p in paths.items()})
        print(f"reference tables in {record} were computed for another "
              f"{', '.join(changed) or 'set of cache files'}; recomputing", flush=True)
    params, shared = _reference_params(c, engine, initial_params, load_initial)
    weights = reference.weights_fingerprint(params)
    tables, paths = {}, {}
    for split, loader in loaders.items():
        paths[split] = reference.cache_path(c.data.cache_dir or default_cache_dir(), split, weights=weights,
                                            data=identity["data"][split], settings=settings)
        tables[split], cached = reference.precompute(params, engine.reference_logps, loader.one_pass, paths[split])
        print(f"reference log-probs for {split}: {len(tables[split])} examples "
              f"({'cache hit' if cached else 'computed'}: {paths[split]})", flush=True)
    if distributed.is_main_process():
        with open(record, "w") as f:
            json.dump({"identity": identity, "paths": paths}, f)
    if not shared:
        jax.tree.map(lambda x: x.delete(), params)  # the reference is not needed on device any more
    return ReferenceTables(tables)
