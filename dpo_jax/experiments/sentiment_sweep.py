"""The sentiment experiment's learning-rate selection: every family tuned the same way, on validation prefixes that
the test prefixes never share (Stages.validation_prefixes).

For each family of `sweep.families`, its representative setting — DPO at `sweep.dpo_method`, online DPO at the same β,
PPO and PPO-GT at target KL `sweep.target_kl`, the others at their first configured method — is trained from π_SFT at
the first training seed with every rate of `sweep.learning_rates` and evaluated on the validation prefixes every
`eval.every` updates, as the test runs are. Chosen: the rate whose run reaches the highest validation reward at a
KL(π‖π_SFT) within `sweep.max_kl` — a point of the reward-vs-KL frontier the comparison is about. (An earlier
criterion, the final reward − 0.1·KL, mixed VADER units with nats and picked the smallest rate of the grid for every
family: the rate that moves least.) The rate is used for all of that family's runs. The sweep's runs are the families'
full budget; they are not counted in the equal-terms table (tuning is the same for every family, and stated beside
it). The choice is cached under the cache directory, keyed by everything it depends on.
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
FIELDS = ("family", "setting", "learning_rate", "updates", "reward", "kl", "chosen")


def _setting_of(st: Any, fam: str) -> tuple[str, Any]:
    """A family's representative: (method name, method config), or (name, Setting) for PPO and PPO-GT."""
    s = st.c.sweep
    if fam in PPO_FAMILIES:
        setting = target_setting(st.c.ppo, PPO_FAMILIES[fam], s.target_kl)
        return setting.name, setting
    names = {"DPO": [s.dpo_method], "Online DPO": [f"online_{s.dpo_method}"]}.get(fam, [])  # the same β
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
                f"empty): {st.c.train.learning_rate:g} for DPO, its relatives and online DPO, "
                f"{st.c.ppo.learning_rate:g} for PPO and PPO-GT. configs/sentiment.py:full chooses every family's "
                "on validation prefixes."]
    families = [f for f in s.families if f not in PPO_FAMILIES or getattr(st, "reward_model", None)]
    swept = [(f, name, setting if isinstance(setting, Setting) else _without_seeds(setting.to_dict()))
             for f in families for name, setting in [_setting_of(st, f)]]
    ppo = {k: v for k, v in st.c.ppo.to_dict().items() if k not in ("targets", "betas")}  # the runs' other settings
    rm = getattr(st, "reward_model", None)  # PPO's reward: the one the reward-model stage kept
    key = fingerprint([st.sft_key, st.c.pairs.to_dict(), st.c.train.to_dict(), ppo, s.to_dict(), st.c.eval.to_dict(),
                       swept, st.c.seeds[0], st.c.reward_model.steps, rm and rm.learning_rate])
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


def best_under_kl(rows: list[dict[str, Any]], max_kl: float) -> dict[str, Any] | None:
    """The evaluation with the highest reward among those with KL ≤ max_kl (None when none is)."""
    eligible = [r for r in rows if r["kl"] <= max_kl]
    return max(eligible, key=lambda r: r["reward"]) if eligible else None


def _run(st: Any, families: list[str]) -> list[dict[str, Any]]:
    """Every sweep run's validation evaluations (one row each), each family's chosen one marked."""
    s = st.c.sweep
    prompts, mask = st.validation_prefixes()
    seed = st.c.seeds[0]
    if any(f in PPO_FAMILIES for f in families):
        st.ppo_runs = st.ppo_runs or PPORuns(st, st.reward_model)
    rows = []
    for fam in families:
        name, setting = _setting_of(st, fam)
        runs = []
        for learning_rate in s.learning_rates:
            t0, run = time.perf_counter(), []

            def evaluate(updates: int, policy: Any, learning_rate: float = float(learning_rate), run=run) -> None:
                vader, kl = st.evaluate(policy, st.sft_params, prompts, mask, seed)[:2]
                run.append({"family": fam, "setting": name, "learning_rate": learning_rate, "updates": int(updates),
                            "reward": float(vader.mean()), "kl": float(kl.mean()), "chosen": False})

            if fam in PPO_FAMILIES:
                st.ppo_runs.run(setting, seed, evaluate, float(learning_rate))
            else:
                st.train_method(name, setting, seed, evaluate, learning_rate=float(learning_rate))
            best = best_under_kl(run, s.max_kl)
            st.log(f"sweep {name} lr {learning_rate:g}: " + (
                f"best validation reward {best['reward']:+.3f} at KL {best['kl']:.2f} ({best['updates']} updates)"
                if best else f"no evaluation within KL {s.max_kl:g}") +
                f"; final {run[-1]['reward']:+.3f} at KL {run[-1]['kl']:.2f} ({time.perf_counter() - t0:.0f} s)")
            runs += run
        chosen = best_under_kl(runs, s.max_kl)
        if chosen is None:
            raise ValueError(f"config.sweep.max_kl = {s.max_kl:g}: no {fam} run of the sweep has a validation "
                             "evaluation within it (the first comes after eval.every updates); raise max_kl, or "
                             "evaluate earlier")
        chosen["chosen"] = True
        rows += runs
    return rows


def lines(rows: list[dict[str, Any]], s: Any, prefixes: int) -> list[str]:
    out = ["", "## Learning rates, chosen on validation prefixes", "",
           f"Each family's representative setting trained at every rate and evaluated on {prefixes} validation "
           "prefixes (held-out sentences the test prefixes never use) after every evaluation period, as the test "
           f"runs are; chosen: the rate reaching the highest validation reward at KL ≤ {s.max_kl:g} nats, used for "
           "every run of the family. Every family is tuned this way (sweep.csv has every evaluation).", "",
           f"| family | setting | learning rate | best reward at KL ≤ {s.max_kl:g} (KL, updates) | final reward (KL) "
           "| |", "|---|---|---|---|---|---|"]
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["family"], r["learning_rate"]), []).append(r)
    for (fam, learning_rate), run in runs.items():
        best = best_under_kl(run, s.max_kl)
        at = f"{best['reward']:+.3f} ({best['kl']:.2f}, {best['updates']})" if best else "—"
        out.append(f"| {fam} | {run[0]['setting']} | {learning_rate:g} | {at} | {run[-1]['reward']:+.3f} "
                   f"({run[-1]['kl']:.2f}) | {'**chosen**' if any(r['chosen'] for r in run) else ''} |")
    return out
