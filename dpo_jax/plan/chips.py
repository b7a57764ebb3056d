"""TPU chips a plan targets: HBM per device (vendor spec sheets; the bf16 peak is flops.py's), and a topology's
abstract devices."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dpo_jax.flops import peak_tflops

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per device
    peak_tflops: float  # dense bf16, per device
    hbm_bytes_per_second: float
    ici_bytes_per_second: float  # what one chip can receive over all its ICI links: half the bidirectional figure


# By `device.device_kind`, exactly (v5p's kind is "TPU v5", a prefix of v5e's "TPU v5 lite"). Not v4: its
# topologies show a device per TensorCore, its VMs one per chip (megacore), so no one figure per device holds.
HBM: dict[str, tuple[str, int, float, float]] = {  # name, HBM bytes, HBM and bidirectional ICI bytes per second
    "TPU v5 lite": ("v5e", 16 * GIB, 819e9, 400e9), "TPU v5": ("v5p", 95 * GIB, 2765e9, 1200e9),
    "TPU v6 lite": ("v6e", 32 * GIB, 1640e9, 800e9)}


def chip_of(device: Any) -> Chip:
    kind = device.device_kind
    if kind not in HBM:
        raise ValueError(f"no HBM figures for device kind {kind!r}; known: {', '.join(HBM)} "
                         "(dpo_jax/plan/chips.py)")
    name, hbm, bandwidth, ici = HBM[kind]
    return Chip(name, hbm, peak_tflops(kind), bandwidth, ici / 2)


# Accelerator types (gcloud's names) -> the compiler's topology names: chips per slice -> the standard shape
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_ACCELERATORS = {"v5litepod": ("v5e", 1, _SHAPES_2D), "v5e": ("v5e", 1, _SHAPES_2D), "v6e": ("v6e", 1, _SHAPES_2D),
                 "v5p": ("v5p", 2, _SHAPES_3D), "v4": ("v4", 2, _SHAPES_3D)}  # (name, cores per chip, shapes)


def topology_name(name: str) -> str:
    """`v5p-64` (gcloud's accelerator type: v4 and v5p count TensorCores, two per chip) -> `v5p:2x4x4`; a topology
    name (`v5e:4x4`) is returned as it is."""
    kind, dash, count = name.rpartition("-")
    if ":" in name or not dash or kind not in _ACCELERATORS or not count.isdigit():
        return name
    prefix, cores, shapes = _ACCELERATORS[kind]
    chips = int(count) // cores
    if chips not in shapes:
        raise ValueError(f"--topology {name!r}: {chips} chips has no standard slice shape; give it as "
                         f"{prefix}:AxB{'xC' if shapes is _SHAPES_3D else ''}")
    return f"{prefix}:{shapes[chips]}"


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """The abstract devices of a TPU slice (`v5e:4x4`, `v5p:4x4x4`, or `v5p-128`, ...) times `num_slices`, from
    libtpu's compiler (the `tpu` extra). No TPU is needed, and nothing can run on them: they are for lowering and
    compiling."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax without the module
        raise ValueError(f"this jax has no jax.experimental.topologies ({e})") from None
    if num_slices < 1:
        raise ValueError(f"--num_slices = {num_slices}: must be >= 1")
    # Only the compiler is used: several processes may hold it at once (libtpu otherwise takes a host-wide lock, and
    # a second plan, or a test's subprocess, would fail)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        description = topologies.get_topology_desc(topology_name=topology_name(topology), platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 — libtpu missing, or a name it does not know: say which and how to fix
        text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology {topology!r}: no TPU compiler could describe it ({text}). Plans need libtpu: "
                         "pip install -e '.[tpu]'; names look like v5e:4x4, v5p:2x2x1, v6e:2x4") from None
    return list(description.devices)


def roofline_seconds(flops: float, bytes_accessed: float, model_flops: float, chip: Chip,
                     collective_bytes: float = 0.0) -> float:
    """A step's time per device from the compiler's counts: compute at the bf16 peak, HBM traffic at the chip's
    bandwidth or collective traffic (bytes received, programs.traffic_bytes) at its ICI bandwidth, whichever is
    longest — each overlapping the others, so a floor. The compute is at least the model's own FLOPs
    (`model_flops`, per device): a guard for counts below them (before windowed matmul loops were turned off for
    counting, programs.COUNTING_OPTIONS, they were 0.69-0.76x on Llama shapes)."""
    return max(max(flops, model_flops) / (chip.peak_tflops * 1e12), bytes_accessed / chip.hbm_bytes_per_second,
               collective_seconds(collective_bytes, chip))


def collective_seconds(collective_bytes: float, chip: Chip) -> float:
    """Collective traffic per device over the chip's ICI ingress (every collective taken as within one slice)."""
    return collective_bytes / chip.ici_bytes_per_second
