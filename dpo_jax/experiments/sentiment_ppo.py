"""The sentiment experiment's PPO baselines (stage 5): PPO against the learned reward model and PPO-GT against VADER,
run as the paper's §6.1 runs them — Ziegler's adaptive KL controller toward each target KL of `ppo.targets` —
from π_SFT, on the pairs' train prefixes, evaluated like every method. Fixed-coefficient runs (`ppo.betas`, the
objective r − β·KL at a DPO β) are an option, drawn as their own markers, not as the frontier.

Budget, the same as a DPO run's: `train.steps` optimizer updates of `ppo.rollouts` sequences — `train.steps /
(ppo.epochs · ppo.minibatches)` PPO iterations of `ppo.rollouts` sampled prompts (the paper samples 1,024 per
step; here the update's rows equal a DPO update's two responses of `train.batch_pairs` pairs), so PPO-GT's VADER
queries come close to the pairs' labelled samples. The controller's horizon is in episodes: per iteration it moves
the coefficient by at most 20 % · rollouts / horizon. All runs share one compiled PPO step: the coefficient and the
target live in the state, a training seed in the rollouts' generation keys and the prompt order.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.data.prompts import PromptLoader
from dpo_jax.experiments.sentiment_budget import Usage
from dpo_jax.experiments.sentiment_points import family
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.rlhf.ppo import PPOConfig, Rollouts, build_ppo_engine
from dpo_jax.train.state import default_optimizer_config
from dpo_jax.train.trainer import Trainer


class Setting(NamedTuple):
    """One PPO run's setting: a target KL (the adaptive controller, from `init_kl_coef`) or a fixed coefficient."""

    name: str  # e.g. ppo_kl6, ppo_gt_kl6, ppo_beta0p05
    family: str  # "ppo" (learned reward model) or "ppo_gt" (VADER)
    kl_coef: float
    target_kl: float  # 0: the coefficient stays fixed


def _tag(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def target_setting(ppo: Any, fam: str, target: float) -> Setting:
    """A family's run toward a target KL, from `ppo.init_kl_coef` (e.g. ppo_gt_kl6)."""
    return Setting(f"{fam}_kl{_tag(target)}", fam, float(ppo.init_kl_coef), float(target))


def settings(ppo: Any, families: tuple[str, ...] = ("ppo", "ppo_gt")) -> list[Setting]:
    """Every configured setting of each family: the targets, then the fixed coefficients."""
    out = []
    for fam in families:
        out += [target_setting(ppo, fam, t) for t in ppo.targets]
        out += [Setting(f"{fam}_beta{_tag(b)}", fam, float(b), 0.0) for b in ppo.betas]
    return out


def iterations_of(c: Any) -> int:
    """PPO iterations with the methods' update budget; the evaluation period must fall on an iteration."""
    per_iteration = c.ppo.epochs * c.ppo.minibatches
    if c.train.steps % per_iteration or c.eval.every % per_iteration:
        raise ValueError(f"config.train.steps ({c.train.steps}) and config.eval.every ({c.eval.every}) must be "
                         f"multiples of ppo.epochs x ppo.minibatches ({per_iteration}): PPO's updates come in "
                         "iterations, and every family is evaluated after the same numbers of updates")
    if c.ppo.rollouts % c.ppo.minibatches:
        raise ValueError(f"config.ppo.rollouts ({c.ppo.rollouts}) must be a multiple of ppo.minibatches "
                         f"({c.ppo.minibatches})")
    return c.train.steps // per_iteration


def _host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.array(x), tree)  # fresh host copies: the engine donates what it is given


