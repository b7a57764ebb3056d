"""Next-token log-probabilities from final hidden states, without materialising the logits.

A [N, T, V] float32 logits tensor is the largest buffer in preference training (16 rows × 2048 tokens × 128k vocab
is 16 GiB). Here the sequence is cut into chunks; each chunk's logits live only inside a rematerialised scan step,
in forward and in backward, so peak memory scales with N·chunk·V instead of N·T·V. The batch axis is kept whole so
that a batch sharded over the mesh stays sharded; the vocabulary axis may be sharded too.

Alignment: `token_logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t])` for t ≥ 1; column 0 has no prediction
and is always 0 (a `loss_mask` 1 there is ignored). Masks are aligned with `input_ids`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_CHUNK_SIZE = 128


class SequenceLogProbs(NamedTuple):
    token_logps: Array  # [N, T] float32, 0 where not scored
    sums: Array  # [N] float32, Σ over scored tokens: log π(y|x)
    counts: Array  # [N] float32, number of scored tokens


def _chunk_logps(hidden: Array, targets: Array, kernel: Array, bias: Array | None, compute_dtype) -> Array:
    """log softmax(hidden @ kernel + bias)[targets] for one chunk: [N, C, D], [N, C] -> [N, C] float32."""
    logits = jnp.einsum(
        "ncd,dv->ncv",
        hidden.astype(compute_dtype),
        kernel.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(
    hidden: Array,
    kernel: Array,
    input_ids: Array,
    *,
    bias: Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compute_dtype: jnp.dtype | None = None,
    predecessor: Array | None = None,
    window: tuple[Array, int] | None = None,
    positions: Array | None = None,
    rows_per_gather: int = 1,
) -> Array:
    """Per-token next-token log-probs [N, T] in float32.

    predecessor: optional [N, T] int, the position whose hidden state predicts each token (default t - 1). A row
    that packs prompt + chosen + rejected (the shared-prompt layout) predicts the rejected response's first token
    from the prompt's last position, not from the chosen response's end. Positions with predecessor < 0 give 0.

    window: optional (starts [N] int, size S static): only tokens t in [start, start + S) are scored (the window
    is moved left to fit in T), the others give 0. The unembedding, the largest matmul of a large-vocabulary model,
    then runs on N·S positions instead of N·T: prompts, which are never scored, are skipped.

    positions: optional [N, S] int (S static; -1: no token): only these tokens are scored, the others give 0 —
    the same saving when a row's scored tokens are scattered (several pairs per row, data/layout.py `packed`).
    rows_per_gather = g > 1 (with positions [N / g, S]): each group of g consecutive rows is gathered as one
    sequence of g·T positions, so S bounds a group's scored tokens, not g times the fullest row's (on the ragged
    bench, 22 % fewer unembedding positions). Keep a group on one device (the step makes it a batch shard).

    hidden: [N, T, D] final (normed) hidden states; kernel: [D, V] unembedding (pass `embedding.T` for tied
    weights: XLA folds the transpose into the matmul); bias: optional [V]. The matmul runs in `compute_dtype`
    (default: hidden's dtype) with float32 accumulation; the kernel is cast inside each chunk, so its gradient
    accumulates across chunks in the kernel's own dtype (float32 master weights stay float32).
    """
    n, t, d = hidden.shape
    if kernel.ndim != 2 or kernel.shape[0] != d:
        raise ValueError(f"kernel must be [D={d}, V], got shape {kernel.shape}")
    if input_ids.shape != (n, t):
        raise ValueError(f"input_ids must be [N={n}, T={t}] like hidden, got {input_ids.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if predecessor is not None and predecessor.shape != (n, t):
        raise ValueError(f"predecessor must be [N={n}, T={t}] like input_ids, got {predecessor.shape}")
    compute_dtype = compute_dtype or hidden.dtype

    if rows_per_gather > 1:
        if positions is None or n % rows_per_gather:
            raise ValueError(f"rows_per_gather = {rows_per_gather} needs positions and a row count ({n}) it divides")
        g = rows_per_gather
        offsets = (jnp.arange(n) % g * t)[:, None]  # a row's place in its group's sequence
        pred = jnp.broadcast_to(jnp.arange(t) - 1, (n, t)) if predecessor is None else predecessor
        pred = jnp.where(pred >= 0, pred + offsets, -1).reshape(n // g, g * t)
        lp = token_logprobs(hidden.reshape(n // g, g * t, d), kernel, input_ids.reshape(n // g, g * t), bias=bias,
                            chunk_size=chunk_size, compute_dtype=compute_dtype, predecessor=pred,
                            positions=positions)
        return lp.reshape(n, t)
    if window is not None and window[1] < t:
        starts, size = window
        starts = jnp.clip(starts, 0, t - size)
        positions = starts[:, None] + jnp.arange(size)  # [N, S]
        sources_at = jnp.take_along_axis(predecessor, positions, axis=1) if predecessor is not None \
            else positions - 1
        targets = jnp.take_along_axis(input_ids, positions, axis=1)
        lp = _gathered_logps(hidden, sources_at, targets, kernel, bias, chunk_size, compute_dtype)
        place = jax.vmap(lambda row, values, start: jax.lax.dynamic_update_slice(row, values, (start,)))
        return place(jnp.zeros((n, t), jnp.float32), lp, starts)
    if positions is not None:
        at = jnp.maximum(positions, 0)
        sources_at = jnp.take_along_axis(predecessor, at, axis=1) if predecessor is not None else at - 1
        lp = _gathered_logps(hidden, jnp.where(positions >= 0, sources_at, -1),
                             jnp.take_along_axis(input_ids, at, axis=1), kernel, bias, chunk_size, compute_dtype)
        return jnp.zeros((n, t), jnp.float32).at[jnp.arange(n)[:, None], at].add(lp)
    if predecessor is None:  # positions 0..T-2 predict 1..T-1
        return jnp.pad(_chunked_logps(hidden[:, :-1], input_ids[:, 1:], kernel, bias, chunk_size, compute_dtype),
                       ((0, 0), (1, 0)))
    return _gathered_logps(hidden, predecessor, input_ids, kernel, bias, chunk_size, compute_dtype)


def _gathered_logps(hidden, sources_at, targets, kernel, bias, chunk_size, compute_dtype) -> Array:
    """log p(targets[:, j] | hidden[:, sources_at[:, j]]) [N, L]; 0 where sources_at < 0."""
    sources = jnp.take_along_axis(hidden, jnp.maximum(sources_at, 0)[..., None], axis=1)
    lp = _chunked_logps(sources, targets, kernel, bias, chunk_size, compute_dtype)
    return jnp.where(sources_at >= 0, lp, 0.0)


def _chunked_logps(sources, targets, kernel, bias, chunk_size, compute_dtype) -> Array:
    """[N, L, D] hidden states and [N, L] targets -> [N, L] log-probs, the logits alive one chunk at a time."""
    n, steps, d = sources.shape
    num_chunks = -(-max(steps, 1) // chunk_size)
    chunk = -(-max(steps, 1) // num_chunks)  # balanced: at most num_chunks - 1 padded positions, not chunk - 1
    pad = num_chunks * chunk - steps
    h = jnp.pad(sources, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets, ((0, 0), (0, pad)))
    # [N, K·C, ·] -> [K, N, C, ·]: scan over chunks, batch axis intact.
    h = h.reshape(n, num_chunks, chunk, d).swapaxes(0, 1)
    y = y.reshape(n, num_chunks, chunk).swapaxes(0, 1)

    chunk_fn = jax.checkpoint(_chunk_logps, static_argnums=(4,), policy=jax.checkpoint_policies.nothing_saveable)

    def body(carry, xs):
        h_c, y_c = xs
        return carry, chunk_fn(h_c, y_c, kernel, bias, compute_dtype)

    _, lp = jax.lax.scan(body, None, (h, y))  # [K, N, C]
    return lp.swapaxes(0, 1).reshape(n, num_chunks * chunk)[:, :steps]


def sequence_logprobs(
    hidden: Array,
    kernel: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    bias: Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compute_dtype: jnp.dtype | None = None,
    predecessor: Array | None = None,
    window: tuple[Array, int] | None = None,
    positions: Array | None = None,
    rows_per_gather: int = 1,
) -> SequenceLogProbs:
    """Masked per-token log-probs plus their per-sequence sums and counts (log π(y|x) and |y|), float32.
    With a window or positions, every scored token (loss_mask 1) must be inside (the caller's guarantee)."""
    token_lp = token_logprobs(
        hidden, kernel, input_ids, bias=bias, chunk_size=chunk_size, compute_dtype=compute_dtype,
        predecessor=predecessor, window=window, positions=positions, rows_per_gather=rows_per_gather,
    )
    return _masked(token_lp, loss_mask, predecessor)


def scored_mask(loss_mask, predecessor=None):
    """[..., T] bool: the tokens whose log-prob counts — loss_mask 1 and a position to predict them from (t ≥ 1, or
    predecessor ≥ 0 in a packed row). The one definition; numpy in, numpy out; jax in, jax out."""
    has_predecessor = np.arange(loss_mask.shape[-1]) > 0 if predecessor is None else predecessor >= 0
    return (loss_mask > 0) & has_predecessor


def _masked(token_lp: Array, loss_mask: Array, predecessor: Array | None = None) -> SequenceLogProbs:
    mask = scored_mask(jnp.asarray(loss_mask), predecessor).astype(jnp.float32)
    token_lp = token_lp * mask
    return SequenceLogProbs(token_lp, jnp.sum(token_lp, axis=-1), jnp.sum(mask, axis=-1))


def naive_sequence_logprobs(
    hidden: Array, kernel: Array, input_ids: Array, loss_mask: Array, *, bias: Array | None = None
) -> SequenceLogProbs:
    """The textbook full-logits computation (materialises [N, T, V]); the reference the chunked path is tested on."""
    logits = jnp.einsum("ntd,dv->ntv", hidden, kernel, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_lp = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return _masked(jnp.pad(token_lp, ((0, 0), (1, 0))), loss_mask)
