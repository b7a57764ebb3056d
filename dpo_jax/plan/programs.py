"""One jitted program compiled for a plan: its per-device memory, the compiler's cost estimate, its collectives.

The TPU compiler's cost analysis counts a `while` loop's body once (a scanned 32-layer model reports one layer's
FLOPs), so estimates of time are not read from the full program: plan/estimate.py compiles copies of it for their
counts (`loop_free_cost`) and scales them."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory", "exceeds the memory")


@dataclasses.dataclass
class Compiled:
    """What the compiler says of one program. Byte counts are per device."""

    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    generated_code_bytes: int = 0
    peak_bytes: int = 0  # arguments + outputs - aliased + temporaries (or the compiler's peak, if higher)
    compiler_flops: float = 0.0  # per device, a loop body counted once (see the module docstring)
    compiler_bytes: float = 0.0  # bytes accessed, per device, likewise
    compiler_seconds: float = 0.0  # the compiler's `optimal_seconds`, likewise (negative for large programs in the
    #   libtpu tested: reported, not used)
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # kind -> count, bytes,
    #   traffic_bytes (collectives_of)
    compile_seconds: float = 0.0
    error: str = ""  # the compiler refused: out of memory (does not fit), or another reason


def _dtype_bytes(name: str) -> int:
    if name == "pred":
        return 1
    bits = re.search(r"(\d+)", name)
    return max(int(bits.group(1)) // 8, 1) if bits else 4


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def group_size(line: str) -> int:
    """Devices in each of a collective's groups, from its replica_groups (the three forms the compiler writes);
    0 when not written (a collective-permute, or every device)."""
    mesh = _MESH_GROUPS.search(line)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[name]) for name in re.findall(r"'(\w+)'", mesh.group(2)) if name in sizes)
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota.group(2))
    listed = _LISTED_GROUPS.search(line)
    return len(listed.group(1).split(",")) if listed else 0


def traffic_bytes(kind: str, result_bytes: int, group: int) -> float:
    """Bytes one device receives for a collective with bandwidth-optimal (ring) algorithms over `group` devices:
    an all-gather or all-to-all receives all but its own share of the result, a reduce-scatter all but its own of
    the operand (group results), an all-reduce is both, a permute its result."""
    share = (group - 1) / group if group > 1 else (1.0 if group == 0 else 0.0)
    if kind == "all-gather" or kind == "all-to-all":
        return result_bytes * share
    if kind == "reduce-scatter":
        return result_bytes * (group - 1 if group else 1)
    if kind == "all-reduce":
        return 2 * result_bytes * share
    return float(result_bytes)  # collective-permute


def _shape_bytes(dtype: str, dims: str) -> int:
    return _dtype_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)


def collectives_of(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {count, bytes, traffic_bytes}} of the collectives in a compiled module's text, per device: bytes are
    each op's result, summed; traffic_bytes what the device receives (`traffic_bytes`). An async start counts its
    result (the second of its tuple; an all-reduce-start's tuple is all results). A loop body's collectives are
    counted once, as written."""
    out: dict[str, dict[str, float]] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        shapes, kind = match.group(1), match.group(2)
        sizes = [_shape_bytes(dtype, dims) for dtype, dims in _SHAPE.findall(shapes)]
        size = sizes[1] if match.group(3) and kind != "all-reduce" and len(sizes) > 1 else sum(sizes)
        entry = out.setdefault(kind, {"count": 0, "bytes": 0, "traffic_bytes": 0.0})
        entry["count"] += 1
        entry["bytes"] += size
        entry["traffic_bytes"] += traffic_bytes(kind, size, group_size(line))
    return out


def collective_traffic(collectives: dict[str, dict[str, float]]) -> float:
    return sum(entry["traffic_bytes"] for entry in collectives.values())


def is_out_of_memory(message: str) -> bool:
    return any(marker.lower() in message.lower() for marker in _OUT_OF_MEMORY)


# For counting only: the TPU compiler turns an FSDP matmul into a "windowed" loop that all-gathers the weights one
# window at a time (overlapping the collective), and counts that loop's body once like any other — one window of
# each matmul (Llama-3-8B forward on a v5p-64: 6.6e11 FLOPs counted with it, 4.3e12 without). Programs compiled
# for their counts turn it off; the program itself, compiled for its memory, keeps it.
COUNTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_program(lower: Callable, *abstract_args: Any, options: dict[str, Any] | None = None) -> Compiled:
    """Lowers (`lower`: a jitted function's `.lower`, static arguments bound) and compiles on abstract arguments
    (jax.ShapeDtypeStruct with shardings; `options`: XLA compiler options). An out-of-memory compile is a result
    (error set), not an exception; any other compiler error propagates."""
    start = time.perf_counter()
    try:
        executable = lower(*abstract_args).compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 — only out-of-memory is a plan's answer; the rest is re-raised
        if not is_out_of_memory(str(e)):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return Compiled(compile_seconds=time.perf_counter() - start, error=first[:500])
    seconds = time.perf_counter() - start
    memory = executable.memory_analysis()
    cost = executable.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    result = Compiled(
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        compiler_flops=float(cost.get("flops", 0.0)), compiler_bytes=float(cost.get("bytes accessed", 0.0)),
        compiler_seconds=float(cost.get("optimal_seconds", 0.0)),
        collectives=collectives_of(executable.as_text()), compile_seconds=seconds)
    # the runtime allocates the temporaries as one block beside arguments and outputs: that sum is what must fit
    # (the compiler's own liveness peak was lower where seen; it is used when higher)
    allocated = result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
    result.peak_bytes = max(int(getattr(memory, "peak_memory_in_bytes", 0) or 0), allocated)
    return result


class CountingOutOfMemory(RuntimeError):
    """A program compiled for its counts did not fit the chip (plan/estimate.py then falls back, or halves the
    batch)."""


def loop_free_cost(lower: Callable, *abstract_args: Any) -> tuple[float, float, float]:
    """(compiler FLOPs, compiler bytes accessed, collective bytes received) per device of a program compiled for
    its counts (plan/estimate.py), windowed matmul loops off (COUNTING_OPTIONS)."""
    compiled = compile_program(lower, *abstract_args, options=COUNTING_OPTIONS)
    if compiled.error:
        raise CountingOutOfMemory(compiled.error)
    return compiled.compiler_flops, compiled.compiler_bytes, collective_traffic(compiled.collectives)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of an abstract tree (each leaf's shard; replicated leaves whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
