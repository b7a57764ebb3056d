"""Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): each step samples k completions per prompt from the
current policy, scores them, and takes one DPO-family step on the best and the worst of each prompt's k.

`train.mode = "online_dpo"` in `dpo-jax train` (commands/train.py sends it here). The preference data gives only
the prompts (`data.layout = "pairs"`, its batches of `global_batch_pairs` examples resumable like any run); the
Trainer's rollout hook turns each batch into pairs the policy sampled: one compiled sampler (models/generate.py, k
samples a prompt, `online.temperature`, `online.max_new_tokens`), a score per sample (a reward model's scoring pass
or a host function of the decoded texts, minus `online.missing_eos_penalty` for samples without EOS), best vs
worst per prompt (a prompt whose samples all score the same makes no pair: counted, left out as padding), then the
reference log-probs of the sampled pairs in one jitted pass (the initial policy kept on device, or the base with
the adapters off under LoRA, inside the step). The step is the registered DPO loss on those pairs (train/modes.py
`online_dpo`), so an online step is an offline DPO step on the pairs it sampled. Keys are
fold_in(key(seed), step): a resumed run samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from dpo_jax.data.layout import PAIRS
from dpo_jax.data.loader import host_batch
from dpo_jax.models.generate import SamplingConfig, ended_with_eos
from dpo_jax.rlhf.best_of_n import sample_n


def pairs_from_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[P, k] scores -> per prompt the best and the worst sample (the first of equals) and whether they differ:
    a prompt whose k samples all score the same makes no pair."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"online DPO needs k >= 2 scores a prompt, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("online DPO: a sample's score is not finite (the reward returned NaN or inf)")
    best, worst = np.argmax(scores, 1), np.argmin(scores, 1)
    rows = np.arange(len(scores))
    return best, worst, scores[rows, best] > scores[rows, worst]


def prompt_tokens(example: dict) -> np.ndarray:
    """A prepared pair's prompt: the tokens before its chosen response's first scored token."""
    mask = np.asarray(example["chosen_loss_mask"])
    return np.asarray(example["chosen_input_ids"])[:int(np.argmax(mask)) if mask.any() else len(mask)]


def row_decoder(tokenizer: Any) -> Callable[[np.ndarray, np.ndarray], list[str]]:
    """(rows, row mask) -> the texts of the masked tokens, special tokens skipped."""
    def decode(rows, row_mask):
        return tokenizer.batch_decode([r[m == 1] for r, m in zip(rows, row_mask)], skip_special_tokens=True)
    return decode


def score_samples(prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray, generated: np.ndarray,
                  score: Callable[..., np.ndarray], decode: Callable, eos_id: int | None, missing_eos_penalty: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """k samples a prompt (tokens and masks [P, k, N] after left-padded prompts [P, W]) -> (scores [P, k], less
    `missing_eos_penalty` where a sample did not end; ended [P, k]). Rows go to `score` prompt-major."""
    p, k = tokens.shape[:2]
    rows = np.concatenate([np.repeat(prompt_ids, k, 0), tokens.reshape(p * k, -1)], 1)
    row_mask = np.concatenate([np.repeat(prompt_mask, k, 0), generated.reshape(p * k, -1)], 1)
    scores = np.asarray(score(rows, row_mask, decode(rows, row_mask), prompt_ids.shape[1]), np.float64).reshape(-1)
    if scores.shape != (p * k,):
        raise ValueError(f"the reward gave {scores.size} scores for {p * k} samples")
    ended = ended_with_eos(tokens, generated, eos_id)
    return scores.reshape(p, k) - missing_eos_penalty * ~ended, ended


def left_padded(prompts: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"a prompt of {len(p)} tokens is longer than config.data.max_prompt_length = {width}")
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


class OnlineRollouts:
    """The Trainer's rollout hook (train/trainer.py): a host batch of the preference data -> a DPO batch of pairs the
    current policy sampled from its prompts, reference log-probs attached.

    prompt_of(example id) -> the prompt's tokens (`prompt_tokens` of a prepared pair; the sentiment experiment's
    prefixes); score(rows, row mask, texts, prompt width) -> [n] scores of n samples (make_score); reference:
    attaches reference log-probs given the state (train/reference_source.py; SyncedReference moves it, TR-DPO).
    seq_len = prompt width + new tokens."""

    def __init__(self, engine: Any, prompt_of: Callable[[int], np.ndarray], reference: Any,
                 score: Callable[..., np.ndarray], decode: Callable, sampling: SamplingConfig, samples_per_prompt: int,
                 prompt_width: int, missing_eos_penalty: float, seed: int):
        self.engine, self.prompt_of, self.reference, self.score = engine, prompt_of, reference, score
        self.decode = decode
        self.sampling, self.k, self.width = sampling, samples_per_prompt, prompt_width
        self.missing_eos_penalty, self.seed = missing_eos_penalty, seed
        self.seq_len = prompt_width + sampling.max_new_tokens
        self.pairs = self.ties = 0  # pairs formed, prompts dropped for equal scores (this process, this session)

    def __call__(self, local: dict, state: Any) -> dict:
        step = int(jax.device_get(state.step))
        real = [int(i) for i in local["example_id"] if i >= 0]
        if not real:
            raise ValueError("online DPO: a batch without a single real prompt")
        prompts = [np.asarray(self.prompt_of(i)) for i in real]
        ids, mask = left_padded(prompts, self.width, self.sampling.pad_id)
        samples = sample_n(state.params, self.engine.model, ids, mask, self.k,
                           jax.random.fold_in(jax.random.key(self.seed), step), self.sampling)
        tokens, generated = np.asarray(samples.tokens), np.asarray(samples.mask)  # [P, k, N]
        scores, ended = score_samples(ids, mask, tokens, generated, self.score, self.decode, self.sampling.eos_id,
                                      self.missing_eos_penalty)
        best, worst, keep = pairs_from_scores(scores)
        self.pairs += int(keep.sum())
        self.ties += int((~keep).sum())
        examples, slot = [], 0
        for i in local["example_id"]:
            if i < 0 or not keep[slot]:
                examples.append(None)
                slot += i >= 0
                continue
            completion = lambda j: tokens[slot, j][generated[slot, j] > 0]  # noqa: E731
            prompt = prompts[slot]
            chosen, rejected = completion(best[slot]), completion(worst[slot])
            examples.append({"example_id": int(i),
                             "chosen_input_ids": np.concatenate([prompt, chosen]),
                             "chosen_loss_mask": np.concatenate([np.zeros(len(prompt)), np.ones(len(chosen))]),
                             "rejected_input_ids": np.concatenate([prompt, rejected]),
                             "rejected_loss_mask": np.concatenate([np.zeros(len(prompt)), np.ones(len(rejected))])})
            slot += 1
        batch = host_batch(PAIRS, examples, self.seq_len, self.sampling.pad_id)
        per_prompt = np.zeros(len(examples), np.float32), np.zeros(len(examples), np.float32), \
            np.zeros(len(examples), np.float32)
        where = np.flatnonzero(np.asarray(local["example_id"]) >= 0)
        per_prompt[0][where] = scores.mean(1)
        per_prompt[1][where] = scores[np.arange(len(real)), best] - scores[np.arange(len(real)), worst]
        per_prompt[2][where] = ended.mean(1)
        batch.update(scores_mean=per_prompt[0], scores_margin=per_prompt[1], contain_eos=per_prompt[2])
        return self.reference.attach(batch, "train", state)


def judge_scores(judge: Any, decode: Callable) -> Callable[..., np.ndarray]:
    """A pairwise judge (evaluation/judges.py interface) as the score of k = 2 samples: the first sample against the
    second, scores (o, 1 − o) for outcome o; a tie or no verdict (invalid, failed) scores both ½ — no pair."""
    def score(rows, row_mask, texts, prompt_width):
        prompts = decode(rows[0::2, :prompt_width], row_mask[0::2, :prompt_width])
        completions = decode(rows[:, prompt_width:], row_mask[:, prompt_width:])
        outcome = np.asarray(judge.compare(prompts, completions[0::2], completions[1::2]), np.float64)
        outcome = np.where(np.isnan(outcome), 0.5, outcome)
        return np.stack([outcome, 1 - outcome], 1).reshape(-1)
    return score


def check_reward(o: Any, judge: Any) -> None:
    """The `online` section's reward settings, checked before anything is built; errors name the key."""
    from dpo_jax.parsing import load_callable

    if o.reward_kind not in ("function", "model", "judge"):
        raise ValueError(f"config.online.reward_kind = {o.reward_kind!r}: 'function', 'model' or 'judge'")
    if o.reward_kind == "judge" and (judge is None or o.samples_per_prompt != 2):
        raise ValueError("config.online.reward_kind = 'judge' compares two samples: set "
                         f"config.online.samples_per_prompt = 2 (got {o.samples_per_prompt}) and config.online.judge")
    if o.reward_kind == "function":
        load_callable(o.reward_function, "config.online.reward_function")
    if o.samples_per_prompt < 2 or o.max_new_tokens < 1:
        raise ValueError(f"config.online.samples_per_prompt = {o.samples_per_prompt} must be >= 2 and "
                         f"config.online.max_new_tokens = {o.max_new_tokens} >= 1")


