"""TPU chips a plan targets: HBM and bf16 peak per device (vendor spec sheets), and a topology's abstract devices."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per device (a v4 chip shows two devices, one per TensorCore: half the chip's HBM each)
    peak_tflops: float  # dense bf16, per device


# By `device.device_kind`, exactly (v5p's kind is "TPU v5", a prefix of v5e's "TPU v5 lite").
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("v4 (one TensorCore)", 16 * GIB, 137.5),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197.0),
    "TPU v5": Chip("v5p", 95 * GIB, 459.0),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918.0),
}


def chip_of(device: Any) -> Chip:
    kind = device.device_kind
    if kind not in CHIPS:
        raise ValueError(f"no HBM / peak figures for device kind {kind!r}; known: {', '.join(CHIPS)} "
                         "(dpo_jax/plan/chips.py)")
    return CHIPS[kind]


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """The abstract devices of a TPU slice (`v5e:4x4`, `v5p:4x4x4`, ...) times `num_slices`, from libtpu's compiler
    (the `tpu` extra). No TPU is needed, and nothing can run on them: they are for lowering and compiling."""
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
        description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 — libtpu missing, or a name it does not know: say which and how to fix
        text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology {topology!r}: no TPU compiler could describe it ({text}). Plans need libtpu: "
                         "pip install -e '.[tpu]'; names look like v5e:4x4, v5p:2x2x1, v6e:2x4") from None
    return list(description.devices)
