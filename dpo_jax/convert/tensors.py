"""Streaming tensor I/O for HF checkpoint directories: one tensor in memory at a time, in either direction.

Reading uses safetensors' `safe_open` (memory-mapped; `get_tensor` copies out one tensor), across the shards named
in `model.safetensors.index.json`. `pytorch_model.bin` is read only when torch is installed (it is never a runtime
dependency), with `torch.load(mmap=True, weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointReader:
    """Maps tensor names to the file holding them and reads them one by one as numpy arrays."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, str] = {}
        self._open: dict[str, object] = {}
        self.format = self._discover()

    def _discover(self) -> str:
        d = self.directory
        for index, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if os.path.isfile(os.path.join(d, index)):
                with open(os.path.join(d, index)) as f:
                    try:
                        weight_map = json.load(f)["weight_map"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{os.path.join(d, index)}: not a valid index file ({e})") from None
                self._where = {k: os.path.join(d, v) for k, v in weight_map.items()}
                missing = sorted({p for p in self._where.values() if not os.path.isfile(p)})
                if missing:
                    raise ValueError(f"{os.path.join(d, index)} names shard files that do not exist: {missing}")
                return kind
        if os.path.isfile(os.path.join(d, SAFE_SINGLE)):
            path = os.path.join(d, SAFE_SINGLE)
            with safe_open(path, "numpy") as f:
                self._where = {k: path for k in f.keys()}
            return "safetensors"
        if os.path.isfile(os.path.join(d, BIN_SINGLE)):
            path = os.path.join(d, BIN_SINGLE)
            self._where = {k: path for k in self._torch_file(path)}
            return "bin"
        raise ValueError(f"{d}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _torch_file(self, path: str):
        if path not in self._open:
            try:
                import torch  # noqa: F401  (only for .bin checkpoints)
            except ImportError:
                raise ValueError(f"{path}: reading pytorch_model.bin needs torch installed; convert the checkpoint "
                                 "to safetensors, or pip install torch==2.13.0") from None
            self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path]

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """Reads one tensor (a fresh numpy array; bfloat16 stays bfloat16 via ml_dtypes)."""
        path = self._where[name]
        if self.format == "bin":
            import torch

            t = self._torch_file(path)[name]
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes'
                import ml_dtypes

                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return t.numpy().copy()
        if path not in self._open:
            self._open[path] = safe_open(path, "numpy")
        return self._open[path].get_tensor(name)

    def close(self) -> None:
        for handle in self._open.values():
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs as safetensors shards of at most `max_shard_bytes` (one file if it all fits),
    holding one shard's tensors at a time; writes the index when there are several. Returns the file names."""
    os.makedirs(directory, exist_ok=True)
    files, weight_map, pending, pending_bytes = [], {}, {}, 0
    tmp_names = []

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"_shard_{len(tmp_names):05d}.tmp"
            save_file(pending, os.path.join(directory, name), metadata={"format": "pt"})
            tmp_names.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if pending and pending_bytes + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        pending_bytes += array.nbytes
    flush()
    total = len(tmp_names)
    for i, (tmp, names) in enumerate(tmp_names):
        final = SAFE_SINGLE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
        files.append(final)
        weight_map.update({n: final for n in names})
    index_path = os.path.join(directory, SAFE_INDEX)
    if total > 1:
        total_size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        with open(index_path, "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(index_path):
        os.remove(index_path)
    return files