class PPORuns:
    """The PPO engines (one compiled iteration per learning rate) for every setting and seed."""

    def __init__(self, st: Any, rm: Any):
        self.st, self.rm = st, rm
        c = st.c.ppo
        sampling = SamplingConfig(max_new_tokens=st.c.eval.max_new_tokens, temperature=1.0, eos_id=st.eos,
                                  pad_id=st.pad)
        self.config = PPOConfig(model=st.model_config(), value_model=rm.config, sampling=sampling, epochs=c.epochs,
                                minibatches=c.minibatches, seed=st.c.seed, kl_coef=float(c.init_kl_coef),
                                horizon=float(c.horizon))
        self.iterations = iterations_of(st.c)
        self.mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
        self.engines: dict[float, Any] = {}  # by learning rate (built into the compiled step)
        self.reference = None  # π_SFT on the engines' policy shardings
        self.prompts, self.mask = st.prefixes(st.train_ids, st.c.pairs.prefixes, st.c.seed + 1)  # the pairs'
        self.scorers = {"ppo": lambda rows, row_mask, texts: rm.score(rows, row_mask),
                        "ppo_gt": lambda rows, row_mask, texts: st.reward(texts)}

    @staticmethod
    def _optimizer(learning_rate: float) -> Any:
        o = default_optimizer_config()
        o.name, o.learning_rate, o.warmup_steps, o.clip_grad_norm = "adamw", learning_rate, 0, 10.0
        return o

    def _decode(self, rows: np.ndarray, row_mask: np.ndarray) -> list[str]:
        return self.st.tokenizer.batch_decode([r[m == 1] for r, m in zip(rows, row_mask)], skip_special_tokens=True)

    def run(self, setting: Setting, seed: int, evaluate: Any, learning_rate: float | None = None,
            usage: Usage | None = None) -> Any:
        """Trains one setting at one seed; `evaluate(updates, policy params)` every `eval.every` updates. A
        learning rate other than the ones run before compiles another step (the optimizer is built in)."""
        st, c = self.st, self.st.c.ppo
        learning_rate = c.learning_rate if learning_rate is None else learning_rate
        if learning_rate not in self.engines:
            self.engines[learning_rate] = build_ppo_engine(
                self.config, self._optimizer(learning_rate), _host(st.sft_params), _host(self.rm.params),
                self.mesh, sharding.DEFAULT_RULES)
        engine = self.engines[learning_rate]
        if self.reference is None:
            self.reference = jax.device_put(st.sft_params, engine.param_shardings["policy"])
        state = engine.init_state(_host(st.sft_params), _host(self.rm.params), setting.kl_coef, setting.target_kl)
        usage = usage or Usage(setting.name, seed)
        per_iteration = c.epochs * c.minibatches
        counted = usage.count_steps(engine, per_iteration, passes=c.epochs)
        rollouts = Rollouts(counted, self.reference, usage.count_scores(self.scorers[setting.family],
                                                                        ground_truth=setting.family == "ppo_gt"),
                            self._decode, seed=st.c.seed + 1000 * seed)
        trainer = Trainer(counted, steps=self.iterations, writer=MetricWriter(None), name=f"{setting.name} seed {seed}",
                          eval_every=st.c.eval.every // per_iteration,
                          evaluate=lambda step, s: evaluate(step * per_iteration, s.params["policy"]),
                          rollout=rollouts)
        final, _ = trainer.fit(state, PromptLoader(self.prompts, self.mask, c.rollouts, st.c.seed + 1000 * seed))
        self.last_kl_coef = float(jax.device_get(final.kl_coef))
        return final.params["policy"]


def run_ppo(st: Any, rm: Any, test_prompts: np.ndarray, test_mask: np.ndarray) -> list[dict[str, Any]]:
    """The evaluation points of every PPO and PPO-GT setting at every training seed."""
    runs = st.ppo_runs = st.ppo_runs or PPORuns(st, rm)
    points: list[dict[str, Any]] = []
    for setting in settings(st.c.ppo):
        for seed in st.seeds_of():
            # PPO learns from the reward model, trained on the pairs: it is charged their labels and samples
            pairs = st.pair_samples if setting.family == "ppo" else 0
            learning_rate = st.learning_rates.get(family(setting.name), st.c.ppo.learning_rate)
            usage = Usage(setting.name, seed, learning_rate, ground_truth_labels=pairs, samples_generated=pairs)

            def evaluate(updates: int, policy: Any, name: str = setting.name, seed: int = seed) -> None:
                points.append(st.point(name, seed, updates, policy, test_prompts, test_mask)[0])

            t0 = time.perf_counter()
            policy = runs.run(setting, seed, evaluate, learning_rate, usage)
            st.usages.append(usage.done())
            st.final_policy(setting.name, seed, policy)
            st.log(f"{setting.name} seed {seed}: reward {points[-1]['reward']:+.3f}, KL {points[-1]['kl']:.3f}, "
                   f"final coefficient {runs.last_kl_coef:.3f} after {runs.iterations} iterations of "
                   f"{st.c.ppo.rollouts} rollouts ({time.perf_counter() - t0:.0f} s)")
    return points
