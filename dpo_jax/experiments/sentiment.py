"""The DPO paper's controlled-sentiment experiment (§6.1, Fig. 2 left) in miniature: `dpo-jax experiment sentiment`.

Stages (each cached under the cache directory, keyed by what it depends on):
 1. corpus   — 10,605 movie-review sentences with human ratings (sentiment_corpus.py), deterministic split;
 2. tokenizer — a byte-level BPE trained on the train sentences;
 3. π_SFT    — a small GPT-2-shaped Decoder trained on the train sentences (the `lm` mode: every row a sentence);
 4. pairs    — 2-8-token prefixes of train sentences, K completions each from π_SFT, scored by VADER's compound
                score (the ground-truth reward); all K·(K-1)/2 pairs ordered by reward, ties dropped;
 5. RLHF     — a Bradley-Terry reward model from π_SFT on the same pairs (held-out pair accuracy, correlation with
                VADER and the human ratings), and Best-of-N from π_SFT ranked by it (rlhf/best_of_n.py: one pass of
                max N samples per held-out prefix, every N read off it; KL = log N − (N−1)/N);
 6. methods  — DPO (several β), conservative DPO, IPO, Unlikelihood (α sweep) and Preferred-FT, each from π_SFT with
                the reference log-probs precomputed once; online DPO and TR-DPO (sentiment_online.py); every
                `eval_every` steps, completions for held-out test prefixes give the mean reward and the mean
                sequence-level KL(π‖π_ref) = Σ_t log π − log π_ref over the sampled tokens (a Monte-Carlo
                estimate: ≥ 0 in expectation, 0 for π = π_ref). It is unbiased
                only for samples from π itself, so evaluation samples at temperature 1 whatever
                `pairs.temperature` the preference pairs were drawn at;
 7. win rates — every final policy (π_SFT, each method, PPO, PPO-GT) sampled at temperatures 0 … 1 on held-out
                prefixes and judged by VADER against the sentence's human continuation; the same policies on
                prefixes of three other domains (generalization); judge-vs-human agreement (sentiment_winrate.py);
 8. output   — results.csv/results.md (every point), frontier.png (reward vs KL per method), winrate.png,
                winrate.csv, generalization.csv, samples.jsonl, and VADER's correlation with the human ratings.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import compile_cache, reference
from dpo_jax.compile_clock import CompileClock
from dpo_jax.convert import native
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.pipeline import default_cache_dir
from dpo_jax.experiments import sentiment_corpus as corpus
from dpo_jax.experiments import sentiment_online, sentiment_ppo, sentiment_rlhf, sentiment_sweep, sentiment_winrate
from dpo_jax.experiments.sentiment_budget import Usage, write_budget
from dpo_jax.experiments.sentiment_config import method
from dpo_jax.experiments.sentiment_pairs import load_pairs, ranked_pairs, save_pairs
from dpo_jax.experiments.sentiment_points import family, make_point
from dpo_jax.experiments.sentiment_report import write_results
from dpo_jax.fingerprint import fingerprint
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.config import ModelConfig, shaped_config
from dpo_jax.models.decoder import init_params
from dpo_jax.models.generate import SamplingConfig, generate
from dpo_jax.rlhf import best_of_n as bon
from dpo_jax.rlhf.ppo import response_logps
from dpo_jax.train.engine import build_engine, default_engine_config
from dpo_jax.train.reference_source import NO_REFERENCE, ReferenceTables
from dpo_jax.train.trainer import Trainer


def _key(*parts: Any) -> str:
    return fingerprint(list(parts))


@functools.partial(jax.jit, static_argnums=1)
def sequence_kl(ref_params: Any, model: ModelConfig, ids: jax.Array, mask: jax.Array, logps: jax.Array) -> jax.Array:
    """[B] Σ_t log π − log π_ref over each sampled response (`logps`: π's at temperature 1, the last [B, L] of
    `ids`), in one compiled pass (op by op, a decoder's forward costs a dispatch per primitive per evaluation)."""
    length = logps.shape[1]
    ref = response_logps(ref_params, model, ids, mask, length, temperature=1.0)
    return jnp.sum((logps - ref) * mask[:, -length:], axis=1)


class Stages:
    """Holds what the stages produce; each stage loads its cached result when its inputs are unchanged."""

    def __init__(self, c: ml_collections.ConfigDict):
        self.c = c
        self.cache = os.path.join(c.cache_dir or default_cache_dir(), "sentiment")
        os.makedirs(self.cache, exist_ok=True)
        os.makedirs(c.out_dir, exist_ok=True)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.vader = SentimentIntensityAnalyzer()
        self.winrates: sentiment_winrate.WinRates | None = None
        self.usages: list[Usage] = []  # every training run's counts (sentiment_budget.py)
        self.timings: dict[str, tuple[float, float]] = {}  # stage -> (wall, compile) seconds
        self.learning_rates: dict[str, float] = {}  # family -> the sweep's choice (sentiment_sweep.py)
        self.engines: dict[tuple[str, float], tuple[Any, Any]] = {}  # (method, rate) -> (engine, initial state)
        self.ppo_runs: sentiment_ppo.PPORuns | None = None  # PPO's engines, shared by the sweep and the runs

    def log(self, message: str) -> None:
        print(f"[sentiment] {message}", flush=True)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """A stage's wall and compile seconds, logged and kept for results.md."""
        with CompileClock() as clock:
            yield
        self.timings[stage] = (clock.seconds, clock.compile_seconds)
        self.log(f"stage {stage}: {clock.seconds:.0f} s, of which compiling {clock.compile_seconds:.0f} s")

    def timing_lines(self) -> list[str]:
        lines = ["", "## Time per stage", "", "Wall-clock seconds of each stage and the part JAX spent compiling (its "
                 "own compile events; a stage loaded from the cache is fast).", "",
                 "| stage | seconds | compiling |", "|---|---|---|"]
        return lines + [f"| {stage} | {wall:.0f} | {compiling:.0f} |" for stage, (wall, compiling)
                        in self.timings.items()]

    def reward(self, texts: list[str]) -> np.ndarray:
        return np.asarray([self.vader.polarity_scores(t)["compound"] for t in texts], np.float32)

    # 1-2: corpus and tokenizer
    def data(self) -> None:
        path = corpus.fetch_corpus(os.path.dirname(self.cache))
        self.train_text, self.test_text = corpus.split(corpus.read_snippets(path))
        self.test_human = np.asarray([s.rating for s in self.test_text])
        self.test_vader = self.reward([s.text for s in self.test_text])
        self.vader_human_r = float(np.corrcoef(self.test_vader, self.test_human)[0, 1])
        self.log(f"corpus: {len(self.train_text)} train / {len(self.test_text)} test sentences; VADER vs human "
                 f"rating on test: Pearson r = {self.vader_human_r:.3f}")
        from dpo_jax.data.bpe import train_bpe_tokenizer
        from transformers import AutoTokenizer

        tok_dir = os.path.join(self.cache, "tokenizer-" + _key(path, self.c.vocab_size))
        if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            train_bpe_tokenizer((s.text for s in self.train_text), self.c.vocab_size, tok_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.train_ids = [self.encode(s.text) for s in self.train_text]
        self.test_ids = [self.encode(s.text) for s in self.test_text]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.c.max_sentence_tokens - 1]

    def model_config(self) -> ModelConfig:
        m = self.c.model
        return shaped_config(m.family, len(self.tokenizer), m.hidden_size, m.num_layers, m.num_heads,
                             m.intermediate_size, max_position_embeddings=64)

    def engine_for(self, name: str, m: ml_collections.ConfigDict, learning_rate: float, pairs: int, params: Any,
                model: ModelConfig | None = None):
        """An engine for method `m` (see `method`), from `params` (None: a fresh init of π_SFT's shape; `model`: a
        different model, e.g. the reward model)."""
        e = default_engine_config()
        e.train.mode, e.train.global_batch_pairs = m.mode, pairs
        unknown = sorted(set(m.dpo) - set(e.dpo))
        if unknown:
            raise ValueError(f"config.methods.{name}.dpo: unknown key(s) {unknown}; valid: {', '.join(e.dpo)}")
        e.dpo.update(m.dpo.to_dict())
        e.optimizer.name, e.optimizer.learning_rate, e.optimizer.warmup_steps = "adamw", learning_rate, 0
        e.optimizer.clip_grad_norm = 10.0
        model = model or self.model_config()
        # One device: a CPU-sized experiment gains nothing from a fake multi-device mesh (and see the known
        # issue in docs/ARCHITECTURE.md: an XLA CPU collective deadlock seen with 8 fake devices in this SFT step).
        devices = jax.devices()[:1]
        if params is None:
            return build_engine(e, model, lambda: init_params(model, jax.random.key(self.c.seed)), devices=devices)
        return build_engine(e, model, lambda p: p, jax.device_put(params, devices[0]), devices=devices)

    # 3: π_SFT
    def sft(self) -> None:
        s = self.c.sft
        model = self.model_config()
        key = _key(self.c.vocab_size, self.c.max_sentence_tokens, model.to_json(), s.to_dict(), self.c.seed,
                   len(self.train_ids), "lm")
        path = os.path.join(self.cache, "sft-" + key)
        self.sft_key = key
        if os.path.isdir(path):
            self.sft_params = native.load_model(path)[1]
            self.log(f"π_SFT: cached ({path})")
            return
        engine = self.engine_for("sft", method("lm"), s.learning_rate, s.batch // 2, None)  # two sentences a pair
        trainer = Trainer(engine, steps=s.steps, writer=MetricWriter(None), name="π_SFT", log_every=200)
        batches = corpus.sentence_batches(self.train_ids, s.batch, self.c.max_sentence_tokens, self.eos, self.pad,
                                          self.c.seed)
        state, _ = trainer.fit(engine.state, batches)
        self.sft_params = jax.device_get(state.params)
        native.save_model(path, model, self.sft_params)

    # 4: preference pairs
    def prefixes(self, ids: list[list[int]], n: int, seed: int, sources: bool = False, skip: int = 0
                 ) -> tuple[np.ndarray, ...]:
        """(prompts, mask) of n sentences' prefixes (sentiment_corpus.draw_prefixes), after the first `skip` of
        the draw; with `sources`, also each row's sentence index and prefix length."""
        out = corpus.draw_prefixes(ids, n, seed, self.c.pairs.min_prefix, self.c.pairs.max_prefix, self.pad, skip)
        return out if sources else out[:2]

    def pairs(self) -> None:
        p = self.c.pairs
        path = os.path.join(self.cache, "pairs-" + _key(self.sft_key, p.to_dict(), "samples-counted") + ".npz")
        if os.path.isfile(path):
            self.pair_source, records, self.pair_samples = load_pairs(path)
            self.log(f"pairs: {len(self.pair_source)} (cached: {path})")
        else:
            prompts, mask = self.prefixes(self.train_ids, p.prefixes, self.c.seed + 1)
            k = p.samples_per_prefix
            rep_prompts, rep_mask = np.repeat(prompts, k, 0), np.repeat(mask, k, 0)
            sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, eos_id=self.eos,
                                      pad_id=self.pad)
            out = generate(self.sft_params, self.model_config(), rep_prompts, rep_mask,
                           jax.random.key(self.c.seed + 2), sampling)
            texts = self.tokenizer.batch_decode([list(rep_prompts[i][rep_mask[i] == 1]) + list(np.asarray(
                out.tokens[i])[np.asarray(out.mask[i]) == 1]) for i in range(len(rep_prompts))],
                skip_special_tokens=True)
            rewards = self.reward(texts).reshape(-1, k)
            self.pair_samples = len(texts)  # VADER-labelled samples behind the pairs (the equal-terms table)
            shape = (-1, k, p.max_new_tokens)
            self.pair_source, records = ranked_pairs(prompts, mask, np.asarray(out.tokens).reshape(shape),
                                                     np.asarray(out.mask).reshape(shape), rewards, texts,
                                                     self.tokenizer.decode)
            save_pairs(path, self.pair_source, records, self.pair_samples)
            self.log(f"pairs: {len(self.pair_source)} from {len(prompts)} prefixes x {k} samples (mean π_SFT "
                     f"reward {float(rewards.mean()):+.3f})")
        with open(os.path.join(self.c.out_dir, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    # 5: the RLHF baselines (sentiment_rlhf.py)
    def rlhf(self) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """(Best-of-N points, reward-model summary); nothing when reward_model.steps < 1."""
        if self.c.reward_model.steps < 1:
            self.log("reward_model.steps = 0: no reward model, no Best-of-N")
            return [], {}
        key = _key(self.sft_key, self.c.pairs.to_dict(), self.c.reward_model.steps, self.c.train.batch_pairs)
        rm = self.reward_model = sentiment_rlhf.RewardModelStage(self, key)  # each rate's model keyed by it
        summary = rm.on_test_sentences()
        points, more = sentiment_rlhf.best_of_n(self, rm, *self.test_prefixes())
        return points, {**summary, **more, **rm.summary()}

    def ppo(self) -> list[dict[str, Any]]:
        """PPO's and PPO-GT's points (sentiment_ppo.py); none without a reward model or training steps."""
        if self.c.train.steps < 1 or not getattr(self, "reward_model", None) or not (
                self.c.ppo.targets or self.c.ppo.betas):
            return []
        return sentiment_ppo.run_ppo(self, self.reward_model, *self.test_prefixes())

    def test_prefixes(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out prefixes every method (and Best-of-N) is evaluated on."""
        return self.prefixes(self.test_ids, self.c.eval.prefixes, self.c.seed + 4)

    def validation_prefixes(self) -> tuple[np.ndarray, np.ndarray]:
        """Prefixes of other held-out sentences, for choices (learning rates, β): the sentences after the test
        prefixes' in the same draw, so the two sets never share one."""
        return self.prefixes(self.test_ids, self.c.sweep.prefixes, self.c.seed + 4, skip=self.c.eval.prefixes)

    # 6: methods with evaluation
    def evaluate(self, params, ref_params, prompts, mask, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray | None, list[str]]:
        """Per prompt: VADER reward, sequence KL(π‖π_ref) of the sample, the reward model's score of it (None
        without one); and the texts. Samples come from π at temperature 1 (the KL estimate Σ_t log π − log π_ref
        is unbiased only for those), with keys that depend on the run's training seed."""
        sampling = SamplingConfig(max_new_tokens=self.c.eval.max_new_tokens, temperature=1.0, eos_id=self.eos,
                                  pad_id=self.pad)
        out = jax.tree.map(lambda x: x[:, 0], bon.sample_n(params, self.model_config(), prompts, mask, 1,
                                                           self.eval_key(seed), sampling, batch_rows=len(prompts)))
        texts = self.tokenizer.batch_decode([list(prompts[i][mask[i] == 1]) + list(np.asarray(out.tokens[i])[
            np.asarray(out.mask[i]) == 1]) for i in range(len(prompts))], skip_special_tokens=True)
        full = jnp.concatenate([jnp.asarray(prompts), out.tokens], 1)
        full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], 1)
        kl = np.asarray(sequence_kl(ref_params, self.model_config(), full, full_mask, out.logps), np.float64)
        rm = getattr(self, "reward_model", None)
        rm_score = None if rm is None else rm.score(np.asarray(full), np.asarray(full_mask))
        return self.reward(texts), kl, rm_score, texts

    def eval_key(self, seed: int) -> jax.Array:
        """The evaluation samples' key for a training seed: prompt i's sample is drawn with fold_in(fold_in(key,
        i), 0) (rlhf/best_of_n.py), so π_SFT's evaluation at seed 0 is Best-of-N's first sample of each prompt."""
        return jax.random.fold_in(jax.random.key(self.c.seed + 3), seed)

    def point(self, method: str, seed: int, step: int, params, prompts, mask) -> tuple[dict[str, Any], list[str]]:
        """A policy's evaluation point on the test prefixes (sentiment_points.make_point), and its texts."""
        vader, kl, rm_score, texts = self.evaluate(params, self.sft_params, prompts, mask, seed)
        return make_point(method, seed, step, vader, kl, rm_score), texts

    def seeds_of(self, m: ml_collections.ConfigDict | None = None) -> tuple[int, ...]:
        """A method's training seeds: its own `seeds`, or the experiment's."""
        seeds = tuple(m.seeds) if m is not None and m.get("seeds") else tuple(self.c.seeds)
        if not seeds:
            raise ValueError("config.seeds: at least one training seed")
        return seeds

    def methods(self) -> list[dict[str, Any]]:
        """π_SFT's point (Best-of-N's N = 1 when the RLHF stage ran: the very same samples), then every method at
        every one of its seeds, evaluated every `eval.every` steps."""
        t = self.c.train
        test_prompts, test_mask = self.test_prefixes()
        sft, sft_texts = getattr(self, "sft_point", None) or self.point("sft", 0, 0, self.sft_params, test_prompts,
                                                                         test_mask)
        self.log(f"π_SFT on test prefixes: reward {sft['reward']:+.3f}, KL {sft['kl']:.4f}")
        points = [sft]
        samples = [{"method": "sft", "seed": 0, "step": 0, "text": x} for x in sft_texts[:8]]
        methods = self.c.methods.items() if t.steps >= 1 else ()
        if t.steps < 1:
            self.log(f"train.steps = {t.steps}: no method is trained; only π_SFT is evaluated")
        for name, m in methods:
            for seed in self.seeds_of(m):
                def evaluate(step: int, params: Any, name: str = name, seed: int = seed) -> None:
                    point, texts = self.point(name, seed, step, params, test_prompts, test_mask)
                    points.append(point)
                    samples.extend({"method": name, "seed": seed, "step": step, "text": x} for x in texts[:8])

                t0 = time.perf_counter()
                final = self.train_method(name, m, seed, evaluate)
                self.final_policy(name, seed, final)
                self.log(f"{name} seed {seed}: reward {points[-1]['reward']:+.3f}, KL {points[-1]['kl']:.3f} after "
                         f"{t.steps} steps ({time.perf_counter() - t0:.0f} s)")
        with open(os.path.join(self.c.out_dir, "samples.jsonl"), "w") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        return points

    def train_method(self, name: str, m: ml_collections.ConfigDict, seed: int, evaluate: Any = None,
                     learning_rate: float | None = None) -> Any:
        """Trains method `m` from π_SFT at a training seed and returns its policy; `evaluate(step, params)` every
        `eval.every` steps; its usage counted in `usages` unless `learning_rate` is given (a sweep's run). Its
        family's learning rate: `learning_rate`, else the sweep's choice, else `train.learning_rate`."""
        t = self.c.train
        swept = learning_rate is not None
        learning_rate = learning_rate if swept else self.learning_rates.get(family(name), t.learning_rate)
        pairs = 0 if sentiment_online.is_online(m) else self.pair_samples  # online: its samples, counted as scored
        usage = Usage(name, seed, learning_rate, ground_truth_labels=pairs, samples_generated=pairs)
        if (name, learning_rate) not in self.engines:  # one compiled step per method and rate, for every seed
            engine = self.engine_for(name, m, learning_rate, sentiment_online.batch_pairs(self, m), self.sft_params)
            self.engines[name, learning_rate] = engine, jax.tree.map(jnp.copy, engine.state)
        engine, initial = self.engines[name, learning_rate]
        engine = usage.count_steps(engine)
        rollout, batches = sentiment_online.rollout(self, m, engine, initial, seed, usage)  # online DPO, TR-DPO
        tables = engine.config.needs_reference and rollout is None
        trainer = Trainer(engine, steps=t.steps, writer=MetricWriter(None), name=f"{name} seed {seed}",
                          reference=ReferenceTables({"train": self.reference_table()}) if tables else NO_REFERENCE,
                          rollout=rollout, eval_every=self.c.eval.every if evaluate else 0,
                          evaluate=(lambda step, state: evaluate(step, state.params)) if evaluate else None)
        final = trainer.fit(jax.tree.map(jnp.copy, initial), batches or self.pair_loader(seed))[0].params  # donated
        if not swept:
            self.usages.append(usage.done())
        return final

    def reference_table(self) -> Any:
        """π_SFT's log-probs of every pair, computed once and shared by every method (and cached on disk)."""
        if getattr(self, "_reference_table", None) is None:
            t = self.c.train
            ref_engine = self.engine_for("reference", method("dpo"), t.learning_rate, t.batch_pairs, self.sft_params)
            path = os.path.join(self.cache, "reference-" + _key(self.sft_key, self.c.pairs.to_dict(),
                                                                t.batch_pairs) + ".npz")
            self._reference_table = reference.precompute(ref_engine.state.params, ref_engine.reference_logps,
                                                         self.pair_loader().one_pass, path)[0]
        return self._reference_table

    def final_policy(self, name: str, seed: int, params: Any) -> None:
        """A method's trained policy at a seed, for the win-rate and generalization evaluation (stage 7)."""
        if self.winrates is not None:
            self.winrates.add(name, params, seed)

    def pair_loader(self, seed: int = 0) -> PreferenceLoader:
        """The preference pairs in a training seed's order (the same for every method at that seed)."""
        seq_len = self.c.pairs.max_prefix + max(self.c.pairs.max_new_tokens, 1)
        return PreferenceLoader(self.pair_source, global_batch_pairs=self.c.train.batch_pairs, seq_len=seq_len,
                                seed=self.c.seed + 1000 * seed, prefetch=0, pad_id=self.pad)


def run(c: ml_collections.ConfigDict) -> dict[str, Any]:
    start = time.perf_counter()
    sentiment_online.check(c)
    stages = Stages(c)
    compile_cache.configure(c.cache_dir)  # a re-run loads its compiled programs (called from the library too)
    with stages.timed("corpus and tokenizer"):
        stages.data()
    with stages.timed("π_SFT"):
        stages.sft()
    with stages.timed("pairs"):
        stages.pairs()
    stages.winrates = sentiment_winrate.WinRates(stages) if c.winrate.prefixes > 0 else None
    stages.final_policy("sft", c.seeds[0], stages.sft_params)
    with stages.timed("reward model, Best-of-N"):
        rlhf_points, reward_model = stages.rlhf()
    with stages.timed("learning-rate sweep"):
        sweep_lines = sentiment_sweep.sweep(stages)
    with stages.timed("PPO, PPO-GT"):
        rlhf_points += stages.ppo()
    with stages.timed("methods"):
        points = stages.methods()
    points[1:1] = rlhf_points  # after π_SFT: Best-of-N samples it, PPO starts from it
    more = write_budget(c.out_dir, stages.usages) + sweep_lines
    if stages.winrates is not None:
        with stages.timed("win rates, generalization, judges"):
            rm_scores = getattr(getattr(stages, "reward_model", None), "test_scores", None)
            more += stages.winrates.write(c.out_dir, stages.winrates.validation(rm_scores),
                                          {p["method"]: p["kl"] for p in points if p["seed"] == c.seeds[0]})
    more += stages.timing_lines()
    write_results(c, points, stages.vader_human_r, reward_model, more)
    final = {(p["method"], p["seed"]): p for p in points}
    stages.log("summary (final point per method and seed: mean reward on held-out prefixes, KL to π_SFT):")
    for (name, seed), p in final.items():
        print(f"    {name:<24} seed {seed}  reward {p['reward']:+.3f}   KL {p['kl']:7.3f}", flush=True)
    stages.log(f"done in {time.perf_counter() - start:.0f} s: {c.out_dir}/results.md, frontier.png, results.csv")
    return {"points": points, "vader_human_r": stages.vader_human_r, "reward_model": reward_model}


def main(c: ml_collections.ConfigDict) -> None:
    run(c)
