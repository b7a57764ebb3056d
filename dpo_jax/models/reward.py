"""A reward model: the one `Decoder` with a scalar `score` head ([D] -> 1, no bias, as transformers'
`*ForSequenceClassification`), read at each sequence's last token.

"Last token" is transformers' rule, so scores match an exported or imported HF checkpoint: the rightmost attended
token whose id is not `ModelConfig.pad_token_id` (left or right padding alike; with pad = EOS a trailing EOS is
skipped, as in HF). Without a pad id, the last attended token.

A reward model starts from a policy (the SFT model, as Stiennon et al. and TRL do): its body is kept, the language-
model head dropped, and the score head drawn from N(0, 1/(D+1)) — the initialization of OpenAI's
lm-human-preferences reward head — so the initial rewards are small but the body gets gradients from step one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder
from dpo_jax.models.placement import place_on_mesh
from dpo_jax.sharding import batch_sharding, data_parallel_size, on_mesh

Array = jax.Array
_LM_HEAD = ("lm_head_kernel", "lm_head_bias")


def reward_model_config(policy: ModelConfig, pad_token_id: int | None) -> ModelConfig:
    """The reward model of a policy's architecture."""
    return policy.replace(head="score", pad_token_id=pad_token_id)


def as_reward_model(policy: ModelConfig, params: dict, pad_token_id: int | None, rng: Array
                    ) -> tuple[ModelConfig, dict]:
    """(config, params) of a policy -> those of a reward model with the same body and a fresh score head."""
    if policy.head != "lm":
        raise ValueError(f"as_reward_model: the model already has a {policy.head!r} head")
    config = reward_model_config(policy, pad_token_id)
    d = policy.hidden_size
    kernel = jax.random.normal(rng, (d, 1), jnp.float32) * (d + 1) ** -0.5
    body = {k: v for k, v in params.items() if k not in _LM_HEAD}
    return config, {**body, "score_kernel": kernel.astype(jnp.dtype(policy.param_dtype))}


def last_token(valid: Array) -> Array:
    """[B, T] bool -> [B] index of each row's last True (0 when none, as transformers)."""
    t = jnp.arange(valid.shape[-1])
    return jnp.argmax(jnp.where(valid, t, -1), axis=-1)


def scoreable(input_ids: Array, attention_mask: Array, config: ModelConfig) -> Array:
    """[B, T] bool: the tokens a score may be read at (attended, and not the pad id)."""
    valid = attention_mask.astype(bool)
    return valid if config.pad_token_id is None else valid & (input_ids != config.pad_token_id)


def token_scores(params: dict, config: ModelConfig, hidden: Array) -> Array:
    """The score head at every position, float32 [B, T] (D multiply-adds a token: nothing next to the body)."""
    kernel = params["score_kernel"][:, 0]
    return jnp.einsum("btd,d->bt", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def value_at(x: Array, index: Array) -> Array:
    return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]


def sequence_scores(params: dict, config: ModelConfig, input_ids: Array, attention_mask: Array) -> Array:
    """One score per sequence [B] float32: rows of (prompt + response), left- or right-padded."""
    hidden = Decoder(config).apply({"params": params}, input_ids, attention_mask=attention_mask)
    return value_at(token_scores(params, config, hidden), last_token(scoreable(input_ids, attention_mask, config)))


def make_scorer(config: ModelConfig, mesh: Mesh, rules: Any, param_shardings: Any
                ) -> Callable[[dict, np.ndarray, np.ndarray], Array]:
    """The jitted, sharded scoring pass: score(params, input_ids, attention_mask) -> [B] float32 (replicated).
    Rows are sharded over the mesh's batch axes (B must divide by their size); one compile per row shape."""
    if config.head != "score":
        raise ValueError("make_scorer: the model has a language-model head, not a reward model's score head")
    rows = batch_sharding(mesh, rules, 2)
    jitted = jax.jit(on_mesh(lambda p, ids, mask: sequence_scores(p, config, ids, mask), mesh),
                     in_shardings=(param_shardings, rows, rows), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def score(params: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> Array:
        return jitted(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))

    score.lower = jitted.lower  # compiling ahead on abstract arguments (`dpo-jax plan`)
    return score


def score_texts(score: Callable[[dict, np.ndarray, np.ndarray], Array], params: dict, tokenizer, texts: list[str],
                max_length: int, batch_rows: int = 256, multiple: int = 1) -> np.ndarray:
    """Scores of whole texts (prompt + response as one string) [len(texts)] float32: each tokenized, keeping its
    last `max_length` tokens, right-padded to a multiple of 64 so a few shapes serve any texts, then scored in
    fixed chunks of `batch_rows` (see `make_scorer`; rows must divide over the mesh's batch axes)."""
    encoded = [tokenizer(t)["input_ids"][-max_length:] for t in texts]
    width = -(-max(len(e) for e in encoded) // 64) * 64
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(texts), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    return score_rows(score, params, ids, mask, batch_rows, multiple)


def score_rows(score: Callable[[Any, np.ndarray, np.ndarray], Array], params: Any, ids: np.ndarray,
               mask: np.ndarray, batch_rows: int = 1024, multiple: int = 1) -> np.ndarray:
    """A scoring pass over many rows in fixed-size chunks (one compile); [rows] float32. Fewer rows than a chunk
    make a smaller chunk, rounded up to `multiple` (what the mesh's batch axes divide; the extra rows repeat)."""
    rows = min(batch_rows, -(-len(ids) // multiple) * multiple)
    out = []
    for start in range(0, len(ids), rows):
        take = np.arange(start, start + rows) % len(ids)
        out.append(np.asarray(score(params, ids[take], mask[take]))[:min(rows, len(ids) - start)])
    return np.concatenate(out)


class RewardScorer:
    """A reward model ready to score: its weights placed on the mesh by their logical axes and the jitted, sharded
    scoring pass. PPO, Best-of-N, the reward-model judge and the sentiment experiment all score through this.
    (Loading one from a config section: train/model_source.py `load_reward_scorer`.)"""

    def __init__(self, config: ModelConfig, params: Any, mesh: Mesh, rules: Any):
        self.config = config
        self.params, shardings = place_on_mesh(config, params, mesh, rules)
        self.score = make_scorer(config, mesh, rules, shardings)
        self.multiple = data_parallel_size(mesh, rules)  # a chunk's rows divide over the batch axes

    def rows(self, ids: np.ndarray, mask: np.ndarray, batch_rows: int = 1024) -> np.ndarray:
        """Scores of token rows (prompt + response, left- or right-padded) [rows] float32, in fixed chunks."""
        return score_rows(self.score, self.params, ids, mask, batch_rows, self.multiple)

    def texts(self, tokenizer, texts: list[str], max_length: int, batch_rows: int = 256) -> np.ndarray:
        """Scores of whole texts [len(texts)] float32 (see `score_texts`)."""
        return score_texts(self.score, self.params, tokenizer, texts, max_length, batch_rows, self.multiple)
