"""The reference pass: frozen-model log-probs for every example, computed once, cached on disk.

DPO needs log π_ref(y|x) for each chosen and rejected response. Computing them once, in a separate jitted forward
(never under grad), means the reference parameters need not be resident during training: when the reference is
the initial policy (DPO from an SFT checkpoint) the pass runs on the policy's own weights before the first update
and no second copy ever exists; a separate reference is loaded, run, and deleted.

The table (example_id -> chosen sum, rejected sum, chosen count, rejected count, float32) is stored under
`cache_dir/reference/<fingerprint>/<split>.npz`, the fingerprint covering the reference weights (a checksum computed
on device), the tokenized dataset's identity, the model config and the log-prob settings; a second run with the
same inputs loads it instead of recomputing.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.fingerprint import fingerprint

FIELDS = ("chosen_sum", "rejected_sum", "chosen_count", "rejected_count")


class ReferenceTable:
    """Per-example reference log-prob sums and counts, looked up by example id on the host."""

    def __init__(self, example_ids: np.ndarray, values: np.ndarray):
        order = np.argsort(example_ids)
        self.example_ids = np.asarray(example_ids, np.int64)[order]
        self.values = np.asarray(values, np.float32)[order]
        if len(np.unique(self.example_ids)) != len(self.example_ids):
            raise ValueError("reference table has duplicate example ids")

    def __len__(self) -> int:
        return len(self.example_ids)

    def lookup(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
        """{'ref_chosen_logps', 'ref_rejected_logps'} for a host batch's ids (-1 = padding -> 0)."""
        ids = np.asarray(example_ids)
        real = ids >= 0
        pos = np.searchsorted(self.example_ids, ids[real])
        pos = np.minimum(pos, len(self.example_ids) - 1)
        missing = ids[real][self.example_ids[pos] != ids[real]]
        if len(missing):
            raise ValueError(f"example ids {missing[:5].tolist()} have no reference log-probs: the reference cache "
                             "does not match this dataset")
        out = np.zeros((len(ids), 2), np.float32)
        out[real] = self.values[pos][:, :2]
        return {"ref_chosen_logps": out[:, 0], "ref_rejected_logps": out[:, 1]}

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, example_ids=self.example_ids, values=self.values)
        os.replace(tmp, path)  # atomic: a half-written table is never picked up

    @classmethod
    def load(cls, path: str) -> "ReferenceTable":
        with np.load(path) as f:
            return cls(f["example_ids"], f["values"])


def weights_fingerprint(params: Any) -> str:
    """A checksum of every parameter, computed where the parameters live (no host copy of the weights)."""

    @jax.jit
    def checksums(p):
        def one(x):
            x = x.astype(jnp.float32).reshape(-1)
            w = (jax.lax.iota(jnp.int32, x.size) % 9973).astype(jnp.float32) + 1.0
            return jnp.stack([jnp.sum(x), jnp.sum(x * w), jnp.sum(jnp.abs(x))])
        return jax.tree.map(one, p)

    leaves = jax.tree_util.tree_flatten_with_path(checksums(params))[0]
    payload = [(jax.tree_util.keystr(k), np.asarray(v).round(6).tolist()) for k, v in leaves]
    shapes = [(jax.tree_util.keystr(k), list(x.shape), str(x.dtype))
              for k, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return fingerprint([payload, shapes])


def cache_path(cache_dir: str, split: str, *, weights: str, data: str, settings: dict[str, Any]) -> str:
    key = fingerprint({"weights": weights, "data": data, "settings": settings})
    return os.path.join(cache_dir, "reference", key, f"{split}.npz")


ReferenceFn = Callable[[Any, dict[str, np.ndarray]], tuple]  # (params, host batch) -> sums and counts (Engine)


def compute_table(
    params: Any,
    reference_logps: ReferenceFn,
    batches: Iterable[dict[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> ReferenceTable:
    """Runs `reference_logps` (`Engine.reference_logps`: host batch -> global (chosen sums, rejected sums, chosen
    counts, rejected counts)) over one pass of host-local batches; every host gets every result back. One batch
    stays in flight: batch n + 1 is dispatched before batch n's results are read, so host and device overlap."""
    ids, values = [], []

    def collect(outputs, local_ids) -> None:
        sc, sr, nc, nr = (np.asarray(x) for x in outputs)
        batch_ids = _gather_ids(local_ids)
        keep = batch_ids >= 0
        ids.append(batch_ids[keep])
        values.append(np.stack([sc, sr, nc, nr], axis=1)[keep])
        if progress:
            progress(len(ids))

    in_flight = None
    for local in batches:
        outputs = reference_logps(params, local)
        if in_flight is not None:
            collect(*in_flight)
        in_flight = (outputs, local["example_id"])
    if in_flight is not None:
        collect(*in_flight)
    if not ids:
        raise ValueError("the reference pass saw no batches")
    return ReferenceTable(np.concatenate(ids), np.concatenate(values))


def _gather_ids(local_ids: np.ndarray) -> np.ndarray:
    """Example ids of the global batch in block (process) order, on every host."""
    if jax.process_count() == 1:
        return np.asarray(local_ids)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local_ids), tiled=True))


def precompute(
    params: Any,
    reference_logps: ReferenceFn,
    batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    path: str,
) -> tuple[ReferenceTable, bool]:
    """(table, was_cached): loads `path` if present, else runs the pass over `batches()` and saves it."""
    if os.path.isfile(path):
        return ReferenceTable.load(path), True
    table = compute_table(params, reference_logps, batches())
    table.save(path)
    return table, False
