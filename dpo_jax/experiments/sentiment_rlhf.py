"""The sentiment experiment's RLHF baselines (stage 5): a Bradley-Terry reward model trained from π_SFT on the same
pairs and batches as every method, and Best-of-N sampling from π_SFT ranked by it.

The reward model is chosen by its pair accuracy on validation prefixes and judged on the test side: held-out pair
accuracy (pairs of π_SFT samples on the held-out prefixes, ordered by VADER as the training pairs were), Pearson
correlation with VADER on those samples, and correlation with VADER and with the human ratings on the
human-written test sentences.
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
from dpo_jax.fingerprint import fingerprint
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.reward import RewardScorer, as_reward_model
from dpo_jax.rlhf import best_of_n as bon
from dpo_jax.train.trainer import Trainer


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def pair_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, int]:
    """(accuracy, pairs): how often scores [P, n] order all pairs of each prompt's first k samples as the ground
    truth [P, n] does, ties in the truth left out — the pairs drawn as the training pairs were."""
    agree, count = 0, 0
    for a in range(k):
        for b in range(a + 1, k):
            real = truth[:, a] != truth[:, b]
            agree += int(np.sum((np.sign(scores[:, a] - scores[:, b]) == np.sign(truth[:, a] - truth[:, b]))[real]))
            count += int(np.sum(real))
    return agree / max(count, 1), count


class RewardModelStage:
    """Trains (or loads from the cache) the reward model, then scores texts with it.

    Its learning rate is chosen like every family's, on validation prefixes (never the test ones): with
    `reward_model.learning_rates` set, one model per rate, and the one whose scores order the most pairs of π_SFT
    samples on the validation prefixes as VADER does is kept; without, `reward_model.learning_rate`, and its
    validation accuracy is still measured and reported."""

    def __init__(self, st: Any, key: str):
        self.st = st
        r = st.c.reward_model
        self.mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])  # one device, as every stage
        self.validation = self._validation_samples()
        self.sweep: list[dict[str, Any]] = []
        best = None
        for learning_rate in tuple(r.learning_rates) or (r.learning_rate,):
            config, params = self._train(key, float(learning_rate))
            scorer = RewardScorer(config, params, self.mesh, sharding.DEFAULT_RULES)
            accuracy, pairs = self._validation_accuracy(scorer)
            self.sweep.append({"learning_rate": float(learning_rate), "validation_accuracy": accuracy,
                               "validation_pairs": pairs})
            st.log(f"reward model lr {learning_rate:g}: validation pair accuracy {accuracy:.3f} ({pairs} pairs)")
            if best is None or accuracy > best[0]:
                best = accuracy, config, params, scorer, float(learning_rate)
        self.validation_accuracy, self.config, self.params, self.scorer, self.learning_rate = best

    def _train(self, key: str, learning_rate: float) -> tuple[Any, Any]:
        st, r, c = self.st, self.st.c.reward_model, self.st.c
        path = os.path.join(st.cache, "reward-model-" + fingerprint([key, learning_rate]))
        if os.path.isdir(path):
            st.log(f"reward model lr {learning_rate:g}: cached ({path})")
            return native.load_model(path)
        config, init = as_reward_model(st.model_config(), st.sft_params, st.pad, jax.random.key(c.seed + 5))
        engine = st.engine_for("reward_model", method("reward"), learning_rate, c.train.batch_pairs, init,
                               model=config)
        t0 = time.perf_counter()
        trainer = Trainer(engine, steps=r.steps, writer=MetricWriter(None), name="reward model", log_every=0)
        state, _ = trainer.fit(engine.state, st.pair_loader())
        params = jax.device_get(state.params)
        native.save_model(path, config, params)
        st.log(f"reward model lr {learning_rate:g}: {r.steps} Bradley-Terry steps from π_SFT on the pairs "
               f"({time.perf_counter() - t0:.0f} s)")
        return config, params

    def _validation_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, mask, VADER [P, k]): `pairs.samples_per_prefix` π_SFT samples of each validation prefix."""
        st = self.st
        prompts, mask = st.validation_prefixes()
        k = st.c.pairs.samples_per_prefix
        sampling = SamplingConfig(max_new_tokens=st.c.eval.max_new_tokens, temperature=1.0, eos_id=st.eos,
                                  pad_id=st.pad)
        samples = bon.sample_n(st.sft_params, st.model_config(), prompts, mask, k,
                               jax.random.key(st.c.seed + 6), sampling, batch_rows=2048)
        ids, row_mask = bon.completion_rows(prompts, mask, samples)
        texts = st.tokenizer.batch_decode([row[m == 1] for row, m in zip(ids, row_mask)], skip_special_tokens=True)
        return ids, row_mask, st.reward(texts).reshape(len(prompts), k)

    def _validation_accuracy(self, scorer: RewardScorer) -> tuple[float, int]:
        ids, row_mask, truth = self.validation
        scores = scorer.rows(ids, row_mask, batch_rows=2048).reshape(truth.shape)
        return pair_accuracy(scores, truth, truth.shape[1])

    def score(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.scorer.rows(ids, mask, batch_rows=2048)

    def summary(self) -> dict[str, Any]:
        """The choice and the sweep behind it, for results.md."""
        return {"rm_learning_rate": self.learning_rate, "rm_validation_accuracy": self.validation_accuracy,
                "rm_validation_pairs": self.sweep[0]["validation_pairs"], "rm_sweep": self.sweep}

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
    accuracy, count = pair_accuracy(scores, truth, min(n, c.pairs.samples_per_prefix))
    summary = {"rm_heldout_accuracy": accuracy, "rm_heldout_pairs": count,
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