def make_score(c: Any, tokenizer: Any, mesh: Any, judge: Any) -> Callable[..., np.ndarray]:
    """score(rows, row mask, texts, prompt width) -> [n] of config.online's reward: a host function of the decoded
    texts, a reward model's scoring pass (placed on `mesh`), or a pairwise judge of consecutive sample pairs
    (k = 2; the first `prompt width` columns of a row are its prompt)."""
    from dpo_jax.parsing import load_callable
    from dpo_jax.train.model_source import load_reward_scorer

    o = c.online
    check_reward(o, judge)
    if o.reward_kind == "judge":
        return judge_scores(judge, row_decoder(tokenizer))
    if o.reward_kind == "function":
        function = load_callable(o.reward_function, "config.online.reward_function")
        return lambda rows, row_mask, texts, prompt_width: np.asarray(function(texts), np.float64)
    scorer = load_reward_scorer(o.reward_model, len(tokenizer), mesh, c.mesh.rules, "online.reward_model")
    return lambda rows, row_mask, texts, prompt_width: scorer.rows(rows, row_mask, len(rows))


def train_online(c: Any, judge: Any = None) -> dict[str, Any]:
    """`dpo-jax train` with train.mode = "online_dpo": the run (train/run.py) with OnlineRollouts as its hook.
    judge: online.reward_kind = "judge" — a pairwise judge built by the command (evaluation sits above this layer);
    k must be 2. A judge that cannot answer (the endpoint down) stops the run; its verdicts so far stay cached,
    so the resumed run (same prompts, same samples: the keys follow the step) asks none of them again."""
    from dpo_jax.train import run as train_run

    o = c.online
    if c.data.layout != "pairs":
        raise ValueError(f"config.train.mode = 'online_dpo' reads only the prompts of the data and builds its own "
                         f"rows: set config.data.layout = 'pairs' (got {c.data.layout!r})")
    if c.dpo.reference not in ("per_batch", "base"):
        raise ValueError(f"config.dpo.reference = {c.dpo.reference!r}: online DPO samples new pairs every step, which "
                         "precomputed tables cannot cover; use 'per_batch' (the initial policy kept on device) or "
                         "'base' (LoRA: the base with the adapters off)")
    check_reward(o, judge)

    def make_rollout(run: Any, reference: Any) -> OnlineRollouts:
        tokenizer, pad = run.tokenizer, run.tokenizer.pad_token_id or 0
        score = make_score(c, tokenizer, run.engine.mesh, judge)
        sampling = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                                  eos_id=tokenizer.eos_token_id, pad_id=pad)
        source = run.loaders["train"].source
        return OnlineRollouts(run.engine, lambda i: prompt_tokens(source[i]), reference, score, row_decoder(tokenizer),
                              sampling, o.samples_per_prompt, c.data.max_prompt_length, o.missing_eos_penalty,
                              c.train.seed)

    return train_run.train(c, make_rollout)
