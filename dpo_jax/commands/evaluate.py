"""`dpo-jax eval --config FILE[:ARG]`: a run's latest checkpoint (or the initial model) on the eval split; with a
judge (`--config.winrate.judge.kind`), also its samples — and other runs' (`winrate.runs`) — at each temperature
of a sweep, with win rates (evaluation/winrate_eval.py)."""

from __future__ import annotations

import ml_collections

from dpo_jax.commands import exits_on_run_error
from dpo_jax.commands.train import default_config  # noqa: F401 — the run config
from dpo_jax.evaluation import winrate_eval
from dpo_jax.train.run import build_run


def evaluate(c: ml_collections.ConfigDict) -> None:
    runs = winrate_eval.check(c, c.train.run_dir) if c.winrate.judge.kind else None  # before anything loads
    run = build_run(c)
    try:
        if "eval" not in run.loaders:
            raise ValueError("config.data.eval_path is empty: nothing to evaluate")
        run.evaluate(run.start, run.state)
        if runs is not None:
            winrate_eval.evaluate_winrate(run, runs)
    finally:
        run.close()


main = exits_on_run_error(evaluate, "eval")
