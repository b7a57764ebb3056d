"""What the TPU compiler's "bytes accessed" counts (docs/ARCHITECTURE.md, issue 29): one bf16 MLP and one XLA
attention compiled for one v5e chip, the count beside the program's distinct bytes.

    pip install -e ".[tpu]" && JAX_PLATFORMS=cpu python bench/tpu_bytes_probe.py

Measured (libtpu 0.0.42.1): MLP 1.78 GB counted vs 0.84 GB distinct (with its hidden activation); attention at
2,048 tokens 0.10 GB counted vs 0.067 GB of q, k, v and output (the scores, 0.54 GB in float32, never counted).
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.plan.chips import topology_devices


def counted_bytes(fn, *shapes) -> float:
    mesh = Mesh(topology_devices("v5e:2x2")[:1], ("x",))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec())) for s in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


def attention(q, k, v):
    probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), -1).astype(q.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def main() -> None:
    tokens, model, hidden = 8192, 4096, 14336
    mlp = counted_bytes(lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2, (tokens, model), (model, hidden), (hidden, model))
    distinct = 2 * (2 * tokens * model + 2 * model * hidden) + 2 * 2 * tokens * hidden  # bf16; activation out + in
    print(f"MLP: counted {mlp / 1e9:.2f} GB, distinct {distinct / 1e9:.2f} GB")
    shape = (1, 32, 2048, 128)
    counted = counted_bytes(attention, shape, shape, shape)
    print(f"attention: counted {counted / 1e9:.3f} GB, q k v and output {4 * 2 * 32 * 2048 * 128 / 1e9:.3f} GB, "
          f"float32 scores {4 * 32 * 2048 * 2048 / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
