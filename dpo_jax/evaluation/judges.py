"""Judges behind one interface: `compare(prompts, candidates, baselines) -> outcomes` (1 candidate wins, 0.5 tie,
0 baseline wins, NaN invalid), so a win-rate evaluation does not care who judges.

Score judges rank each response by a number on the whole text (prompt + response): a ground-truth function
(the sentiment experiment's VADER; `module:name` or `file.py:name`, texts -> floats) or a reward model (ours or
an imported HF `*ForSequenceClassification`, scored by the jitted, sharded scoring pass). The LLM judge behind an
OpenAI-compatible endpoint is endpoint.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dpo_jax.evaluation.agreement import agreement
from dpo_jax.evaluation.winrate import Judged, check_lengths, outcomes_from_scores
from dpo_jax.parsing import load_callable
from dpo_jax.train.model_source import load_reward_scorer


class Judge(Protocol):
    name: str

    def compare(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> np.ndarray:
        """[N] outcomes for the candidate against the baseline on each prompt."""

    def judge(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> Judged:
        """The outcomes with a record per comparison and the set's summary fields."""


@dataclasses.dataclass
class ScoreJudge:
    """Ranks responses by score(texts) of prompt + response; equal scores are a tie."""

    name: str
    score: Callable[[list[str]], Any]  # whole texts -> [N] floats

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        out = np.asarray(self.score(list(texts)), np.float64).reshape(-1)
        if out.shape != (len(texts),):
            raise ValueError(f"judge {self.name}: the score function returned {out.size} values for {len(texts)} "
                             "texts")
        return out

    def compare(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> np.ndarray:
        return self.judge(prompts, candidates, baselines).outcomes

    def judge(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> Judged:
        """Scores are symmetric: no order, no position bias; the record is both scores."""
        check_lengths(prompts, candidates, baselines)
        both = self.scores([p + c for p, c in zip(prompts, candidates)] + [p + b for p, b in zip(prompts, baselines)])
        mine, theirs = both[:len(prompts)], both[len(prompts):]
        records = [{"candidate_score": float(x), "baseline_score": float(y)} for x, y in zip(mine, theirs)]
        return Judged(outcomes_from_scores(mine, theirs), records, {})


def function_judge(spec: str, name: str | None = None, key: str = "config.winrate.judge.function") -> ScoreJudge:
    """A ground-truth reward function `module:name` or `file.py:name` (texts -> floats) as a judge; errors name
    `key`."""
    return ScoreJudge(name or spec, load_callable(spec, key))


def reward_model_judge(model_section: Any, tokenizer: Any, mesh: Any, rules: Any, max_length: int,
                       batch_rows: int = 64, name: str = "reward model") -> ScoreJudge:
    """A reward model (config.model-style section: an HF sequence-classification dir or a dpo_jax checkpoint) as a
    judge, scored on `mesh` (batch_rows must divide over its batch axes)."""
    scorer = load_reward_scorer(model_section, len(tokenizer), mesh, rules, "winrate.judge.model")
    return ScoreJudge(name, lambda texts: scorer.texts(tokenizer, texts, max_length, batch_rows))


def pair_agreement(judge_scores: np.ndarray, human: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    """How often a score judge orders pairs (i, j) [K, 2] as the human ratings do (§6.4's judge-vs-human agreement),
    with its 95 % interval (agreement.py, the `judge-agreement` command's code): pairs the humans rate equally are
    left out; a judge tie counts half."""
    s, h = np.asarray(judge_scores, np.float64), np.asarray(human, np.float64)
    i, j = pairs[:, 0], pairs[:, 1]
    keep = h[i] != h[j]
    figures = agreement(outcomes_from_scores(s[i][keep], s[j][keep]), (h[i][keep] > h[j][keep])[:, None] * 1.0)
    interval = figures["majority"]
    low_high = (interval.low, interval.high) if interval else (float("nan"),) * 2
    return {"agreement": interval.estimate if interval else float("nan"), "low": low_high[0], "high": low_high[1],
            "pairs": figures["majority_pairs"]}
