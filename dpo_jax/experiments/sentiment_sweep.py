"""The sentiment experiment's learning-rate selection: every family tuned the same way, on validation prefixes that
the test prefixes never share (Stages.validation_prefixes).

For each family of `sweep.families`, its representative setting — DPO and its relatives at `sweep.dpo_method`
(or their first configured method), PPO and PPO-GT at target KL `sweep.target_kl` — is trained from π_SFT at the
first training seed with every rate of `sweep.learning_rates`, each final policy sampled on the validation
prefixes, and the rate with the highest validation reward − `sweep.beta` · KL (the objective r − β·KL that DPO and
PPO both maximize) is used for all of that family's runs. The runs are the families' full budget; they are not
counted in the equal-terms table (tuning is the same for every family, and stated beside it). The choice is cached
under the cache directory, keyed by everything it depends on.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any

from dpo_jax.experiments.sentiment_points import family
from dpo_jax.experiments.sentiment_ppo import PPORuns, Setting, target_setting
from dpo_jax.fingerprint import fingerprint

PPO_FAMILIES = {"PPO": "ppo", "PPO-GT": "ppo_gt"}
FIELDS = ("family", "setting", "learning_rate", "reward", "kl", "objective", "chosen")


def _setting_of(st: Any, fam: str) -> tuple[str, Any]:
    """A family's representative: (method name, method config), or (name, Setting) for PPO and PPO-GT."""
    s = st.c.sweep
    if fam in PPO_FAMILIES:
        setting = target_setting(st.c.ppo, PPO_FAMILIES[fam], s.target_kl)
        return setting.name, setting
    names = [s.dpo_method] if fam == "DPO" else []
    names += [n for n in st.c.methods if family(n) == fam]
    name = next((n for n in names if n in st.c.methods), None)
    if name is None:
        raise ValueError(f"config.sweep.families names {fam!r}, but config.methods has no method of that family "
                         f"(and config.sweep.dpo_method = {s.dpo_method!r} is not one of them)")
    return name, st.c.methods[name]


def _without_seeds(setting: dict[str, Any]) -> dict[str, Any]:
    """A method's setting as the sweep's key sees it: the sweep trains at the first experiment seed whatever seeds
    the method names, so naming another seed (or more) does not run the sweep again."""
    return {k: v for k, v in setting.items() if k != "seeds"}


def sweep(st: Any) -> list[str]:
    """Sets `st.learning_rates` from the sweep (nothing when `sweep.learning_rates` is empty) and returns
    results.md's lines; sweep.csv has every run."""
    s = st.c.sweep
    if st.c.train.steps < 1:
        return []
    if not s.learning_rates:
        return ["", "## Learning rates", "", f"As configured, not swept in this run (config.sweep.learning_rates is "
                f"empty): {st.c.train.learning_rate:g} for DPO and the other pair-based methods, "
                f"{st.c.ppo.learning_rate:g} for PPO and PPO-GT. configs/sentiment.py:full chooses every family's "
                "on validation prefixes."]
    families = [f for f in s.families if f not in PPO_FAMILIES or getattr(st, "reward_model", None)]
    swept = [(f, name, setting if isinstance(setting, Setting) else _without_seeds(setting.to_dict()))
             for f in families for name, setting in [_setting_of(st, f)]]
    ppo = {k: v for k, v in st.c.ppo.to_dict().items() if k not in ("targets", "betas")}  # the runs' other settings
    key = fingerprint([st.sft_key, st.c.pairs.to_dict(), st.c.train.to_dict(), ppo, s.to_dict(), st.c.eval.to_dict(),
                       swept, st.c.seeds[0], st.c.reward_model.to_dict()])
    path = os.path.join(st.cache, f"sweep-{key}.json")
    if os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f)
        st.log(f"learning-rate sweep: cached ({path})")
    else:
        rows = _run(st, families)
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(path + ".tmp", path)
    for row in rows:
        if row["chosen"]:
            st.learning_rates[row["family"]] = row["learning_rate"]
    with open(os.path.join(st.c.out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return lines(rows, s, len(st.validation_prefixes()[0]))


def _run(st: Any, families: list[str]) -> list[dict[str, Any]]:
    s = st.c.sweep
    prompts, mask = st.validation_prefixes()
    seed = st.c.seeds[0]
    if any(f in PPO_FAMILIES for f in families):
        st.ppo_runs = st.ppo_runs or PPORuns(st, st.reward_model)
    rows = []
    for fam in families:
        name, setting = _setting_of(st, fam)
        results = []
        for learning_rate in s.learning_rates:
            t0 = time.perf_counter()
            if fam in PPO_FAMILIES:
                policy = st.ppo_runs.run(setting, seed, lambda *_: None, float(learning_rate))
            else:
                policy = st.train_method(name, setting, seed, learning_rate=float(learning_rate))
            vader, kl = st.evaluate(policy, st.sft_params, prompts, mask, seed)[:2]
            reward, mean_kl = float(vader.mean()), float(kl.mean())
            results.append({"family": fam, "setting": name, "learning_rate": float(learning_rate), "reward": reward,
                            "kl": mean_kl, "objective": reward - s.beta * mean_kl, "chosen": False})
            st.log(f"sweep {name} lr {learning_rate:g}: validation reward {reward:+.3f}, KL {mean_kl:.2f}, "
                   f"objective {results[-1]['objective']:+.3f} ({time.perf_counter() - t0:.0f} s)")
        max(results, key=lambda r: r["objective"])["chosen"] = True
        rows += results
    return rows


def lines(rows: list[dict[str, Any]], s: Any, prefixes: int) -> list[str]:
    out = ["", "## Learning rates, chosen on validation prefixes", "",
           f"Each family's representative setting trained at every rate, its final policy sampled on {prefixes} "
           "validation prefixes (held-out sentences the test prefixes never use); chosen: the highest validation "
           f"reward − {s.beta:g} · KL, used for every run of the family. Every family is tuned this way "
           "(sweep.csv).", "",
           "| family | setting | learning rate | validation reward | KL | reward − β·KL | |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['family']} | {r['setting']} | {r['learning_rate']:g} | {r['reward']:+.3f} | {r['kl']:.2f} | "
            f"{r['objective']:+.3f} | {'**chosen**' if r['chosen'] else ''} |" for r in rows]
    return out
