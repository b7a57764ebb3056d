"""What each training run of the sentiment experiment used, counted as it ran — results.md's equal-terms table and
budget.csv.

Per run: optimizer updates and the sequences they read (counted at the engine's train step), ground-truth (VADER)
labels behind its training signal, reward-model queries, completions generated for training, and wall-clock
seconds. Pair-based methods (DPO and relatives, Preferred-FT, Unlikelihood) and the reward model behind PPO share
one set of pairs: each is charged the pairs' labels and samples in full (they are the data it trained on). Online
DPO is charged its own samples instead, each labelled by VADER as it trains (sentiment_online.py).
Evaluation is the same for every run and not counted.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from dpo_jax.experiments.sentiment_points import family

FIELDS = ("family", "method", "seed", "learning_rate", "updates", "sequences", "ground_truth_labels",
          "reward_model_queries", "samples_generated", "seconds")


@dataclasses.dataclass
class Usage:
    method: str
    seed: int
    learning_rate: float = 0.0
    updates: int = 0  # optimizer updates
    sequences: int = 0  # sequences read by those updates, summed
    ground_truth_labels: int = 0  # VADER queries behind the training signal
    reward_model_queries: int = 0
    samples_generated: int = 0  # completions sampled for training (not for evaluation)
    seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def count_steps(self, engine: Any, updates_per_step: int = 1, passes: int = 1) -> Any:
        """The engine with its train step counted: each call is `updates_per_step` optimizer updates reading the
        batch's rows `passes` times (PPO: epochs x minibatches updates, epochs passes)."""
        step = engine.train_step

        def counted(state: Any, batch: dict) -> Any:
            self.updates += updates_per_step
            self.sequences += int(np.shape(batch["input_ids"])[0]) * passes
            return step(state, batch)

        return engine._replace(train_step=counted)

    def count_scores(self, score: Callable, ground_truth: bool) -> Callable:
        """A rollout scorer (rows, mask, texts) -> scores, counting each scored completion as generated and as a
        ground-truth or reward-model query."""
        def counted(rows: Any, mask: Any, texts: Any) -> Any:
            n = len(texts)
            self.samples_generated += n
            if ground_truth:
                self.ground_truth_labels += n
            else:
                self.reward_model_queries += n
            return score(rows, mask, texts)

        return counted

    def done(self) -> "Usage":
        self.seconds = time.perf_counter() - self.started
        return self

    def row(self) -> dict[str, Any]:
        return {"family": family(self.method), "method": self.method, "seed": self.seed,
                "learning_rate": self.learning_rate, "updates": self.updates,
                "sequences": self.sequences, "ground_truth_labels": self.ground_truth_labels,
                "reward_model_queries": self.reward_model_queries, "samples_generated": self.samples_generated,
                "seconds": round(self.seconds, 1)}


def write_budget(out_dir: str, usages: list[Usage]) -> list[str]:
    """budget.csv (one row per run) and results.md's lines: per method, its runs' counts (the same for every seed
    but the seconds, which are averaged)."""
    rows = [u.row() for u in usages]
    with open(os.path.join(out_dir, "budget.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if not rows:
        return []
    lines = ["", "## Equal terms: what each run used", "",
             "Counted as the runs ran (budget.csv has every run). Sequences: read by the optimizer updates, summed "
             "(a DPO update reads a pair's two responses). Ground-truth labels: VADER queries behind the training "
             "signal — the preference pairs' labelled samples for every pair-based method and for PPO through its "
             "reward model, the rollouts' rewards for PPO-GT, the policy's own samples for online DPO. Samples: "
             "completions generated for training.", "",
             "| method | family | runs | learning rate | updates | sequences | ground-truth labels | "
             "reward-model queries | samples generated | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        first = runs[0]
        counts = " | ".join(f"{first[k]:,}" if all(r[k] == first[k] for r in runs) else
                            f"{min(r[k] for r in runs):,}–{max(r[k] for r in runs):,}"
                            for k in ("updates", "sequences", "ground_truth_labels", "reward_model_queries",
                                      "samples_generated"))
        lines.append(f"| {method} | {first['family']} | {len(runs)} | {first['learning_rate']:g} | {counts} | "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    return lines
