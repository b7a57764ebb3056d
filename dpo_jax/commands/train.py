"""`dpo-jax train --config FILE[:ARG] [--config.KEY=VALUE ...]`: train (or resume) a run — DPO and its relatives,
SFT, unlikelihood, reward models — through the one loop (train/run.py).

The run config is also `precompute`'s and `eval`'s: the library's sections (train/run.py `default_run_config`) plus
`winrate`, the sampling evaluation `dpo-jax eval` runs with a judge (evaluation/winrate_eval.py).
"""

from __future__ import annotations

import ml_collections

from dpo_jax.commands import exits_on_run_error
from dpo_jax.evaluation.winrate_eval import default_winrate_config
from dpo_jax.train import run


def default_config() -> ml_collections.ConfigDict:
    c = run.default_run_config()
    c.winrate = default_winrate_config()  # `dpo-jax eval`'s sampling evaluation
    return c


default_run_config = default_config  # the name config files use

main = exits_on_run_error(run.train, "train")
