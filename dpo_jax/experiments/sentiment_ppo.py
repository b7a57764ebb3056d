"""The sentiment experiment's PPO baselines (stage 6): PPO against the learned reward model and PPO-GT against VADER,
each at the DPO family's β grid (the KL coefficient of the same objective r − β·KL), from π_SFT, on the pairs'
train prefixes, evaluated like every method.

Budget, the same as every trained method's: `train.steps` optimizer updates of `train.batch_pairs` sequences at
`train.learning_rate` — `train.steps / ppo.epochs` PPO iterations of `train.batch_pairs` sampled prompts, each
updated for `ppo.epochs` epochs in one minibatch (PPO also samples its own rollouts, which DPO does not). All runs
share one compiled PPO step: β lives in the state, a training seed in the rollouts' generation keys and prompt
order (the step's minibatch shuffle is the engine's: with one minibatch it only reorders a batch).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.data.prompts import PromptLoader
from dpo_jax.experiments.sentiment_budget import Usage
from dpo_jax.metrics import MetricWriter
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.rlhf.ppo import PPOConfig, Rollouts, build_ppo_engine
from dpo_jax.train.state import default_optimizer_config
from dpo_jax.train.trainer import Trainer


def _host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.array(x), tree)  # fresh host copies: the engine donates what it is given


def run_ppo(st: Any, rm: Any, test_prompts: np.ndarray, test_mask: np.ndarray) -> list[dict[str, Any]]:
    """The evaluation points of every PPO and PPO-GT setting at every training seed."""
    c, t = st.c.ppo, st.c.train
    iterations = max(t.steps // c.epochs, 1)
    sampling = SamplingConfig(max_new_tokens=st.c.eval.max_new_tokens, temperature=1.0, eos_id=st.eos,
                              pad_id=st.pad)
    config = PPOConfig(model=st.model_config(), value_model=rm.config, sampling=sampling, epochs=c.epochs,
                       seed=st.c.seed, kl_coef=float(c.betas[0]))
    o = default_optimizer_config()
    o.name, o.learning_rate, o.warmup_steps, o.clip_grad_norm = "adamw", t.learning_rate, 0, 10.0
    mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
    engine = build_ppo_engine(config, o, _host(st.sft_params), _host(rm.params), mesh, sharding.DEFAULT_RULES)
    reference = jax.device_put(st.sft_params, engine.param_shardings["policy"])
    prompts, mask = st.prefixes(st.train_ids, st.c.pairs.prefixes, st.c.seed + 1)  # the pairs' prefixes

    def decode(rows, row_mask):
        return st.tokenizer.batch_decode([r[m == 1] for r, m in zip(rows, row_mask)], skip_special_tokens=True)

    scorers = {"ppo": lambda rows, row_mask, texts: rm.score(rows, row_mask),
               "ppo_gt": lambda rows, row_mask, texts: st.reward(texts)}
    points = []
    first = True
    for family, score in scorers.items():
        for beta in c.betas:
            name = f"{family}_beta{f'{beta:g}'.replace('.', 'p')}"
            for seed in st.seeds_of():
                state = engine.state if first else engine.init_state(_host(st.sft_params), _host(rm.params),
                                                                     float(beta))
                first = False
                # PPO learns from the reward model, trained on the pairs: it is charged their labels and samples
                pairs = st.pair_samples if family == "ppo" else 0
                usage = Usage(name, seed, ground_truth_labels=pairs, samples_generated=pairs)
                counted = usage.count_steps(engine, c.epochs * config.minibatches, passes=c.epochs)

                def evaluate(step: int, state: Any, name: str = name, seed: int = seed) -> None:
                    points.append(st.point(name, seed, step * c.epochs, state.params["policy"], test_prompts,
                                           test_mask)[0])

                t0 = time.perf_counter()
                rollouts = Rollouts(counted, reference, usage.count_scores(score, ground_truth=family == "ppo_gt"),
                                    decode, seed=st.c.seed + 1000 * seed)
                trainer = Trainer(counted, steps=iterations, writer=MetricWriter(None), name=f"{name} seed {seed}",
                                  eval_every=max(c.eval_every, 1), evaluate=evaluate, rollout=rollouts)
                final, _ = trainer.fit(state, PromptLoader(prompts, mask, t.batch_pairs, st.c.seed + 1000 * seed))
                st.usages.append(usage.done())
                st.final_policy(name, seed, final.params["policy"])
                st.log(f"{name} seed {seed}: reward {points[-1]['reward']:+.3f}, KL {points[-1]['kl']:.3f} after "
                       f"{iterations} PPO iterations x {c.epochs} epochs ({time.perf_counter() - t0:.0f} s)")
    return points
