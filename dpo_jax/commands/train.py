"""`dpo-jax train --config FILE[:ARG] [--config.KEY=VALUE ...]`: train (or resume) a run — DPO and its relatives,
SFT, unlikelihood, reward models, online DPO — through the one loop (train/run.py).

The run config is also `precompute`'s and `eval`'s: the library's sections (train/run.py `default_run_config`) plus
`winrate`, the sampling evaluation `dpo-jax eval` runs with a judge (evaluation/winrate_eval.py).
"""

from __future__ import annotations

import os

import ml_collections

from dpo_jax.commands import exits_on_run_error
from dpo_jax.evaluation.winrate_eval import default_winrate_config, judge_for
from dpo_jax.train import run


def default_config() -> ml_collections.ConfigDict:
    c = run.default_run_config()
    c.winrate = default_winrate_config()  # `dpo-jax eval`'s sampling evaluation
    # online DPO with online.reward_kind = "judge": a pairwise judge of its two samples (function or endpoint)
    c.online.judge = default_winrate_config().judge
    return c


default_run_config = default_config  # the name config files use

def train(c: ml_collections.ConfigDict) -> dict:
    """A run; online DPO (train.mode = online_dpo) adds its sampler (rlhf/online_dpo.py), iterative DPO
    (iterative.rounds > 0) runs rounds of them (rlhf/iterative_dpo.py)."""
    if c.train.mode != "online_dpo" and not c.iterative.rounds:
        return run.train(c)
    judge = None
    if c.online.reward_kind == "judge":
        if c.online.judge.kind not in ("function", "endpoint"):
            raise ValueError(f"config.online.judge.kind = {c.online.judge.kind!r}: 'function' or 'endpoint' (a "
                             "reward model scores each sample: online.reward_kind = 'model')")
        judge = judge_for(c.online.judge, c.train.seed, os.path.abspath(c.train.run_dir), key="config.online.judge")
    if c.iterative.rounds:
        from dpo_jax.rlhf.iterative_dpo import train_iterative

        return train_iterative(c, judge)
    from dpo_jax.rlhf.online_dpo import train_online

    return train_online(c, judge)


main = exits_on_run_error(train, "train")
