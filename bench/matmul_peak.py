"""The machine's measured JAX matmul peak: the denominator for "fraction of peak" on hardware with no spec sheet.

    python bench/matmul_peak.py [--dtype float32]

Best of several square and model-shaped matmuls, each timed after its compile, best of 5 runs.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (2048, 512, 2048), (2048, 2048, 512))


def matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", runs: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def measure_matmul_peak(dtype: str = "float32") -> dict:
    """{'peak_gflops': best, 'by_shape': {'MxKxN': GFLOP/s}} on jax.devices()[0]."""
    by_shape = {"x".join(map(str, s)): matmul_gflops(*s, dtype=dtype) for s in SHAPES}
    return {"peak_gflops": max(by_shape.values()), "by_shape": by_shape, "dtype": dtype,
            "device": jax.devices()[0].device_kind}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32")
    print(json.dumps(measure_matmul_peak(p.parse_args().dtype), indent=1))
