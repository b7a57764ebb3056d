"""Flash attention for this project's rows, as a Pallas TPU kernel (forward and backward), the mask computed in the
kernel from per-token metadata instead of read from a [T, T] array.

Why our own kernel: splash attention's block-sparse masks are static (numpy, fixed when the kernel is built) and
its segment ids allow only equality; our rows need a data-dependent rule. A query at slot i sees key slot j when
    j <= i, key j is a real token, and
    (segment_i == segment_j  or  (role_j == shared prompt and group_i == group_j)), and
    position_i - position_j < sliding_window (positions, not slots: they restart per packed pair)
(segment = SEGMENT_STRIDE · group + role, models/decoder.py): a response sees its own pair's prompt and itself,
never the other response, never another pair. Blocks that no query of the block can use are skipped — above the
causal diagonal, or whose keys' groups cannot meet the queries' (per-block group ranges, prefetched to scalar
memory) — so a packed row of many pairs costs about the sum of its pairs, not T², and nothing T × T is ever stored:
memory grows linearly in T.

Fully masked query rows (padding) give 0 (XLA's attention gives the mean of the values); no real token reads
them. The sliding window is applied inside blocks, not used to skip them. On a non-TPU backend the kernel runs in
Pallas interpret mode (tests: small shapes)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
_PRECISION = jax.lax.Precision.DEFAULT  # explicit: a global "highest" matmul precision is not lowerable here
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
STRIDE_BITS = 2  # segment = group << 2 | role: decoder.SEGMENT_STRIDE = 4 (not imported: the decoder imports this
#   module). Shifts and masks, not // and %: Mosaic lowers those through a sign op that needs a real TPU present


class Metadata(NamedTuple):
    """Per-token mask inputs, laid out for TPU tiles: query side [B, T, LANES], key side [B, SUBLANES, T]; and
    per-block group ranges [B, blocks] for skipping (in scalar memory)."""

    q_segment: jax.Array
    q_position: jax.Array
    k_segment: jax.Array
    k_position: jax.Array
    q_group_min: jax.Array
    q_group_max: jax.Array
    k_group_min: jax.Array
    k_group_max: jax.Array


class Static(NamedTuple):
    block_q: int
    block_k: int
    scale: float
    shared_segment: int  # -1: none
    window: int  # 0: none
    groups: int  # KV heads share a group of groups query heads (GQA)
    interpret: bool


def _metadata(segment: jax.Array, positions: jax.Array, block_q: int, block_k: int) -> Metadata:
    """segment: [B, T] int32, -1 for padding keys; positions [B, T]."""
    b, t = segment.shape
    group = jnp.where(segment >= 0, segment >> STRIDE_BITS, -1)
    big = jnp.iinfo(jnp.int32).max

    def ranges(block):
        g = group.reshape(b, t // block, block)
        valid = g >= 0
        return jnp.min(jnp.where(valid, g, big), -1), jnp.max(jnp.where(valid, g, -1), -1)

    qmin, qmax = ranges(block_q)
    kmin, kmax = ranges(block_k)
    lanes = lambda x: jnp.broadcast_to(x[:, :, None], (b, t, LANES))  # noqa: E731
    sublanes = lambda x: jnp.broadcast_to(x[:, None, :], (b, SUBLANES, t))  # noqa: E731
    return Metadata(lanes(segment), lanes(positions), sublanes(segment), sublanes(positions), qmin, qmax, kmin, kmax)


def _block_mask(s: Static, qi, ki, q_segment, q_position, k_segment, k_position) -> jax.Array:
    """[block_q, block_k] bool: the rule in the module docstring, for query block qi and key block ki."""
    q_seg, k_seg = q_segment[:, :1], k_segment[:1, :]  # [bq, 1], [1, bk]
    q_slot = qi * s.block_q + jax.lax.broadcasted_iota(jnp.int32, (s.block_q, s.block_k), 0)
    k_slot = ki * s.block_k + jax.lax.broadcasted_iota(jnp.int32, (s.block_q, s.block_k), 1)
    allowed = (k_slot <= q_slot) & (k_seg >= 0)
    same = q_seg == k_seg
    if s.shared_segment >= 0:
        role_mask = (1 << STRIDE_BITS) - 1
        same = same | (((k_seg & role_mask) == s.shared_segment) & ((q_seg >> STRIDE_BITS) == (k_seg >> STRIDE_BITS)))
    allowed = allowed & same
    if s.window:
        allowed = allowed & (q_position[:, :1] - k_position[:1, :] < s.window)
    return allowed


def _live(s: Static, b, qi, ki, qmin, qmax, kmin, kmax) -> jax.Array:
    """Whether block (qi, ki) of row b can hold an allowed pair (False: skip it)."""
    causal = ki * s.block_k <= qi * s.block_q + s.block_q - 1
    meet = (kmin[b, ki] <= qmax[b, qi]) & (kmax[b, ki] >= qmin[b, qi])
    return causal & meet


def _scores(s: Static, q, k, mask):
    x = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=_PRECISION) * s.scale
    return jnp.where(mask, x, MASK_VALUE)


def _forward_kernel(s: Static, qmin, qmax, kmin, kmax, q_ref, k_ref, v_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref,
                    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _():
        m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(_live(s, b, qi, ki, qmin, qmax, kmin, kmax))
    def _():
        mask = _block_mask(s, qi, ki, qseg_ref[0], qpos_ref[0], kseg_ref[0], kpos_ref[0])
        x = _scores(s, q_ref[0, 0], k_ref[0, 0], mask)
        m_prev = m_scratch[...]  # [bq, LANES], every lane the same
        m_new = jnp.maximum(m_prev, jnp.max(x, axis=1, keepdims=True))
        p = jnp.exp(x - m_new[:, :1]) * mask
        alpha = jnp.exp(m_prev - m_new)
        l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scratch[...] = m_new
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[0, 0], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=_PRECISION)
        acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        l = l_scratch[...][:, :1]
        safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[0, 0] = jnp.where(l == 0.0, 0.0, acc_scratch[...] / safe).astype(o_ref.dtype)
        lse_ref[0, 0] = jnp.where(l == 0.0, 0.0, m_scratch[...][:, :1] + jnp.log(safe))


def _specs(s: Static, head_dim: int, key_major: bool):
    """BlockSpecs of q/o, k/v and the metadata for a grid (b, h, i, j): (qi, ki) = (i, j), or (j, i) when the key
    block is the outer one (the dk/dv kernel)."""
    def blocks(i, j):
        return (j, i) if key_major else (i, j)

    def q_map(b, h, i, j, *_):
        return b, h, blocks(i, j)[0], 0

    def k_map(b, h, i, j, *_):
        return b, jax.lax.div(h, s.groups), blocks(i, j)[1], 0  # lax.div: `//` lowers through sign (see above)

    q_spec = pl.BlockSpec((1, 1, s.block_q, head_dim), q_map)
    k_spec = pl.BlockSpec((1, 1, s.block_k, head_dim), k_map)
    row_spec = pl.BlockSpec((1, 1, s.block_q, 1), q_map)
    qmeta = pl.BlockSpec((1, s.block_q, LANES), lambda b, h, i, j, *_: (b, blocks(i, j)[0], 0))
    kmeta = pl.BlockSpec((1, SUBLANES, s.block_k), lambda b, h, i, j, *_: (b, 0, blocks(i, j)[1]))
    return q_spec, k_spec, row_spec, qmeta, kmeta


def _params(inner: str):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", inner))


def _cost(q: jax.Array, k: jax.Array, matmuls: int) -> pl.CostEstimate:
    """What the compiler's cost analysis counts for a kernel (opaque to it otherwise): `matmuls` T x T x D
    products per head over the causal half (skipped blocks of other pairs not discounted: an upper bound)."""
    b, h, t, d = q.shape
    flops = matmuls * b * h * t * t * d  # 2 · T²/2 · D per product
    moved = sum(x.size * x.dtype.itemsize for x in (q, k)) * 3
    return pl.CostEstimate(flops=flops, transcendentals=b * h * t * t // 2, bytes_accessed=moved)


def _forward(s: Static, q, k, v, meta: Metadata):
    """q [B, H, T, D], k/v [B, KV, T, D] -> (o [B, H, T, D], lse [B, H, T, 1] float32)."""
    b, h, t, d = q.shape
    q_spec, k_spec, row_spec, qmeta, kmeta = _specs(s, d, key_major=False)
    grid = (b, h, t // s.block_q, t // s.block_k)
    return pl.pallas_call(
        functools.partial(_forward_kernel, s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid,
            in_specs=[q_spec, k_spec, k_spec, qmeta, qmeta, kmeta, kmeta],
            out_specs=[q_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((s.block_q, LANES), jnp.float32), pltpu.VMEM((s.block_q, LANES), jnp.float32),
                            pltpu.VMEM((s.block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        compiler_params=_params("arbitrary"), interpret=s.interpret, cost_estimate=_cost(q, k, 2),
    )(meta.q_group_min, meta.q_group_max, meta.k_group_min, meta.k_group_max, q, k, v, meta.q_segment,
      meta.q_position, meta.k_segment, meta.k_position)


def _probabilities(s: Static, qi, ki, q, k, lse, qseg_ref, qpos_ref, kseg_ref, kpos_ref):
    mask = _block_mask(s, qi, ki, qseg_ref[0], qpos_ref[0], kseg_ref[0], kpos_ref[0])
    return jnp.exp(_scores(s, q, k, mask) - lse) * mask


def _dq_kernel(s: Static, qmin, qmax, kmin, kmax, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
               qpos_ref, kseg_ref, kpos_ref, dq_ref, dq_scratch):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(_live(s, b, qi, ki, qmin, qmax, kmin, kmax))
    def _():
        k = k_ref[0, 0]
        p = _probabilities(s, qi, ki, q_ref[0, 0], k, lse_ref[0, 0], qseg_ref, qpos_ref, kseg_ref, kpos_ref)
        dp = jax.lax.dot_general(do_ref[0, 0], v_ref[0, 0], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=_PRECISION)
        ds = p * (dp - delta_ref[0, 0]) * s.scale
        dq_scratch[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32, precision=_PRECISION)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        dq_ref[0, 0] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(s: Static, qmin, qmax, kmin, kmax, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                qpos_ref, kseg_ref, kpos_ref, dk_ref, dv_ref, dk_scratch, dv_scratch):
    b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    @pl.when(_live(s, b, qi, ki, qmin, qmax, kmin, kmax))
    def _():
        q, do = q_ref[0, 0], do_ref[0, 0]
        p = _probabilities(s, qi, ki, q, k_ref[0, 0], lse_ref[0, 0], qseg_ref, qpos_ref, kseg_ref, kpos_ref)
        dv_scratch[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32, precision=_PRECISION)
        dp = jax.lax.dot_general(do, v_ref[0, 0], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                 precision=_PRECISION)
        ds = p * (dp - delta_ref[0, 0]) * s.scale
        dk_scratch[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32, precision=_PRECISION)

    @pl.when(qi == pl.num_programs(3) - 1)
    def _():
        dk_ref[0, 0] = dk_scratch[...].astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_scratch[...].astype(dv_ref.dtype)


def _backward(s: Static, q, k, v, o, lse, do, meta: Metadata):
    b, h, t, d = q.shape
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    scalars = (meta.q_group_min, meta.q_group_max, meta.k_group_min, meta.k_group_max)
    tensors = (q, k, v, do, lse, delta, meta.q_segment, meta.q_position, meta.k_segment, meta.k_position)

    q_spec, k_spec, row_spec, qmeta, kmeta = _specs(s, d, key_major=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, h, t // s.block_q, t // s.block_k),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, qmeta, qmeta, kmeta, kmeta],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((s.block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_params("arbitrary"),
        interpret=s.interpret, cost_estimate=_cost(q, k, 3),
    )(*scalars, *tensors)

    q_spec, k_spec, row_spec, qmeta, kmeta = _specs(s, d, key_major=True)
    per_head_k = pl.BlockSpec((1, 1, s.block_k, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, h, t // s.block_k, t // s.block_q),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, qmeta, qmeta, kmeta, kmeta],
            out_specs=[per_head_k, per_head_k],
            scratch_shapes=[pltpu.VMEM((s.block_k, d), jnp.float32), pltpu.VMEM((s.block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, h, t, d), k.dtype), jax.ShapeDtypeStruct((b, h, t, d), v.dtype)],
        compiler_params=_params("arbitrary"), interpret=s.interpret, cost_estimate=_cost(q, k, 4),
    )(*scalars, *tensors)
    kv = k.shape[1]
    fold = lambda x: x.reshape(b, kv, s.groups, t, d).sum(2, dtype=jnp.float32).astype(x.dtype)  # noqa: E731
    return dq, fold(dk), fold(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(s: Static, q, k, v, meta):
    return _forward(s, q, k, v, meta)[0]


def _attention_fwd(s, q, k, v, meta):
    o, lse = _forward(s, q, k, v, meta)
    return o, (q, k, v, o, lse, meta)


def _attention_bwd(s, residuals, do):
    q, k, v, o, lse, meta = residuals
    dq, dk, dv = _backward(s, q, k, v, o, lse, do, meta)
    return dq, dk, dv, jax.tree.map(lambda x: None, meta)


_attention.defvjp(_attention_fwd, _attention_bwd)


def pair_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array,
                   segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                   shared_segment: int | None = None, sliding_window: int | None = None, scale: float,
                   block: int = 128, interpret: bool = False) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D]: causal attention under the mask rule above.
    key_valid [B, T] (1: a real token); segment_ids / positions [B, T] (None: one segment; slot positions).
    T is padded to a multiple of the block internally (padding keys are invalid)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    size = min(block, -(-t // SUBLANES) * SUBLANES)
    padded = -(-t // size) * size
    segment = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    segment = jnp.where(key_valid.astype(bool), segment, -1)
    position = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else \
        positions.astype(jnp.int32)
    if padded != t:
        extra = ((0, 0), (0, padded - t))
        segment, position = jnp.pad(segment, extra, constant_values=-1), jnp.pad(position, extra)
        q, k, v = (jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))) for x in (q, k, v))
    s = Static(size, size, float(scale), -1 if shared_segment is None else int(shared_segment),
               int(sliding_window or 0), h // kv, bool(interpret))

    def local(q, k, v, segment, position):  # one device's rows and heads
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = _attention(s, heads_first(q), heads_first(k), heads_first(v), _metadata(segment, position, size, size))
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment, position)[:, :t]
    # A Mosaic kernel is not partitioned by XLA: map it over the mesh (sharding.on_mesh puts the mesh in context),
    # rows over every axis but `tensor` that divides them, heads over `tensor` when both head counts divide
    rows_axes, size_rows = [], 1
    for axis in mesh.axis_names:
        if axis != "tensor" and b % (size_rows * mesh.shape[axis]) == 0:
            rows_axes.append(axis)
            size_rows *= mesh.shape[axis]
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and h % tensor == 0 and kv % tensor == 0 else None
    rows = tuple(rows_axes) or None
    spec4, spec2 = jax.sharding.PartitionSpec(rows, None, heads, None), jax.sharding.PartitionSpec(rows, None)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2, spec2), out_specs=spec4,
                           check_vma=False)
    return mapped(q, k, v, segment, position)[:, :t]
