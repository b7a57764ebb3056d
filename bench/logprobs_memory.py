"""Compiled memory of log-prob value-and-grad: naive full logits vs the chunked scan.

    python bench/logprobs_memory.py            # prints a markdown table (docs/PERFORMANCE.md has the results)

Nothing is executed: each variant is lowered and compiled for the CPU and `memory_analysis()` reports the XLA
temp buffer size, the number the issue asks about (the [N, T, V] float32 logits and their gradient live there).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from dpo_jax.logprobs import naive_sequence_logprobs, sequence_logprobs


def temp_bytes(fn, n, t, d, v, dtype, **kw) -> tuple[int, float]:
    def loss(h, k, ids, m):
        return jnp.sum(fn(h, k, ids, m, **kw).sums)

    specs = (jax.ShapeDtypeStruct((n, t, d), dtype), jax.ShapeDtypeStruct((d, v), jnp.float32),
             jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, t), jnp.float32))
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4, help="N: sequences (2 x pairs)")
    p.add_argument("--width", type=int, default=64, help="D: hidden size (small: only the logits matter here)")
    args = p.parse_args()
    n, d = args.rows, args.width
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; N={n}, D={d}; temp = XLA temp buffers of "
          "jit(value_and_grad) w.r.t. hidden and unembedding\n")
    print("| V | T | dtype | path | chunk | temp MiB | temp / (N·T·V·4) | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for v in (50304, 128256):
        for t in (512, 2048):
            for dtype in (jnp.float32, jnp.bfloat16):
                full = n * t * v * 4
                rows = [("naive", None, naive_sequence_logprobs, {})]
                rows += [("chunked", c, sequence_logprobs, {"chunk_size": c}) for c in (64, 128, 256)]
                for name, chunk, fn, kw in rows:
                    if name == "naive" and v * t > 50304 * 2048:
                        continue  # several GiB of logits: the point is made at the smaller size
                    b, secs = temp_bytes(fn, n, t, d, v, dtype, **kw)
                    print(f"| {v} | {t} | {jnp.dtype(dtype).name} | {name} | {chunk or '-'} | {b / 2**20:,.0f} | "
                          f"{b / full:.3f} | {secs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
