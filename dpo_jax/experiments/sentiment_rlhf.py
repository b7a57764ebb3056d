"""The sentiment experiment's RLHF baselines (stage 5): a Bradley-Terry reward model trained from π_SFT on the same
pairs and batches as every method, and Best-of-N sampling from π_SFT ranked by it.

The reward model is judged three ways: held-out pair accuracy (pairs of π_SFT samples on the held-out prefixes,
ordered by VADER as the training pairs were), Pearson correlation with VADER on those samples, and correlation
with VADER and with the human ratings on the human-written test sentences.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.convert import native
from dpo_jax.experiments.sentiment_config import method
from dpo_jax.experiments.sentiment_points import make_point
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.reward import RewardScorer, as_reward_model
from dpo_jax.rlhf import best_of_n as bon
from dpo_jax.train.trainer import Trainer


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


class RewardModelStage:
    """Trains (or loads from the cache) the reward model, then scores texts with it."""

    def __init__(self, st: Any, key: str):
        self.st = st
        r, c = st.c.reward_model, st.c
        path = os.path.join(st.cache, "reward-model-" + key)
        if os.path.isdir(path):
            self.config, self.params = native.load_model(path)
            st.log(f"reward model: cached ({path})")
        else:
            self.config, init = as_reward_model(st.model_config(), st.sft_params, st.pad,
                                                jax.random.key(c.seed + 5))
            engine = st.engine_for("reward_model", method("reward"), r.learning_rate, c.train.batch_pairs, init,
                                model=self.config)
            t0 = time.perf_counter()
            trainer = Trainer(engine, steps=r.steps, writer=MetricWriter(None), name="reward model", log_every=0)
            state, _ = trainer.fit(engine.state, st.pair_loader())
            self.params = jax.device_get(state.params)
            native.save_model(path, self.config, self.params)
            st.log(f"reward model: {r.steps} Bradley-Terry steps from π_SFT on the pairs "
                   f"({time.perf_counter() - t0:.0f} s)")
        mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])  # one device, as every stage
        self.scorer = RewardScorer(self.config, self.params, mesh, sharding.DEFAULT_RULES)

    def score(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.scorer.rows(ids, mask, batch_rows=2048)

    def on_test_sentences(self) -> dict[str, float]:
        """Correlation of its score of each human-written test sentence (+ EOS) with VADER and the human rating."""
        st = self.st
        t = st.c.max_sentence_tokens
        ids = np.full((len(st.test_ids), t), st.pad, np.int32)
        for r, seq in enumerate(st.test_ids):
            ids[r, :len(seq) + 1] = seq + [st.eos]
        scores = self.score(ids, (np.arange(t)[None] < np.asarray([len(x) + 1 for x in st.test_ids])[:, None])
                            .astype(np.int32))
        self.test_scores = scores  # for the judge validation (sentiment_winrate.py)
        return {"rm_vader_r_test": _pearson(scores, st.test_vader), "rm_human_r_test": _pearson(scores, st.test_human)}


def best_of_n(st: Any, rm: RewardModelStage, prompts: np.ndarray, mask: np.ndarray
              ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Best-of-N points for every N in config.best_of_n.ns from one pass of max(ns) π_SFT samples per held-out
    prefix (temperature 1, as every method's evaluation), and the reward model's held-out accuracy on them. The
    first sample of each prefix is π_SFT's own evaluation (`st.sft_point`): N = 1 is π_SFT, on the same samples."""
    c = st.c
    ns = sorted(set(int(n) for n in c.best_of_n.ns))
    n = ns[-1]
    t0 = time.perf_counter()
    sampling = SamplingConfig(max_new_tokens=c.eval.max_new_tokens, temperature=1.0, eos_id=st.eos, pad_id=st.pad)
    samples = bon.sample_n(st.sft_params, st.model_config(), prompts, mask, n, st.eval_key(0), sampling,
                           batch_rows=2048)
    ids, row_mask = bon.completion_rows(prompts, mask, samples)
    scores = rm.score(ids, row_mask).reshape(len(prompts), n)
    texts = st.tokenizer.batch_decode([row[m == 1] for row, m in zip(ids, row_mask)], skip_special_tokens=True)
    truth = st.reward(texts).reshape(len(prompts), n)
    k = min(n, c.pairs.samples_per_prefix)  # held-out pairs drawn as the training pairs were: all pairs of k
    agree, count = 0, 0
    for a in range(k):
        for b in range(a + 1, k):
            real = truth[:, a] != truth[:, b]
            agree += int(np.sum((np.sign(scores[:, a] - scores[:, b]) == np.sign(truth[:, a] - truth[:, b]))[real]))
            count += int(np.sum(real))
    summary = {"rm_heldout_accuracy": agree / max(count, 1), "rm_heldout_pairs": count,
               "rm_vader_r_samples": _pearson(scores, truth)}
    st.log(f"best-of-N: {len(prompts)} prefixes x {n} π_SFT samples scored ({time.perf_counter() - t0:.0f} s); "
           f"reward model held-out accuracy {summary['rm_heldout_accuracy']:.3f} on {count} pairs")
    points = []
    for k in ns:
        pick = bon.best_indices(scores, k)[:, None]
        points.append(make_point("best_of_n", 0, k, np.take_along_axis(truth, pick, 1)[:, 0],
                                 np.full(len(prompts), bon.best_of_n_kl(k)), np.take_along_axis(scores, pick, 1)[:, 0]))
    st.sft_point = (make_point("sft", 0, 0, truth[:, 0], np.zeros(len(prompts)), scores[:, 0]),
                    [texts[i * n] for i in range(len(prompts))])
    return points, summary
